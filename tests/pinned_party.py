"""A party process whose forward products are re-shared so that their share sums overflow.

    python tests/pinned_party.py --rank R --world-size N   (launch message on stdin)

Before each truncation of a product in the forward pass (inside `truncation.exact_products`,
whichever mode the job asks for), party 0 hands its share to party 1 over the parties' link and
takes 2^63 - 1 as its new share; party 1 takes the sum minus that. The value is unchanged, but
for every value below -1 the two shares' signed sum now overflows: CrypTen's share-wise
truncation puts it 2^48 off (2^32 in real terms), where by chance that happens about |x| / 2^64
of the time. The exact truncation must not care how the value is split. Test-only: handing a
share to the other party reveals the value to it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PINNED = (1 << 63) - 1
_forward = [False]


def install() -> None:
    """Pin party 0's share of every forward product before it is truncated."""
    import torch

    from veiltrain import chains, fastpath, truncation

    original_truncated, original_context = fastpath._truncated, truncation.exact_products

    @contextmanager
    def exact_products(enabled: bool = True) -> Iterator[None]:
        _forward[0] = True
        try:
            with original_context(enabled):
                yield
        finally:
            _forward[0] = False

    def truncated(share: Any, scale: int) -> Any:
        if _forward[0]:
            theirs = chains.exchange(share.contiguous())
            share = torch.full_like(share, PINNED) if _rank() == 0 else share + theirs - PINNED
        return original_truncated(share, scale)

    truncation.exact_products = exact_products
    fastpath._truncated = truncated


def _rank() -> int:
    import crypten.communicator as comm

    return int(comm.get().get_rank())


if __name__ == "__main__":
    install()
    from veiltrain import party

    sys.exit(party.main(sys.argv[1:]))
