"""A party process in which one share-wise truncation wraps, on purpose.

    python tests/wrap_party.py MARKER_DIR K --rank R --world-size N   (launch message on stdin)

A wrap is what CrypTen's two-party truncation does now and then on its own (about |x| / 2^64 of
the time for a product x at scale 2^32; see bench/bench_truncation.py): the parties' truncated
shares then sum to a value 2^(64-f) off. Here party 0 adds 2^48 (2^32 in real terms at f = 16)
to the first word of each sample in its K-th truncation of a four-dimensional tensor (convolution
outputs and their gradients), once: MARKER_DIR/wrapped records the call, and later processes (a
retrained epoch) leave their truncations alone. One wrapped word per sample, not one in all:
a single wrapped activation shows in the loss only when its sample's label is not the class its
huge logit favours (reasoned: about 9 times in 10 with ten classes; one wrapped word went unseen
once in about 16 runs), and the test must see it every time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WRAP = 1 << 48


def install(marker: Path, at: int) -> None:
    """Wrap party 0's `at`-th truncation of a 4-d share unless a process already did."""
    from veiltrain import ringmath

    original = ringmath.trunc_div_
    calls = [0]

    def trunc_div_(t: Any, divisor: int) -> Any:
        out = original(t, divisor)
        if out.dim() == 4 and _rank() == 0 and not marker.exists():
            calls[0] += 1
            if calls[0] == at:
                out[:, 0, 0, 0] += WRAP
                marker.write_text(json.dumps({"call": at, "shape": list(out.shape)}))
        return out

    ringmath.trunc_div_ = trunc_div_


def _rank() -> int | None:
    import crypten.communicator as comm

    return int(comm.get().get_rank()) if comm.is_initialized() else None


if __name__ == "__main__":
    install(Path(sys.argv[1]) / "wrapped", int(sys.argv[2]))
    from veiltrain import party

    sys.exit(party.main(sys.argv[3:]))
