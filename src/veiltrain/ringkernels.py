"""Convolutions in Z/2^64 for small channel counts, through the C loop in `_ringkernels.c`.

Each is one gathered product c[r, j] = sum_p x[rows[r] + cols[p]] * b[p, j]: for a convolution,
rows are where each output's patch starts in the padded input and cols each tap's offset in it
(b is the kernel, taps by output channels); for the kernel gradient the two swap roles (b is
the output gradient, positions by channels); a stride-1 transposed convolution is a convolution
of the output gradient with the flipped kernel. No patches are cut: the loop reads the input
where they lie. On the benchmark's ResNet-style layers (8-16 channels, batch 64) this took
0.6-1.2 ms where torch's int64 kernels took 1.3-5.2 ms (the kernel gradients gained most);
`applies` keeps the shapes where torch's own were as fast (see COLUMNS and MIN_TERMS).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from veiltrain import cext

COLUMNS = (8, 32)
"""Output channels the C loop takes: a vector holds 8 (fewer leave lanes idle: 3 channels ran
2x slower than torch), and from 64 torch's kernels were as fast (measured 2026-12-05)."""
MIN_TERMS = 24
"""Shortest sum the loop takes: with few terms a product is mostly its output's writes, where
torch's kernels were faster (9 taps of one channel at 32 channels: 0.51 against 0.35 ms)."""

_P = ctypes.c_void_p
_N = ctypes.c_int64


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built extension as a C library, or None where it was not built."""
    lib = cext.load("veiltrain._ringkernels")
    if lib is None:
        return None
    lib.gathered_product.argtypes = [_P, _P, _P, _P, _P, _N, _N, _N, ctypes.c_int]
    lib.gathered_product.restype = None
    lib.vectorised.restype = ctypes.c_int
    return lib


def built() -> bool:
    """Whether the extension was built (setuptools compiles it on install)."""
    return _library() is not None


@functools.cache
def available() -> bool:
    """Whether convolutions go through the C loop here: built, and this CPU multiplies 8 words an
    instruction. Without that the plain (SSE2) loop was up to 9x slower than torch's kernels
    (6 of 7 shapes slower, measured on the same Xeon with the plain loop forced)."""
    lib = _library()
    return lib is not None and bool(lib.vectorised())


def applies(*tensors: torch.Tensor, out_channels: int, terms: int) -> bool:
    """Whether a product goes through the C loop: int64 CPU tensors, out_channels within
    COLUMNS and at least MIN_TERMS products summed per output."""
    return (
        COLUMNS[0] <= out_channels <= COLUMNS[1]
        and terms >= MIN_TERMS
        and all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)
        and all(t.dtype == torch.int64 for t in tensors)
        and available()
    )


def gathered_product(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: torch.Tensor, *, vector: bool = True
) -> torch.Tensor:
    """c[r, j] = sum_p x.flat[rows[r] + cols[p]] * b[p, j] mod 2^64, (len(rows), b.shape[1]);
    `vector=False` runs the plain loop even where the vector one could (tests cover both)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("veiltrain._ringkernels is not built: reinstall veiltrain (make venv)")
    x, b = x.contiguous(), b.contiguous()
    m, k = rows.numel(), cols.numel()
    _check(x, rows, cols, b)
    c = torch.empty(m, b.shape[1], dtype=torch.int64)
    if m and k:
        lib.gathered_product(
            x.data_ptr(),
            rows.data_ptr(),
            cols.data_ptr(),
            b.data_ptr(),
            c.data_ptr(),
            m,
            k,
            b.shape[1],
            int(vector),
        )
    else:
        c.zero_()
    return c


