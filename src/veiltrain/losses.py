"""Training losses on shares whose decrypted value tracks the plaintext loss step for step."""

from __future__ import annotations

from typing import Any

import crypten
import torch

GRAD_SCALE = 256
"""Loss scaling: the backward pass runs on GRAD_SCALE x the gradient and the update divides it
back out (mpc.sgd_step's `scale`). Backpropagated gradients shrink layer by layer, and at
2^-16 a unit of rounding a truncation adds was as large as the gradient itself in ResNet18's
first layers: their kernel gradients came out 0.5-2.2 of their size off (relative norm), the
last layer's 0.08; at 256x all are within 0.013-0.027 (NOTES.md, fifteenth session). Every step
of the backward pass is linear in the incoming gradient, so the scale changes nothing else; it
makes backward values 256x larger, so a share-wise truncation of one wraps 256x as often, and
the update's guard (which drops gradients a wrap puts 2^32 off) scales its threshold to match."""


def value_and_grad(kind: str, output: Any, target: Any, scale: int = 1) -> tuple[Any, Any]:
    """What the party stores for the owner (veiltrain.lossterms) and `scale` times the gradient
    with respect to `output`, both shares, no autograd."""
    return mse(output, target, scale) if kind == "mse" else cross_entropy(output, target, scale)


def mse(output: Any, target: Any, scale: int = 1) -> tuple[Any, Any]:
    """Mean squared error over all elements (stored as it is) and `scale` x its gradient."""
    with crypten.no_grad():
        diff = output.sub(target)
        loss = diff.square().mean()
        grad = diff.mul(2.0 * scale / diff.nelement())
    return loss.reshape(1), grad


def cross_entropy(logits: Any, target: Any, scale: int = 1) -> tuple[Any, Any]:
    """The cross-entropy's terms `[sum(max - z_y), s_1..s_N]` and its gradient.

    CrypTen takes the log of every softmax probability on shares, where its approximation is
    worst (near 0 and 1): the decrypted loss ran 0.01-0.04 above plaintext and several units
    off on confident predictions. In log-sum-exp form the loss is `mean(log s_i + max_i - z_y)`
    with `s_i = sum_j exp(z_ij - max_i)` in [1, K]; the owner takes the log in floating point
    (veiltrain.lossterms), so no log runs on shares at all. The gradient is CrypTen's own,
    (softmax - target) / N, with softmax = exp(z - max) / s as CrypTen computes it, times
    `scale` (an integer: multiplying shares by it is exact) before the division by N.
    """
    rows, classes = logits.size()
    with crypten.no_grad():
        top = row_max(logits)
        exps = floored(logits.sub(top)).exp()
        total = exps.sum(dim=1, keepdim=True)
        offset = top.sub(logits.mul(target).sum(dim=1, keepdim=True)).sum().reshape(1)
        terms = crypten.cat([offset, total.reshape(-1)])
        grad = exps.mul(_reciprocal(total, classes)).sub(target).mul(scale).div(rows)
    return terms, grad


EXP_FLOOR = 32.0
"""Where z - max is clamped before exp: exp(-32) = 1.3e-14 is far below the fixed point's 2^-16,
so the clamp changes nothing stored. CrypTen's exp is (1 + x/256)^256, whose base turns negative
below x = -256: logits spread wider than that gave garbage sums (-1.7e9 at a spread of 300) and
gradients to match (tests/test_losses.py)."""


def floored(shifted: Any) -> Any:
    """max(x, -EXP_FLOOR) of shares: one batched comparison over the batch's logits."""
    return shifted.add(EXP_FLOOR).relu().sub(EXP_FLOOR)


def _reciprocal(total: Any, classes: int) -> Any:
    """1 / s for s in [1, K]: the best linear guess on [1, K], then Newton steps y(2 - s y).

    The guess is within E = 1 - 8K / ((1+K)^2 + 4K) relative (0.5 for K = 10) and each step
    squares the error: 4 steps (8 rounds) reach 2e-5 for K = 10. CrypTen's reciprocal starts
    from exp() and takes ten steps (about 28 rounds).
    """
    slope = 8.0 / ((1 + classes) ** 2 + 4 * classes)
    error = 1 - slope * classes
    guess = total.mul(-slope).add(slope * (1 + classes))
    steps = 0
    while error > 1e-4:
        error, steps = error * error, steps + 1
    for _ in range(steps):
        guess = guess.mul(guess.mul(total).neg().add(2.0))
    return guess


def row_max(values: Any) -> Any:
    """Each row's maximum of an (N, K) tensor: one batched comparison, ties broken by position.

    CrypTen's pairwise max breaks ties at random (a second comparison and a random draw) and
    returns an argmax nobody here uses. Comparing z_i > z_j for j < i and z_i >= z_j for j > i
    marks exactly one maximum per row (the first), so the product of the bits is a one-hot.
    """
    classes = values.size(1)
    rolled = [values.roll(shift, dims=1) for shift in range(1, classes)]
    diffs = crypten.stack([values.sub(other) for other in rolled])  # [r, n, i]: z_i - z_(i-r)
    # j = i - r (mod K) comes before i exactly when r <= i: there the test is strict (one ulp).
    earlier = torch.tensor(
        [[float(r <= i) for i in range(classes)] for r in range(1, classes)], device=values.device
    )
    wins = diffs.sub(earlier.unsqueeze(1) / values.encoder.scale).ge(0.0)
    return values.mul(_product(wins)).sum(dim=1, keepdim=True)


def _product(bits: Any) -> Any:
    """The product over dimension 0 in ceil(log2(n)) rounds (halves multiplied pairwise)."""
    while bits.size(0) > 1:
        half = bits.size(0) // 2
        paired = bits[:half].mul(bits[half : 2 * half])
        bits = crypten.cat([paired, bits[2 * half :]]) if bits.size(0) % 2 else paired
    return bits[0]
