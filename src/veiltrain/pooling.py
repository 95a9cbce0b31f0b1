"""Max pooling on shares as a tournament: k - 1 comparisons a window of k where CrypTen makes k^2.

CrypTen's `max_pool2d` takes each window's one-hot argmax pairwise: every value against every
other (k(k-1) comparisons), then a random tie-break (k more comparisons and a random draw). For
ResNet18's 2x2 stem pooling that is 16 comparisons a window and 18 % of a party's step. Here
candidates meet in rounds: each match is one comparison (the left one wins ties, so exactly one
index is hot) and one Beaver product that selects the winner's value and its one-hot; all the
matches of a round share one comparison call. The one-hot keeps CrypTen's layout, so CrypTen's
backward routes the gradient unchanged.
"""

from __future__ import annotations

from typing import Any

import crypten
from crypten.common.functions.pooling import _pool2d_reshape

# CrypTen pads each party's share with this (its comment: very negative, yet small enough for
# the products that follow); kept so that padded windows pool exactly as CrypTen's do.
_PAD_SHARE = -(2**24)

Candidate = tuple[Any, Any]  # (value (...), one-hot over the indices it covers (..., s) | None)


def max_pool2d(  # noqa: PLR0917 (CrypTen's positional signature)
    self: Any,
    kernel_size: Any,
    padding: Any = 0,
    stride: Any = None,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    """CrypTen's MPCTensor.max_pool2d, same arguments and results, by tournament."""
    windows = self.clone()
    windows.data, output_size = _pool2d_reshape(
        self.data,
        kernel_size,
        padding=padding,
        stride=stride,
        dilation=dilation,
        ceil_mode=ceil_mode,
        pad_value=_PAD_SHARE,
    )
    values, one_hot = tournament(windows)
    values = values.view(output_size)
    if not return_indices:
        return values
    kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    return values, one_hot.view(*output_size, *kernel)


def tournament(x: Any) -> tuple[Any, Any]:
    """The max over the last dimension and its one-hot argmax (the first maximum on ties)."""
    candidates: list[Candidate] = [(x[..., i], None) for i in range(x.size(-1))]
    while len(candidates) > 1:
        pairs = list(zip(candidates[0::2], candidates[1::2], strict=False))
        rest = candidates[len(pairs) * 2 :]
        lefts = crypten.stack([left[0] for left, _ in pairs])
        rights = crypten.stack([right[0] for _, right in pairs])
        wins = lefts.ge(rights)  # one comparison call for the whole round
        candidates = [_match(a, b, wins[i]) for i, (a, b) in enumerate(pairs)] + rest
    value, one_hot = candidates[0]
    return value, one_hot if one_hot is not None else _single_hot(value)


def _match(left: Candidate, right: Candidate, win: Any) -> Candidate:
    """The winner's value and one-hot: right + win (left - right), [win hot_l, hot_r - win hot_r].

    win is 0/1 at scale 1, so its product needs no truncation whatever the other operand's scale:
    the value difference (scale 2^f) and both one-hots (scale 1) go in one Beaver product. A
    single value's one-hot is the constant 1, so win itself is its selected part.
    """
    (left_value, left_hot), (right_value, right_hot) = left, right
    parts = [(left_value - right_value).unsqueeze(-1)]
    parts += [hot for hot in (left_hot, right_hot) if hot is not None]
    joined = crypten.cat(parts, dim=-1)
    bit = win.unsqueeze(-1)
    selected = bit * joined  # broadcast: the bit's triple factor and opening stay one word
    value = right_value + selected[..., 0]
    hots = selected[..., 1:]
    hots.encoder = win.encoder  # the slice kept the value's scale; its words are 0/1 at scale 1
    width = 0 if left_hot is None else left_hot.size(-1)
    left_part = bit if left_hot is None else hots[..., :width]
    right_part = (1 - bit) if right_hot is None else right_hot - hots[..., width:]
    return value, crypten.cat([left_part, right_part], dim=-1)


def _single_hot(value: Any) -> Any:
    """The one-hot of a window of one element: a public 1 at scale 1."""
    from crypten.encoder import FixedPointEncoder

    zero = (value * 0).unsqueeze(-1)
    zero.encoder = FixedPointEncoder(precision_bits=0)
    return zero + 1