def _check(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: torch.Tensor) -> None:
    """The C loop trusts its offsets: every read must lie inside x and b (raises if not)."""
    for name, t in (("rows", rows), ("cols", cols)):
        if t.dtype != torch.int64 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D int64 tensor")
    if x.dtype != torch.int64 or b.dtype != torch.int64 or b.dim() != 2:
        raise ValueError("x and b must be int64, b two-dimensional")
    if b.shape[0] != cols.numel():
        raise ValueError(f"b has {b.shape[0]} rows for {cols.numel()} cols")
    if rows.numel() and cols.numel():
        low = int(rows.min()) + int(cols.min())
        high = int(rows.max()) + int(cols.max())
        if low < 0 or high >= x.numel():
            raise IndexError(f"offsets {low}..{high} outside the {x.numel()} words of x")


@functools.lru_cache(maxsize=128)
def _offsets(
    shape: tuple[int, int, int, int],
    out_map: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a padded input (n, c, h, w): where each output's patch starts (n oh ow of them,
    row-major) and each tap's offset from there (c kh kw of them, in the kernel's order)."""
    n, c, h, w = shape
    (oh, ow), (kh, kw), (sh, sw), (dh, dw) = out_map, kernel, stride, dilation
    starts = (
        torch.arange(n).view(n, 1, 1) * (c * h * w)
        + torch.arange(oh).view(1, oh, 1) * (sh * w)
        + torch.arange(ow).view(1, 1, ow) * sw
    ).reshape(-1)
    taps = (
        torch.arange(c).view(c, 1, 1) * (h * w)
        + torch.arange(kh).view(1, kh, 1) * (dh * w)
        + torch.arange(kw).view(1, 1, kw) * dw
    ).reshape(-1)
    return starts, taps


def _padded(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    ph, pw = padding
    return torch.nn.functional.pad(x, (pw, pw, ph, ph)).contiguous() if ph or pw else x.contiguous()


def conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_map: tuple[int, int],
) -> torch.Tensor:
    """torch.conv2d(x, w) without bias or groups, for an output map `out_map` (oh, ow)."""
    padded = _padded(x, padding)
    out_channels, _, kh, kw = w.shape
    starts, taps = _offsets(tuple(padded.shape), out_map, (kh, kw), stride, dilation)
    out = gathered_product(padded, starts, taps, w.reshape(out_channels, -1).t())
    return out.view(x.shape[0], *out_map, out_channels).permute(0, 3, 1, 2).contiguous()


def conv2d_weight(
    g: torch.Tensor,
    x: torch.Tensor,
    *,
    kernel: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """The kernel gradient (C_out, C_in, kh, kw) for output gradient g and input x."""
    padded = _padded(x, padding)
    n, out_channels, oh, ow = g.shape
    starts, taps = _offsets(tuple(padded.shape), (oh, ow), kernel, stride, dilation)
    rows = g.permute(0, 2, 3, 1).reshape(n * oh * ow, out_channels)
    out = gathered_product(padded, taps, starts, rows)  # (C_in kh kw, C_out)
    return out.view(x.shape[1], *kernel, out_channels).permute(3, 0, 1, 2).contiguous()


def conv_transpose2d(
    g: torch.Tensor, w: torch.Tensor, padding: tuple[int, int], dilation: tuple[int, int]
) -> torch.Tensor:
    """torch.conv_transpose2d(g, w) at stride 1, no groups: the convolution of g with the
    kernel flipped and its channels swapped, padded by the kernel's reach less `padding`."""
    kh, kw = w.shape[2:]
    (ph, pw), (dh, dw) = padding, dilation
    flipped = w.flip(2, 3).transpose(0, 1)
    reach = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
    oh, ow = (g.shape[2] + 2 * reach[0] - dh * (kh - 1), g.shape[3] + 2 * reach[1] - dw * (kw - 1))
    return conv2d(g, flipped, stride=(1, 1), padding=reach, dilation=dilation, out_map=(oh, ow))


def describe() -> dict[str, Any]:
    """What the bench records about the kernels on this machine."""
    return {"built": built(), "used": available(), "columns": list(COLUMNS), "min_terms": MIN_TERMS}
