"""Products in the ring Z/2^64 (int64 tensors) in the layout torch computes fastest.

torch has no BLAS for int64, and which layout of the right operand its matmul kernel prefers
depends on the CPU. On an AMD EPYC without AVX-512 (2026-11-28), a (16 x 4096) @ (4096 x 144)
product took 51 ms on one core, and 22 ms with the right operand first copied column-major (each
dot product then reads contiguous memory on both sides). On an Intel Xeon with AVX-512DQ
(2026-12-03), whose vector unit multiplies int64 words, the row-major kernel won instead: the
same product 1.8 ms row-major against 4.5 ms with the copy, and 2-3x on every kernel-gradient
shape tried. So each process times both layouts once on one such product (`_column_major_wins`,
a few ms) and gives torch the right operand in the layout that won. Results are bit for bit
torch's either way. (Tried and dropped: float64 BLAS on 16-bit limbs, exact below 2^53 but ten
products: 27 ms against 36 ms at best on the EPYC, slower on most shapes.)

Convolutions with small output maps go the same way. torch's int64 convolution works sample by
sample, so a map of a few positions is a matrix-vector product that streams the whole kernel once
per sample: a 512-channel 3x3 layer on 2x2 maps at batch 32 took 0.73-0.77 s, and 0.08 s as one
product of the patches (cut by strided slices) with the kernel; 1x1 maps 0.80 -> 0.02 s, 4x4 maps
(128-256 channels) 3x faster, while 8x8 maps and larger were 25-35 % slower than torch's own, so
only maps of up to _PATCH_POSITIONS positions take this path. Sums mod 2^64 do not depend on their
order: the results are torch's, word for word (tests/test_ringmath.py). Before either, convolutions,
stride-1 transposed convolutions and kernel gradients of 8-32 output channels go through
`ringkernels`' C loop where it is built and this CPU has AVX-512DQ (1.6-4.5x torch's on such
layers).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from veiltrain import ringkernels

_SMALL = 1 << 12
"""Below this many multiply-adds the copy costs more than it saves."""
_PATCH_POSITIONS = 16
"""Output maps of up to this many positions are convolved as one patches product."""


def broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> torch.Size:
    """torch.broadcast_shapes of two shapes, in plain Python: torch's imports torch.fx's symbolic
    shapes on first use (0.4 s, inside a party's first step) and takes 19 us a call."""
    if len(a) < len(b):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + tuple(b)
    out = []
    for i, (m, n) in enumerate(zip(a, b, strict=True)):
        if m != n and 1 not in (m, n):
            raise RuntimeError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast (dimension {i})")
        out.append(n if m == 1 else m)
    return torch.Size(out)


def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torch.matmul for int64, a 2-D right operand first laid out as this CPU computes fastest."""
    if (
        _plain_cpu(y)
        and y.dim() == 2
        and x.dim() >= 2
        and x.shape[-1] * y.shape[1] * x.shape[-2] >= _SMALL
    ):
        y = y.t().contiguous().t() if _column_major_wins() else y.contiguous()
    return torch.matmul(x, y)


@functools.cache
def _column_major_wins() -> bool:
    """Whether torch's int64 matmul runs faster here with its right operand column-major, timed
    on a kernel-gradient shape (best of three; values do not change an int64 product's time)."""
    x = torch.ones(16, 2048, dtype=torch.int64)
    rows = torch.ones(2048, 144, dtype=torch.int64)
    columns = rows.t().contiguous().t()
    return _best_time(lambda: torch.matmul(x, columns)) < _best_time(lambda: torch.matmul(x, rows))


def _best_time(fn: Callable[[], Any], tries: int = 3) -> float:
    best = math.inf
    for _ in range(tries):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def trunc_div_(t: torch.Tensor, divisor: int) -> torch.Tensor:
    """t.div_(divisor, rounding_mode="trunc"), CrypTen's two-party truncation of a share; by a
    power of two on the CPU as t + (2^f - 1 where t < 0) shifted right by f, which rounds toward
    zero as the division does: 159 against 332 us for 131k words (int64 division has no vector
    instruction). Adding at most 2^f - 1 to a negative word cannot overflow."""
    if not (_plain_cpu(t) and t.dtype == torch.int64 and divisor > 0):
        return t.div_(divisor, rounding_mode="trunc")
    bits = divisor.bit_length() - 1
    if divisor != 1 << bits:
        return t.div_(divisor, rounding_mode="trunc")
    negative = t >> 63  # -1 (all ones) for negative words, 0 otherwise
    t += negative.bitwise_and_(divisor - 1)
    return t.bitwise_right_shift_(bits)


def shift_right_logical(t: torch.Tensor, bits: int) -> torch.Tensor:
    """t >> bits with the words read as unsigned (zeros shifted in; torch's >> copies the sign)."""
    return (t >> bits).bitwise_and_((1 << (64 - bits)) - 1)


def product(op: str) -> Callable[..., Any]:
    """The torch function a Beaver product names ('mul', 'matmul', 'conv2d', ...)."""
    ours: dict[str, Callable[..., Any]] = {
        "matmul": matmul,
        "conv2d": conv2d,
        "conv_transpose2d": conv_transpose2d,
        "conv2d_weight": conv2d_weight,
    }
    return ours[op] if op in ours else getattr(torch, op)


def pair(value: Any) -> tuple[int, int]:
    """A convolution setting for both spatial dimensions (an int stands for both)."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _tap(offset: int, dilation: int, stride: int, positions: int) -> slice:
    """The input rows (or columns) kernel tap `offset` meets at each of `positions` outputs."""
    start = offset * dilation
    return slice(start, start + stride * (positions - 1) + 1, stride)


def _plain_cpu(t: Any) -> bool:
    """A plain torch tensor on the CPU (not CrypTen's CUDALongTensor wrapper of a CUDA one)."""
    return type(t) is torch.Tensor and t.device.type == "cpu"


def _patches_apply(*tensors: torch.Tensor, groups: int, positions: int) -> bool:
    """Whether the patches product serves: plain CPU tensors, no groups, a small output map."""
    return all(_plain_cpu(t) for t in tensors) and groups == 1 and 0 < positions <= _PATCH_POSITIONS


_LIMB_BITS = 16
_LIMBS = 4
_EXACT_TERMS = 1 << 21
"""(2^16 - 1)^2 * 2^21 < 2^53: float64 sums of this many limb products are exact integers."""


def _limbs(t: torch.Tensor) -> list[torch.Tensor]:
    """t's four 16-bit limbs (unsigned, least significant first) as float64."""
    mask = (1 << _LIMB_BITS) - 1
    return [((t >> (_LIMB_BITS * k)) & mask).to(torch.float64) for k in range(_LIMBS)]


def limb_product(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    w: torch.Tensor,
    terms: int,
) -> torch.Tensor:
    """fn(x, w) in Z/2^64 for a bilinear fn summing `terms` products per output, through float64
    on any device (CUDA has no int64 convolution): 16-bit limbs a side, exact below 2^21 terms.

    CrypTen's CUDALongTensor picks 22-bit limbs for any convolution whose kernel has fewer than
    256 taps, whatever its channels: at 512 channels x 3 x 3 (4608 terms, ResNet18) its float64
    sums pass 2^53 and lose low bits that its shifts carry up to 2^44 and more (ResNet18 on an
    H200, 2026-12-04: a decrypted loss 2.8e9 off; the 64-channel models' 576-term sums mostly
    stay below 2^53 and came out right).
    """
    if terms >= _EXACT_TERMS:
        raise ValueError(f"a product summing {terms} terms per output (at most {_EXACT_TERMS - 1})")
    xs, ws = _limbs(x), _limbs(w)
    out = fn(xs[0], ws[0]).to(torch.int64)
    for i in range(_LIMBS):
        for j in range(_LIMBS - i):  # limbs shifted past bit 63 vanish mod 2^64
            if i or j:
                out += fn(xs[i], ws[j]).to(torch.int64) << (_LIMB_BITS * (i + j))
    return out


def _off_cpu(
    fn: Callable[..., torch.Tensor], x: Any, w: Any, bias: Any, terms: int, **settings: Any
) -> Any:
    """A convolution of shares that are not plain CPU tensors, by limbs; CrypTen's wrapper of
    a CUDA share (CUDALongTensor, not a torch.Tensor) is unwrapped and the result rewrapped."""
    wrapper = next((type(t) for t in (x, w) if not isinstance(t, torch.Tensor)), None)
    raw_x, raw_w = (t if isinstance(t, torch.Tensor) else t.tensor() for t in (x, w))
    out = limb_product(lambda a, b: fn(a, b, **settings), raw_x, raw_w, terms)
    if bias is not None:
        out += bias.reshape(1, -1, *([1] * (out.dim() - 2)))
    return out if wrapper is None else wrapper(out)


def conv2d(  # noqa: PLR0917 (torch.conv2d's positional signature)
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Any:  # a CUDALongTensor for CrypTen's wrapped CUDA shares
    """torch.conv2d; an output map of a few positions as one product of patches and kernel."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    n, _, h, wd = x.shape
    out_channels, _, kh, kw = w.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    terms = w.shape[1] * kh * kw
    if not (_plain_cpu(x) and _plain_cpu(w)):
        settings = {"stride": (sh, sw), "padding": (ph, pw), "dilation": (dh, dw)}
        return _off_cpu(torch.conv2d, x, w, bias, terms, **settings, groups=groups)
    if (
        bias is None
        and groups == 1
        and ringkernels.applies(x, w, out_channels=out_channels, terms=terms)
    ):
        return ringkernels.conv2d(
            x, w, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), out_map=(oh, ow)
        )
    if bias is not None or not _patches_apply(x, w, groups=groups, positions=oh * ow):
        return torch.conv2d(x, w, bias, (sh, sw), (ph, pw), (dh, dw), groups)
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    taps = [
        padded[:, :, _tap(i, dh, sh, oh), _tap(j, dw, sw, ow)] for i in range(kh) for j in range(kw)
    ]
    rows = torch.stack(taps, dim=-1).permute(0, 2, 3, 1, 4).reshape(n * oh * ow, -1)
    out = matmul(rows, w.reshape(out_channels, -1).t())  # (N * positions, C_out)
    return out.reshape(n, oh, ow, out_channels).permute(0, 3, 1, 2).contiguous()


def _kernels_transpose(
    g: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    *,
    strides: tuple[int, int, int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> bool:
    """Whether ringkernels takes this transposed convolution: stride 1 with no output padding
    (a plain convolution of g then), no bias or groups, padding within the kernel's reach."""
    reach = [d * (k - 1) - p for d, k, p in zip(dilation, w.shape[2:], padding, strict=True)]
    return (
        strides == (1, 1, 0, 0)
        and bias is None
        and groups == 1
        and min(reach) >= 0
        and ringkernels.applies(
            g, w, out_channels=w.shape[1], terms=w.shape[0] * w.shape[2] * w.shape[3]
        )
    )


def conv_transpose2d(  # noqa: PLR0917 (torch.conv_transpose2d's positional signature)
    g: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    groups: int = 1,
    dilation: Any = 1,
) -> Any:  # a CUDALongTensor for CrypTen's wrapped CUDA shares
    """torch.conv_transpose2d; a small input map as one product, its columns added back."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    (qh, qw) = pair(output_padding)
    n, _, gh, gw = g.shape
    _, in_channels, kh, kw = w.shape
    if not (_plain_cpu(g) and _plain_cpu(w)):
        settings = {"stride": (sh, sw), "padding": (ph, pw), "dilation": (dh, dw)}
        terms = w.shape[0] // groups * kh * kw
        return _off_cpu(
            torch.conv_transpose2d,
            g,
            w,
            bias,
            terms,
            **settings,
            output_padding=(qh, qw),
            groups=groups,
        )
    if _kernels_transpose(
        g, w, bias, groups, strides=(sh, sw, qh, qw), padding=(ph, pw), dilation=(dh, dw)
    ):
        return ringkernels.conv_transpose2d(g, w, (ph, pw), (dh, dw))
    if bias is not None or not _patches_apply(g, w, groups=groups, positions=gh * gw):
        return torch.conv_transpose2d(g, w, bias, (sh, sw), (ph, pw), (qh, qw), groups, (dh, dw))
    rows = g.permute(0, 2, 3, 1).reshape(n * gh * gw, -1)
    columns = matmul(rows, w.reshape(w.shape[0], -1)).reshape(n, gh, gw, in_channels, kh, kw)
    full_h = (gh - 1) * sh + dh * (kh - 1) + 1 + qh
    full_w = (gw - 1) * sw + dw * (kw - 1) + 1 + qw
    canvas = g.new_zeros(n, in_channels, full_h, full_w)
    for i in range(kh):
        for j in range(kw):
            tap = columns[..., i, j].permute(0, 3, 1, 2)  # (N, C_in, gh, gw)
            canvas[:, :, _tap(i, dh, sh, gh), _tap(j, dw, sw, gw)] += tap
    return canvas[:, :, ph : full_h - ph, pw : full_w - pw].contiguous()


def conv2d_weight(  # noqa: PLR0917 (a product's operands, then torch's convolution settings)
    g: torch.Tensor,
    x: torch.Tensor,
    kernel_size: Any,
    padding: Any = 0,
    stride: Any = 1,
    dilation: Any = 1,
) -> torch.Tensor:
    """The kernel gradient of conv2d (groups 1) for output gradient g and input x: rows of g
    (C_out, N oh ow) times the input's patches (N oh ow, kh kw C_in), cut here.

    Bilinear in (g, x), so a Beaver triple serves it with x's own shape: the parties open x - a
    instead of its patches (kh kw times the words) and the dealer cuts the patches of a. The
    patches are cut from the input laid out channels-last, so that each tap copies runs of C_in
    words rather than single words 9 apart: 1.1-1.8x the whole gradient on the benchmark's
    shapes (8-64 channels), 7.2 -> 5.0 ms for 8 channels on 16x16 maps at batch 64.
    """
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = (
        pair(v) for v in (kernel_size, padding, stride, dilation)
    )
    n, in_channels = x.shape[:2]
    out_channels, oh, ow = g.shape[1:]
    if ringkernels.applies(g, x, out_channels=out_channels, terms=n * oh * ow):
        return ringkernels.conv2d_weight(
            g, x, kernel=(kh, kw), padding=(ph, pw), stride=(sh, sw), dilation=(dh, dw)
        )
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()
    taps = torch.empty(n, oh, ow, kh * kw, in_channels, dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            taps[:, :, :, i * kw + j] = padded[:, _tap(i, dh, sh, oh), _tap(j, dw, sw, ow)]
    rows = g.permute(1, 0, 2, 3).reshape(out_channels, n * oh * ow)
    product = matmul(rows, taps.reshape(n * oh * ow, kh * kw * in_channels))
    return product.reshape(out_channels, kh, kw, in_channels).permute(0, 3, 1, 2).contiguous()
