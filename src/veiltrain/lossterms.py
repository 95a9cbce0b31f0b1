"""The loss a party stores and the owner finishes: the log of the cross-entropy is taken here.

A party cannot open its loss, so the cheapest exact loss is one the owner completes in floating
point. For the cross-entropy a party stores, per step, shares of `[sum_i (max_i - z_i,y_i),
s_1, ..., s_B]` with `s_i = sum_j exp(z_ij - max_i)` (padded to the full batch); the owner
decodes them and computes `(sum_i log s_i + first) / n`. On shares, CrypTen's log costs about
35 sequential rounds a step. For the MSE the stored value is the loss itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veiltrain import schedule

_ULP = 2.0**-16  # the smallest positive fixed-point value at the default precision


def width(loss: str, batch_size: int) -> int:
    """Values a party stores per step."""
    return 1 if loss == "mse" else 1 + batch_size


def batch_sizes(count: int, batch_size: int, steps: int) -> list[int]:
    """The size of every step's batch, epoch after epoch (the last of an epoch may be short)."""
    per_epoch = schedule.steps_per_epoch(count, batch_size)
    last = count - (per_epoch - 1) * batch_size
    return [batch_size if (s % per_epoch) < per_epoch - 1 else last for s in range(steps)]


def finish(values: np.ndarray[Any, Any], count: int, batch_size: int) -> np.ndarray[Any, Any]:
    """Per-step losses from the decoded stored values, (steps,) or (steps, 1 + batch)."""
    if values.ndim == 1 or values.shape[1] == 1:
        return values.reshape(-1)
    sizes = batch_sizes(count, batch_size, len(values))
    losses = np.empty(len(values))
    for step, (row, n) in enumerate(zip(values, sizes, strict=True)):
        # Computed right, s >= 1. A run that wrapped around the ring gives garbage s (and a
        # garbage sum): log|s| keeps the loss finite and as absurd as the stored values, for
        # the watchdog to see (the offset alone is then +-1e6 and beyond).
        logs = np.log(np.maximum(np.abs(row[1 : 1 + n]), _ULP))
        losses[step] = (row[0] + logs.sum()) / n
    return losses
