"""Two-party openings, and chains of products (exp, inverse square root) dealt in one request.

CrypTen's iterative functions are round-bound on small tensors: BatchNorm's inverse square root
runs 27 products in a row on C values, each a dealer round trip (1.4 ms here), an opening
(0.6 ms) and CrypTen's tensor wrappers (1.5 ms). The triples depend only on shapes, so here one
dealer request brings all of a chain's, and each product is an opening plus local arithmetic on
raw shares. The arithmetic is CrypTen's: Beaver products truncated share by share (its
two-party truncation), the same limit approximation of exp and the same initial guess for the
inverse square root. The Newton step y (3 - x y^2) / 2 is written (3 y - (y^2)(x y)) / 2: two
products in one opening, then one, so 2 rounds a step instead of 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from veiltrain import peerlink, protocol, ringmath


def on_two_cpu_parties(*shares: Any) -> bool:
    """Whether the world has two parties and these shares are CPU tensors (the fast paths')."""
    import crypten.communicator as comm

    return comm.get().get_world_size() == 2 and all(
        isinstance(s, torch.Tensor) and s.device.type == "cpu" for s in shares
    )


Masked = tuple[torch.Tensor, torch.Tensor]
"""A value's share and the triple share that masks it: x and a, opened as x - a (or x ^ a)."""


def open_masked(pairs: list[Masked], *, binary: bool | tuple[bool, ...]) -> list[torch.Tensor]:
    """Open masked values between two parties in one exchange (x - a and y - b, never a value).

    Each x - a is computed straight into the buffer that is sent (no copy of it). CrypTen's
    reveal_batch runs an all-reduce per tensor: 2.7 ms for two small ones here, where one
    isend/irecv pair of all of them took 0.44 ms and one exchange on the parties' own link
    (veiltrain.peerlink) less again; products in a row are bound by this. `binary` is one mode
    for every pair (XOR-masked bits or subtracted words) or one per pair.
    """
    shapes = [ringmath.broadcast_shape(x.shape, a.shape) for x, a in pairs]
    spans: list[tuple[int, int]] = []
    for shape in shapes:
        start = spans[-1][1] if spans else 0
        spans.append((start, start + math.prod(shape)))
    modes = (binary,) * len(pairs) if isinstance(binary, bool) else binary
    mine = torch.empty(spans[-1][1] if spans else 0, dtype=torch.int64)
    for (x, a), (lo, hi), shape, xor in zip(pairs, spans, shapes, modes, strict=True):
        (torch.bitwise_xor if xor else torch.sub)(x, a, out=mine[lo:hi].view(shape))
    opened = exchange(mine)
    if len(set(modes)) == 1:
        _unmask(opened, mine, modes[0] if modes else False)
    else:
        for (lo, hi), xor in zip(spans, modes, strict=True):
            _unmask(opened[lo:hi], mine[lo:hi], xor)
    return [opened[lo:hi].view(shape) for (lo, hi), shape in zip(spans, shapes, strict=True)]


def exchange(mine: torch.Tensor) -> torch.Tensor:
    """The other party's tensor of the same shape for ours (contiguous int64 on the CPU), over
    the parties' own link where the session made one."""
    link = peerlink.current()
    return link.exchange(mine) if link is not None else _through_gloo(mine)


def _unmask(opened: torch.Tensor, mine: torch.Tensor, xor: bool) -> None:
    """The other party's masked words combined with ours, in place: the opened values."""
    if xor:
        opened ^= mine
    else:
        opened += mine


def _through_gloo(mine: torch.Tensor) -> torch.Tensor:
    import crypten.communicator as comm

    group = comm.get().main_group
    peer = 1 - comm.get().get_rank()
    theirs = torch.empty_like(mine)
    for work in (dist.isend(mine, peer, group=group), dist.irecv(theirs, peer, group=group)):
        if work is None:
            raise RuntimeError(f"rank {comm.get().get_rank()} is not in the parties' group")
        work.wait(protocol.wait_timeout())
    return theirs


class Chain:
    """Elementwise Beaver products of one shape at fixed-point `scale`, `count` triples dealt
    in one request; `products` spends one triple per pair and one opening per call."""

    def __init__(self, shape: tuple[int, ...], count: int, scale: int, rank: int) -> None:
        size = (count, *shape)
        self._a, self._b, self._pending = protocol.additive_parts(size, size, "mul")
        self._c: torch.Tensor | None = None
        self._next, self._scale, self._rank = 0, scale, rank

    def products(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """[x * y] for each ([x], [y]) pair, truncated back to the scale, in one opening."""
        rows = range(self._next, self._next + len(pairs))
        if rows.stop > self._a.shape[0]:
            raise RuntimeError(f"a chain of {self._a.shape[0]} products asked for {rows.stop}")
        self._next = rows.stop
        masked = [
            m
            for i, (x, y) in zip(rows, pairs, strict=True)
            for m in ((x, self._a[i]), (y, self._b[i]))
        ]
        opened = open_masked(masked, binary=False)
        return [self._finish(i, opened[2 * k], opened[2 * k + 1]) for k, i in enumerate(rows)]

    def _c_row(self, row: int) -> torch.Tensor:
        if self._c is None:
            self._c = self._pending()  # the dealer computed it while the parties exchanged
        return self._c[row]

    def _finish(self, row: int, epsilon: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        a, b = self._a[row], self._b[row]
        z = finish_product(lambda: self._c_row(row), a, b, epsilon, delta, self._rank)
        return ringmath.trunc_div_(z, self._scale)  # CrypTen's two-party truncation


def finish_product(  # noqa: PLR0917 (the triple, the openings, the rank: all needed)
    c: protocol.Pending,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: torch.Tensor,
    delta: torch.Tensor,
    rank: int,
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.mul,
) -> torch.Tensor:
    """This party's share of x y from the triple (a, b, c) and the openings eps = x - a,
    delta = y - b: eps (b + delta) + a delta + c, with c asked for last.

    x y = c + eps b + a delta + eps delta; the public eps delta must be counted once, so party 0
    folds it into eps (b + delta): two local products instead of CrypTen's three. Neither needs
    c, so party 0 computes both while the dealer computes c, and waits only for what is left:
    waiting first left one of the two cores idle in 24 % of a ResNet-style step.
    """
    right = b + delta if rank == 0 else b
    z = product(epsilon, right)
    z += product(a, delta)
    z += c()
    return z


class Shares:
    """Fixed-point helpers on one party's raw shares (party 0 carries public constants)."""

    def __init__(self, scale: int, rank: int) -> None:
        self.scale, self.rank = scale, rank

    def add(self, x: torch.Tensor, value: float) -> torch.Tensor:
        """[x] + value."""
        return x + int(round(value * self.scale)) if self.rank == 0 else x.clone()

    def mul(self, x: torch.Tensor, value: float) -> torch.Tensor:
        """[x] * value for a public real value (encode, multiply, truncate)."""
        return ringmath.trunc_div_(x * int(round(value * self.scale)), self.scale)

    @staticmethod
    def div(x: torch.Tensor, divisor: int) -> torch.Tensor:
        """[x] / divisor for a public integer (local truncation, as CrypTen's div)."""
        return ringmath.trunc_div_(x.clone(), divisor)


def exp_count(iterations: int) -> int:
    """Products `exp` spends: one squaring per iteration."""
    return iterations


def exp(x: torch.Tensor, iterations: int, chain: Chain, fx: Shares) -> torch.Tensor:
    """CrypTen's exp: (1 + x / 2^n)^(2^n) by n squarings, one opening each."""
    result = fx.add(Shares.div(x, 2**iterations), 1.0)
    for _ in range(iterations):
        (result,) = chain.products([(result, result)])
    return result


def inv_sqrt_count(exp_iterations: int, newton_steps: int) -> int:
    """Products `inv_sqrt` spends: the initial guess's exp, then three per Newton step."""
    return exp_count(exp_iterations) + 3 * newton_steps


def inv_sqrt(
    x: torch.Tensor, exp_iterations: int, newton_steps: int, chain: Chain, fx: Shares
) -> torch.Tensor:
    """CrypTen's inverse square root: y0 = 2.2 exp(-(x/2 + 0.2)) + 0.2 - x/1024, then Newton."""
    guess = exp(fx.add(Shares.div(x, 2), 0.2).neg(), exp_iterations, chain, fx)
    y = fx.add(fx.mul(guess, 2.2), 0.2) - Shares.div(x, 1024)
    for _ in range(newton_steps):
        square, scaled = chain.products([(y, y), (x, y)])
        (cube,) = chain.products([(square, scaled)])  # x y^3
        y = Shares.div(3 * y - cube, 2)
    return y


def run(fn: Any, value: Any, count: int, **kwargs: Any) -> Any:
    """fn on an MPCTensor's shares with `count` triples dealt in one request; an MPCTensor."""
    import crypten.communicator as comm

    shares = value._tensor.share
    scale, rank = int(value.encoder.scale), comm.get().get_rank()
    chain = Chain(tuple(shares.shape), count, scale, rank)
    result = value.shallow_copy()
    result._tensor = value._tensor.shallow_copy()
    result._tensor.share = fn(shares, chain=chain, fx=Shares(scale, rank), **kwargs)
    return result
