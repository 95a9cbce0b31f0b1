"""Benchmark: how often CrypTen's share-wise truncation is expected to wrap in a training step.

Two parties truncate a product x (at scale 2^2f) each on its own share (ringmath.trunc_div_);
when the two shares' sum overflows as signed words the result is off by 2^(64-f) (2^32 in real
terms at f = 16), with a probability of about |x| / 2^64. This measures that probability on the
real truncation code with random shares (Monte Carlo), then estimates the expected wraps of one
training step of each model from a plaintext step's magnitudes: every convolution and linear
output, BatchNorm's two per-value products (the centred value squared, and times
weight / sqrt(var)), the input and kernel gradients (at losses.GRAD_SCALE x their size, as the
parties backpropagate them). An estimate from a model of the protocol's
truncations, not a count taken from the parties (they never see the values).

    python bench/bench_truncation.py [--models small-cnn,resnet-style,resnet18]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_models import build
from veiltrain import losses, ringmath
from veiltrain.sharing import DEFAULT_PRECISION_BITS

CASES = {"small-cnn": ((1, 8, 8), 128), "resnet-style": ((3, 32, 32), 64)}
CASES["resnet18"] = ((3, 32, 32), 32)  # the bench's shapes and batches (bench_summary.CASES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default=",".join(CASES))
    p.add_argument("--out", type=Path, default=Path("bench/results/truncation.json"))
    return p.parse_args(argv)


def wrap_rate(raw_bits: int, samples: int = 1 << 22, seed: int = 0) -> dict[str, Any]:
    """Wraps of two-party truncation by 2^f for |x| = 2^raw_bits, against |x| / 2^64."""
    gen = torch.Generator().manual_seed(seed)  # Monte Carlo shares: nothing secret here
    x = torch.full((samples,), 1 << raw_bits, dtype=torch.int64)
    x[::2] = -x[::2]
    share0 = torch.randint(-(2**63), 2**63 - 1, (samples,), dtype=torch.int64, generator=gen)
    share1 = x - share0  # wraps mod 2^64, as shares do
    divisor = 1 << DEFAULT_PRECISION_BITS
    total = ringmath.trunc_div_(share0, divisor) + ringmath.trunc_div_(share1, divisor)
    wrapped = int(((total - torch.div(x, divisor, rounding_mode="trunc")).abs() > 1).sum())
    return {
        "raw_bits": raw_bits,
        "samples": samples,
        "wraps": wrapped,
        "rate": wrapped / samples,
        "predicted": 2.0 ** (raw_bits - 64),
    }


def step_magnitudes(name: str, shape: tuple[int, ...], batch: int) -> dict[str, list[float]]:
    """Per kind of truncated product: [values, sum of |value|] over one plaintext step."""
    model = build(name, shape, 10)
    seen: dict[str, list[float]] = {}
    hooks = [
        h
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d)
        for h in (m.register_forward_hook(_forward(seen)), m.register_full_backward_hook(
            _backward(seen)))
    ]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    with warnings.catch_warnings():  # the first layer's hook: its input needs no gradient
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        nn.functional.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    for p in model.parameters():
        if p.dim() > 1 and p.grad is not None:
            _add(seen, "kernel gradients", p.grad)
    for kind in ("input gradients", "kernel gradients"):  # the parties' loss scaling
        seen[kind][1] *= losses.GRAD_SCALE
    return seen


def _add(seen: dict[str, list[float]], kind: str, t: torch.Tensor) -> None:
    entry = seen.setdefault(kind, [0.0, 0.0])
    entry[0] += t.numel()
    entry[1] += float(t.detach().abs().double().sum())


def _forward(seen: dict[str, list[float]]) -> Any:
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(module, nn.BatchNorm2d):
            centred = inputs[0] - inputs[0].mean(dim=(0, 2, 3), keepdim=True)
            _add(seen, "BatchNorm: centred squared", centred * centred)
            _add(seen, "BatchNorm: centred times scale", out - module.bias.view(1, -1, 1, 1))
        else:
            _add(seen, f"{type(module).__name__} outputs", out)

    return hook


def _backward(seen: dict[str, list[float]]) -> Any:
    def hook(module: nn.Module, grad_in: Any, grad_out: Any) -> None:
        for g in grad_in:
            if g is not None:
                _add(seen, "input gradients", g)

    return hook


def expected_wraps(name: str, precision_bits: int = DEFAULT_PRECISION_BITS) -> dict[str, Any]:
    """One model's estimate: values truncated a step, expected wraps a step, by kind."""
    shape, batch = CASES[name]
    seen = step_magnitudes(name, shape, batch)
    per_unit = 2.0 ** (2 * precision_bits - 64)  # |v| real is |v| 2^2f raw
    wraps = {kind: total * per_unit for kind, (_, total) in seen.items()}
    expected = sum(wraps.values())
    return {
        "batch": batch,
        "values_truncated": int(sum(n for n, _ in seen.values())),
        "expected_wraps_per_step": expected,
        "steps_per_expected_wrap": round(1 / expected) if expected else None,
        "by_kind": {k: {"values": int(seen[k][0]), "expected": v} for k, v in wraps.items()},
    }


def run(models: list[str]) -> dict[str, Any]:
    checks = [wrap_rate(bits) for bits in (48, 52, 56)]
    return {
        "benchmark": "truncation",
        "monte_carlo": checks,
        "models": {name: expected_wraps(name) for name in models if name in CASES},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args.models.split(","))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
