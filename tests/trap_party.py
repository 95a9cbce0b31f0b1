"""A party or dealer process in which torch's generators cannot feed CrypTen's protocols.

    python tests/trap_party.py --rank R --world-size N   (launch message on stdin)

Before running `veiltrain.party.main`, every torch draw that names a generator (randint, rand,
randn, randperm) is made to raise, as is any such draw called from a CrypTen module; from the
session on, making or seeding a torch generator raises too. Training still completing proves
that all of CrypTen's protocol randomness (triples, PRZS, B2A bits, wraps, random shares) comes
from veiltrain's keyed streams.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


class TrappedDraw(RuntimeError):
    """A protocol draw reached a torch generator."""


def _trap(name: str, original: Any) -> Any:
    def trapped(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if kwargs.get("generator") is not None or caller.startswith("crypten"):
            raise TrappedDraw(f"torch.{name} called from {caller} with a torch generator")
        return original(*args, **kwargs)

    return trapped


def install() -> None:
    """Trap the draws, then check the trap bites."""
    for name in ("randint", "rand", "randn", "randperm"):
        setattr(torch, name, _trap(name, getattr(torch, name)))
    try:
        torch.randint(0, 2, (1,), generator=torch.Generator())
    except TrappedDraw:
        pass
    else:
        raise SystemExit("the trap did not bite")
    # The party builds its public model skeleton (which seeds torch) before the session starts;
    # from the session on, making or seeding a torch generator is a failure too.
    import veiltrain.mpc as mpc

    session = mpc.session

    def trapped_session(spec: Any) -> Any:
        torch.Generator = _refuse_seed  # type: ignore[misc,assignment]
        torch.manual_seed = _refuse_seed
        return session(spec)

    mpc.session = trapped_session


def _refuse_seed(*args: Any, **kwargs: Any) -> Any:
    raise TrappedDraw("a torch generator was made or seeded during the multi-party session")


if __name__ == "__main__":
    install()
    from veiltrain import party

    sys.exit(party.main(sys.argv[1:]))
