"""The small exception taxonomy: every error veiltrain raises on purpose is one of these."""

from __future__ import annotations


class VeiltrainError(Exception):
    """Marker base: an error veiltrain raised on purpose, with a message meant for a person."""


class ConfigError(VeiltrainError, ValueError):
    """A bad option, parameter or input value; the message names it and says what to do."""


class InsecureSetupError(ConfigError):
    """A set-up that would reveal data to a compute party (one party, shared credentials...)."""


class IntegrityError(VeiltrainError, ValueError):
    """Stored bytes are corrupt, truncated, hostile or do not match their manifest."""


class StoreError(VeiltrainError, OSError):
    """The object store failed or refused: missing object, denied access, bad credentials.

    Not worth retrying as such: the same call fails the same way until a person acts.
    """


class StoreUnavailableError(StoreError):
    """The store could not be reached or timed out: the one store failure that is retried."""


class PartyError(VeiltrainError, RuntimeError):
    """A compute party or the dealer failed, timed out or never joined; the message names it."""


def is_transient(exc: BaseException) -> bool:
    """Whether waiting and retrying can help: an unreachable or slow store or network only."""
    return isinstance(exc, (StoreUnavailableError, TimeoutError, ConnectionError))


class StackError(VeiltrainError, RuntimeError):
    """The deployment stack or a dispatched stage failed; the message names the process or pool."""
