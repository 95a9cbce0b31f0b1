"""Sign bits of two-party shares with a bit-sliced carry tree (CrypTen's `_ltz`, fewer AND gates).

x < 0 is the top bit of s0 + s1 (mod 2^64), that is s0_63 ^ s1_63 ^ (the carry into bit 63). CrypTen
computes the whole sum in binary shares with a Kogge-Stone adder: 13 secure ANDs of N words for N
values, 7 dealer round trips. Only the carry into the top bit is needed, and a tree that merges
(generate, propagate) pairs halves the gates at every level. The bits are bit-sliced (plane k packs
bit k of 64 values into one word), so a level's gates are whole planes: 181 planes of N/64 words in
all (2.8 N words), and two dealer requests serve every level (the generate bits', below, and the
tree's), asked for together: triples are data-independent. At each level P_hi enters two gates
(P_hi & G_lo and P_hi & P_lo): it is opened once, its two triples dealt on one mask, so a level
opens 3 planes per pair where two independent gates opened 4 (`spread`).

The first level, generate = s0 & s1, ANDs two private inputs (party 0's share's bits with party
1's): each party opens only its own input, XOR-ed with a mask that only it and the dealer drew
(fastpath._PrivateAnd), so each sends 63 planes there instead of a Beaver AND's 126.

Security is CrypTen's: every opened value is a gate input XOR-ed with a fresh mask (a triple
word, or the private AND's own-input mask), and the result goes through CrypTen's single-bit B2A
or veiltrain's dealt select.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WORD_BITS = 64
CARRY_BITS = WORD_BITS - 1
"""Bits 0..62 decide the carry into the sign bit."""

AndFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A level's gates: and_fn(left, right) = spread(left) & right, left with one row per pair."""


# Masks of the bit positions whose index has bit j clear, for each swap width j of the transpose.
_SWAP_MASKS = {
    32: 0x00000000FFFFFFFF,
    16: 0x0000FFFF0000FFFF,
    8: 0x00FF00FF00FF00FF,
    4: 0x0F0F0F0F0F0F0F0F,
    2: 0x3333333333333333,
    1: 0x5555555555555555,
}


def to_planes(words: torch.Tensor) -> torch.Tensor:
    """(N,) int64 -> (64, ceil(N/64)) int64: row k packs bit k of element e at word e // 64.

    Each block of 64 words is a 64x64 bit matrix, transposed in place by six rounds of masked
    swaps (row r's columns c + j with row r + j's columns c), all blocks at once: 20 ms for 262k
    words where numpy's unpack, transpose and pack took 115 ms.
    """
    flat = words.reshape(-1)
    blocks = -(-flat.numel() // WORD_BITS)
    matrix = torch.zeros(blocks * WORD_BITS, dtype=torch.int64, device=flat.device)
    matrix[: flat.numel()] = flat
    matrix = matrix.view(blocks, WORD_BITS)
    for width, mask in _SWAP_MASKS.items():
        pairs = matrix.view(blocks, WORD_BITS // (2 * width), 2, width)
        low, high = pairs[:, :, 0, :], pairs[:, :, 1, :]
        # The arithmetic shift's sign copies land on positions the mask clears.
        swap = ((low >> width) ^ high) & mask
        high ^= swap
        low ^= swap << width
    return matrix.t().contiguous()


def from_plane(plane: torch.Tensor, count: int) -> torch.Tensor:
    """A packed plane back to `count` int64 values of 0 or 1 (inverse of a `to_planes` row)."""
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=plane.device)
    return ((plane.unsqueeze(1) >> shifts) & 1).reshape(-1)[:count]


def level_rows(groups: int) -> int:
    """AND rows one tree level spends on `groups` groups: P_hi & G_lo per pair, P_hi & P_lo but
    for the lowest pair (the lowest group never needs its propagate: nothing carries into bit 0)."""
    pairs = groups // 2
    return 2 * pairs - 1 if pairs else 0


def spread(left: torch.Tensor) -> torch.Tensor:
    """A level's left operands row by row against its right ones: P_hi of every pair (against
    G_lo), then P_hi of every pair but the lowest (against P_lo)."""
    return torch.cat([left, left[1:]])


def left_rows() -> int:
    """Rows of left operands (and of their masks) over the whole tree: one per pair a level."""
    rows, groups = 0, CARRY_BITS
    while groups > 1:
        rows += groups // 2
        groups -= groups // 2
    return rows


def spread_index() -> torch.Tensor:
    """For each gate row of the tree (`tree_rows` of them, level by level), the row of its left
    operand among `left_rows` (level by level): where the dealer finds each gate's mask."""
    index, groups, start = [], CARRY_BITS, 0
    while groups > 1:
        pairs = groups // 2
        index += [*range(start, start + pairs), *range(start + 1, start + pairs)]
        start += pairs
        groups -= pairs
    return torch.tensor(index, dtype=torch.int64)


def triple_rows() -> list[int]:
    """Rows of AND gates per round: the generate bits, then each level of the carry tree."""
    rows, groups = [CARRY_BITS], CARRY_BITS
    while groups > 1:
        rows.append(level_rows(groups))
        groups -= groups // 2
    return rows


def carry_into_top(g: torch.Tensor, p: torch.Tensor, and_fn: AndFn) -> torch.Tensor:
    """The carry out of rows 0..62 from (generate, propagate) planes, one `and_fn` per level.

    `and_fn(left, right)` ANDs `spread(left)` with `right` (XOR shares in MPC, plain words in
    tests): left holds each pair's P_hi once. Merging (G_lo, P_lo) under (G_hi, P_hi) gives
    (G_hi ^ P_hi & G_lo, P_hi & P_lo); XOR is OR here because a group cannot both generate and
    propagate.
    """
    while g.shape[0] > 1:
        pairs = g.shape[0] // 2
        p_hi = p[1 : 2 * pairs : 2]
        lows = torch.cat([g[0 : 2 * pairs : 2], p[2 : 2 * pairs : 2]])
        products = and_fn(p_hi, lows)
        merged_g = g[1 : 2 * pairs : 2] ^ products[:pairs]
        # Row 0 of p is never read (the lowest group's propagate): any row keeps indices aligned.
        merged_p = torch.cat([p_hi[:1], products[pairs:]])
        g = torch.cat([merged_g, g[2 * pairs :]])
        p = torch.cat([merged_p, p[2 * pairs :]])
    return g[0]


def sign_planes(
    own: torch.Tensor, and_fn: AndFn, private_and: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """This party's XOR share of the packed sign bits of s0 + s1, from its share's planes.

    Party 0 is the first addend, party 1 the second; each holds all of its addend. Generate =
    s0 & s1 is an AND of two private inputs (`private_and`: each party gives its own planes),
    propagate = s0 ^ s1 is local (each party's planes are its XOR share of it).
    """
    generate = private_and(own[:CARRY_BITS])
    return own[CARRY_BITS] ^ carry_into_top(generate, own[:CARRY_BITS], and_fn)


def tree_rows() -> int:
    """AND rows of the carry tree: every level but the generate bits."""
    return sum(triple_rows()[1:])
