"""Benchmark: protocol randomness from veiltrain's AES-256-CTR streams next to torch.randint.

The cost of closing CrypTen's 32-bit generator hole: MiB/s of ring elements and of 1-bit values
(B2A bits) drawn from a keyed KeyStream and from a seeded torch.Generator, in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from veiltrain import protocol

MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=64, help="int64 values drawn per measurement")
    p.add_argument("--repeat", type=int, default=5, help="take the best of this many runs")
    p.add_argument("--out", type=Path, default=Path("bench/results/rng.json"))
    return p.parse_args(argv)


def best_mib_s(repeat: int, mib: int, fn: Callable[[], Any]) -> float:
    """MiB/s of the best of `repeat` runs (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(mib / min(times), 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both generators on ring elements and on bits, one thread (as a party runs)."""
    torch.set_num_threads(1)
    count = args.mib * MIB // 8
    stream = protocol.KeyStream.fresh()
    generator = torch.Generator()
    generator.manual_seed(1)

    def torch_ring() -> Any:
        return torch.randint(-(2**63), 2**63 - 1, (count,), generator=generator)

    def torch_bits() -> Any:
        return torch.randint(0, 2, (count,), generator=generator)

    figures = {
        "keystream_ring_mib_s": best_mib_s(
            args.repeat, args.mib, lambda: protocol.random_ring_element((count,), generator=stream)
        ),
        "torch_ring_mib_s": best_mib_s(args.repeat, args.mib, torch_ring),
        "keystream_bits_mib_s": best_mib_s(
            args.repeat,
            args.mib,
            lambda: protocol.kbit_random_tensor((count,), bitlength=1, generator=stream),
        ),
        "torch_bits_mib_s": best_mib_s(args.repeat, args.mib, torch_bits),
    }
    figures["keystream_vs_torch_ring"] = round(
        figures["keystream_ring_mib_s"] / figures["torch_ring_mib_s"], 2
    )
    return {
        "benchmark": "protocol randomness",
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "torch": torch.__version__,
        "mib_per_measurement": args.mib,
        **figures,
    }


def main(argv: list[str] | None = None) -> int:
    """Run and write the JSON report."""
    args = parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
