"""A party or dealer process in which any reconstruction of shares raises.

    python tests/noreveal_party.py --rank R --world-size N   (launch message on stdin)

Adding shares up (`veiltrain.sharing.reconstruct`), decoding them, and the owner's ledger
functions are replaced by functions that raise before `veiltrain.party.main` runs; CrypTen's own
decryption is refused by the party already (`mpc.forbid_reveal`). Training still completing
shows that no party process reconstructs anything.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn


class RevealAttempt(RuntimeError):
    """A party process tried to reconstruct a value."""


def _refuse(name: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise RevealAttempt(f"{name} called in a party process")

    return refused


def install() -> None:
    """Make every reconstruction path raise in this process."""
    from veiltrain import ledger, sharing

    for module, names in (
        (sharing, ("reconstruct", "decode")),
        (ledger, ("reveal", "reveal_many")),
    ):
        for name in names:
            setattr(module, name, _refuse(f"{module.__name__}.{name}"))


if __name__ == "__main__":
    install()
    from veiltrain import party

    sys.exit(party.main(sys.argv[1:]))
