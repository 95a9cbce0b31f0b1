"""Exact truncation of two-party products: no 2^48 error when the shares' sum overflows.

After a fixed-point product each party divides its own share by 2^f (CrypTen's two-party
truncation, `ringmath.trunc_div_`). That is right to one unit unless the two shares' sum wraps
around the ring, which for a value x (at scale 2^2f) happens with probability about |x| / 2^64
and leaves the result 2^(64-f) off: one activation 2^32 off in real terms. ResNet18 meets one in
about 435 steps (bench/bench_truncation.py), which makes long runs fail (README, "Truncation
wraps").

Here the parties open c = x + 2^62 - r for a mask r that the dealer dealt with shares of
t = r >> f and m = msb(r) 2^(64-f) (r, c read as unsigned). For 0 <= x + 2^62 < 2^63, that is
|x| < 2^62, the sum c + r wraps exactly when msb(c) or msb(r) is set (if exactly one is set, the
sum is at least 2^63, which x + 2^62 is not, so it wrapped), so

    (x + 2^62) >> f = (c >> f) + t - 2^(64-f) [msb(c) or msb(r)] + carry,

where carry (0 or 1) is the carry out of the low f bits of c + r. With msb(c) public the wrap
term is linear in the shared m, and without the carry (x >> f) = (c >> f) + t - msb(c) 2^(64-f)
- (1 - msb(c)) m - 2^(62-f) is off by at most one unit below (CrypTen's truncation is off by up
to one either way).
One opening of one word a value, and the dealer's two words a value to party 0. The idea is the
probabilistic truncation with a dealt most significant bit of Escudero et al. (CRYPTO 2020);
the code is this project's.

Secrecy: c is x + 2^62 minus a uniform mask, a uniform word to either party; party 0's shares
of t and m are uniform words (party 1's draws, which party 0 does not know, are subtracted).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch

from veiltrain import chains, protocol, ringmath

if TYPE_CHECKING:
    from veiltrain.config import RunConfig

OFFSET_BITS = 62
"""x + 2^62 is in [0, 2^63) for |x| < 2^62: the domain in which the result is exact."""

AUTO_WRAPS = 0.01
"""`--truncation auto` truncates exactly when a run expects this many share-wise wraps or more."""
MAGNITUDE = 1.0
"""The |value| assumed for each forward product in that estimate: the bench's three models
average 0.43-0.50 at their initial weights on standardised inputs (bench/bench_truncation.py);
twice that leaves room for training's growth."""

Mode = Literal["local", "exact"]

_active = [False]


def expected_wraps(values_per_step: int, steps: int, precision_bits: int) -> float:
    """Share-wise wraps a run expects from the number of forward products it truncates: each
    value x (at scale 2^2f) wraps with probability |x| / 2^64."""
    return values_per_step * steps * MAGNITUDE * 2.0 ** (2 * precision_bits - 64)


def choose(cfg: RunConfig, count: int) -> tuple[Mode, float | None]:
    """How a run's parties truncate forward products, 'local' or 'exact', and for `--truncation
    auto` on two CPU parties the share-wise wraps the run would expect (else None). `auto` is
    exact from AUTO_WRAPS on. From the model's shapes (its stored spec), the batch size and
    the run's steps over `count` records: nothing the parties do not know, as they see it."""
    if cfg.truncation != "auto":
        return cfg.truncation, None
    if cfg.parties != 2 or cfg.device != "cpu":
        return "local", None  # CrypTen's own truncation runs there
    from veiltrain import models, schedule
    from veiltrain.contract import PRIVATE_MODEL_SPEC, ModelSpec, owner_location, read_model

    spec = read_model(owner_location(cfg), PRIVATE_MODEL_SPEC, ModelSpec)
    model = models.build(spec.factory, spec.kwargs)  # shapes only: fresh weights
    values = models.forward_products(model, spec.sample_shape, cfg.batch_size)
    steps = schedule.steps_total(cfg.epochs, count, cfg.batch_size)
    expected = expected_wraps(values, steps, cfg.precision_bits)
    return ("exact" if expected >= AUTO_WRAPS else "local"), expected


@contextmanager
def exact_products(enabled: bool = True) -> Iterator[None]:
    """Within: the fast path truncates every fixed-point product of shares exactly (`active`).
    The trainer wraps the forward pass in it when the job asks for exact truncation: a wrap
    there corrupts the step's loss. The backward pass stays share-wise: a wrapped kernel
    gradient is dropped by the update's guard, and wraps emulated in input and kernel gradients
    left training as it was (README, "Truncation wraps")."""
    saved = _active[0]
    _active[0] = enabled
    try:
        yield
    finally:
        _active[0] = saved


def active() -> bool:
    """Whether products are truncated exactly here (inside `exact_products`)."""
    return _active[0]


def trunc_exact(share: torch.Tensor, bits: int, rank: int) -> torch.Tensor:
    """This party's share of [x] >> bits (within one unit below), for its share of x (int64,
    CPU, two parties); one opening between the parties and one dealer request."""
    flat = share.reshape(-1)
    if not flat.numel():
        return share.clone()
    r, pending = protocol.trunc_parts(flat.numel(), bits)
    (c,) = chains.open_masked([(offset(flat, rank), r)], binary=False)
    return finish(c, pending(), bits, rank).reshape(share.shape)


def offset(share: torch.Tensor, rank: int) -> torch.Tensor:
    """This party's share of x + 2^62 (party 0 adds the constant)."""
    return share + (1 << OFFSET_BITS) if rank == 0 else share


def finish(c: torch.Tensor, dealt: torch.Tensor, bits: int, rank: int) -> torch.Tensor:
    """This party's share of x >> bits from the opened c = x + 2^62 - r and its (2, n) shares
    of t = r >> bits and m = msb(r) 2^(64 - bits): t - m where msb(c) is clear, and party 0's
    public part (c >> bits) - msb(c) 2^(64 - bits) - 2^(62 - bits)."""
    top = c < 0  # msb(c): then the sum wrapped whatever r was
    z = dealt[1].masked_fill(top, 0).neg_().add_(dealt[0])
    if rank == 0:
        z += ringmath.shift_right_logical(c, bits)
        z -= top.long() << (64 - bits)
        z -= 1 << (OFFSET_BITS - bits)
    return z
