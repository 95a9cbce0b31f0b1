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
    """The object store failed or refused: missing object, denied access, unreachable endpoint."""


class PartyError(VeiltrainError, RuntimeError):
    """A compute party or the dealer failed, timed out or never joined; the message names it."""
