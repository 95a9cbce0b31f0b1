"""Products in the ring Z/2^64 (int64 tensors) in the layout torch computes fastest.

torch has no BLAS for int64 and its matmul kernel reads the right operand down its columns:
a (16 x 4096) @ (4096 x 144) product took 51 ms on one core here, and 22 ms when the right
operand is first copied column-major (each dot product then reads contiguous memory on both
sides); the same held for every kernel-gradient and linear-layer shape tried but the tiniest.
Results are bit for bit torch's. (Tried and dropped: float64 BLAS on 16-bit limbs, exact below
2^53 but ten products: 27 ms against 36 ms at best, slower on most shapes.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_SMALL = 1 << 12
"""Below this many multiply-adds the copy costs more than it saves."""


def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torch.matmul for int64, with a 2-D right operand copied column-major first."""
    if y.dim() == 2 and x.dim() >= 2 and x.shape[-1] * y.shape[1] * x.shape[-2] >= _SMALL:
        y = y.t().contiguous().t()
    return torch.matmul(x, y)


def product(op: str) -> Callable[..., Any]:
    """The torch function a Beaver product names ('mul', 'matmul', 'conv2d', ...)."""
    return matmul if op == "matmul" else getattr(torch, op)
