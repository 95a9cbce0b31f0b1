"""How many steps a run takes: the one rule behind progress bars and step counts."""

from __future__ import annotations

import math


def steps_per_epoch(count: int, batch_size: int) -> int:
    """Batches in one epoch; the last batch may be short."""
    return math.ceil(count / batch_size)


def steps_total(epochs: int, count: int, batch_size: int) -> int:
    """Training steps of a whole run over `count` records."""
    return epochs * steps_per_epoch(count, batch_size)
