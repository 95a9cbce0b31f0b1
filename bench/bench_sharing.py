"""Benchmark: secret-sharing throughput (full and seed-compressed) next to a raw file write."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cryptography
import numpy as np
from cryptography.hazmat.backends.openssl import backend as openssl_backend

from veiltrain.sharing import SeedShare, encode, split, split_full

MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=256, help="size of the encoded tensor in MiB")
    p.add_argument("--parties", type=int, default=2, help="number of compute parties (>= 2)")
    p.add_argument("--repeat", type=int, default=3, help="take the best of this many runs")
    p.add_argument("--out", type=Path, default=Path("bench/results/sharing.json"))
    p.add_argument("--tmpdir", type=Path, default=None, help="where the temp files go")
    p.add_argument("--fsync", action="store_true", help="fsync each file (measure the disk)")
    return p.parse_args(argv)


def best_of(repeat: int, fn: Callable[[], None]) -> float:
    """Best wall time of repeat runs: the least disturbed by other load on the machine."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_array(a: np.ndarray, path: Path, fsync: bool) -> None:
    with path.open("wb") as f:
        a.tofile(f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_seeds(seeds: list[SeedShare], path: Path, fsync: bool) -> None:
    with path.open("w") as f:
        json.dump([s.to_json() for s in seeds], f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def make_data(mib: int) -> np.ndarray:
    """Realistic encoded data: standardised floats at 16 fractional bits (not timed)."""
    x = np.random.default_rng(0).standard_normal(mib * MIB // 8)
    return encode(x)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity) if affinity is not None else None,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "cryptography": cryptography.__version__,
        "openssl": openssl_backend.openssl_version_text(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = make_data(args.mib)
    n, size = args.parties, data.nbytes
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        d = Path(tmp)

        def raw_write(copies: int) -> Callable[[], None]:
            def write() -> None:
                for i in range(copies):
                    write_array(data, d / f"raw{i}.bin", args.fsync)

            return write

        def full_mem() -> None:
            split_full(data, n)

        def full_write() -> None:
            for i, share in enumerate(split_full(data, n)):
                write_array(share, d / f"full{i}.bin", args.fsync)

        def seeded_mem() -> None:
            split(data, n)

        def seeded_write() -> None:
            share0, seeds = split(data, n)
            write_array(share0, d / "share0.bin", args.fsync)
            write_seeds(seeds, d / "seeds.json", args.fsync)

        cases: dict[str, tuple[int, Callable[[], None]]] = {
            "raw_write_1x": (size, raw_write(1)),
            "raw_write_nx": (n * size, raw_write(n)),
            "split_seeded_memory": (size, seeded_mem),
            "split_seeded_write": (size, seeded_write),
            "split_full_memory": (n * size, full_mem),
            "split_full_write": (n * size, full_write),
        }
        results = {}
        for name, (nbytes, fn) in cases.items():
            seconds = best_of(args.repeat, fn)
            results[name] = {
                "share_bytes": nbytes,
                "seconds": round(seconds, 6),
                "mib_per_s": round(nbytes / MIB / seconds, 1),
            }
    return {
        "benchmark": "sharing",
        "machine": machine_info(),
        "input_mib": args.mib,
        "parties": n,
        "repeat": args.repeat,
        "fsync": args.fsync,
        "notes": (
            "share_bytes: int64 share bytes produced (full split: every party's share; seeded: "
            "party 0's share, the seeds are 32 bytes each). Without --fsync, writes land in the "
            "page cache."
        ),
        "results": results,
    }


def summary(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"sharing bench: {report['input_mib']} MiB int64, {report['parties']} parties, "
        f"best of {report['repeat']}, {m['cpu_count']} CPUs, numpy {m['numpy']}, {m['openssl']}",
    ]
    for name, r in report["results"].items():
        mib = r["share_bytes"] / MIB
        lines.append(
            f"  {name:<22} {mib:8.0f} MiB in {r['seconds']:7.3f} s = {r['mib_per_s']:8.1f} MiB/s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parties < 2 or args.mib < 1 or args.repeat < 1:
        print("need --parties >= 2, --mib >= 1, --repeat >= 1", file=sys.stderr)
        return 2
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
