"""Encrypt one data set one way in this fresh process; print seconds and peak RSS as JSON.

    python bench/encrypt_ways.py --way veiltrain|naive|raw --data D.npz --work DIR [--upload]

veiltrain: owner.encrypt_dataset (timed) into a local folder store, optionally followed by
encrypt_model and upload. naive: what a new CrypTen user writes, `crypten.cryptensor` per sample
in a world of one party, each share pickled into an FFRecord record. raw: the same records'
bytes, already made, written the way veiltrain writes its shards (no encoding, no masks).
Every way reports the int64 payload (records x words x 8), so their MiB/s compare directly.
D.npz holds `x`, `y` and a small `x_test`/`y_test`, so that every `x` row is a training record.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from timed_party import peak_rss_kib
from veiltrain import data, owner
from veiltrain.config import RunConfig, load_config
from veiltrain.contract import party_location, read_manifest
from veiltrain.ffrecord import FileWriter
from veiltrain.store import Location

MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--way", choices=("veiltrain", "naive", "raw"), required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="a local folder for the outputs")
    p.add_argument("--repeat", type=int, default=1, help="runs in this process (best is kept)")
    p.add_argument("--upload", action="store_true", help="veiltrain: also share model, upload")
    return p.parse_args(argv)


def _records(path: Path) -> np.ndarray[Any, Any]:
    """Standardised features plus one-hot labels per row: the record veiltrain encodes."""
    with np.load(path) as f:
        x, y = f["x"], f["y"]
    x = data.Standardizer.fit(x).apply(x.astype(np.float64))
    classes = int(y.max()) + 1
    return np.concatenate([x.reshape(len(x), -1), data.one_hot(y, classes)], axis=1)


def _config(args: argparse.Namespace, run: int) -> RunConfig:
    out = args.work / f"veiltrain-{run}"
    return load_config(dataset=str(args.data), out=str(out), run_id=f"bench-{run}").resolved()


def veiltrain_way(args: argparse.Namespace, run: int) -> tuple[float, int, dict[str, Any]]:
    cfg = _config(args, run)
    start = time.perf_counter()
    facts = owner.encrypt_dataset(cfg)
    seconds = time.perf_counter() - start
    extra: dict[str, Any] = {"peak_rss_after_encrypt_kib": peak_rss_kib()}
    if args.upload and run == 0:
        owner.encrypt_model(cfg)
        counts = owner.upload(cfg)
        extra["upload"] = {
            "bytes_uploaded": counts.bytes,
            "objects": counts.uploaded,
            "bytes_by_kind": _uploaded_by_kind(cfg),
        }
    return seconds, facts.count * facts.record_words * 8, extra


def _uploaded_by_kind(cfg: RunConfig) -> dict[str, int]:
    """Uploaded bytes of all parties by top folder (dataset/...) or file (params, spec...)."""
    kinds: dict[str, int] = {}
    for party in range(cfg.parties):
        for name, meta in read_manifest(party_location(cfg, party)).table().items():
            kind = name.split("/", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + int(meta["size"])
    return kinds


def naive_way(args: argparse.Namespace, run: int) -> tuple[float, int, dict[str, Any]]:
    import crypten  # run() loaded it the stock way and started a world of one
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    records = torch.from_numpy(_records(args.data))
    path = args.work / f"naive-{run}.ffr"
    with FileWriter(path, len(records)) as writer:
        for row in records:
            share = crypten.cryptensor(row).share  # a world of one: the share is the data
            writer.write_one(pickle.dumps(share))
    seconds = time.perf_counter() - start
    return seconds, records.numel() * 8, {"file_bytes": path.stat().st_size}


def raw_way(args: argparse.Namespace, run: int) -> tuple[float, int, dict[str, Any]]:
    rows = np.random.default_rng(run).integers(-(2**62), 2**62, _records(args.data).shape)
    loc = Location(str(args.work / f"raw-{run}"))
    start = time.perf_counter()
    owner._write_shards(loc, rows)  # veiltrain's own shard writer, given finished rows
    return time.perf_counter() - start, rows.nbytes, {}


WAYS = {"veiltrain": veiltrain_way, "naive": naive_way, "raw": raw_way}


def _one_party_world(work: Path) -> None:
    """CrypTen's environment for a world of one (no dealer: nothing to multiply)."""
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        RENDEZVOUS=f"file://{work / 'rendezvous'}",
        DISTRIBUTED_BACKEND="gloo",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    rss_before = peak_rss_kib()
    times, extras, payload = [], [], 0
    crypten = None
    if args.way == "naive":
        _one_party_world(args.work)
        from stock_crypten import load_crypten

        crypten = load_crypten()
        crypten.init()  # once, untimed: a user's script starts CrypTen once too
    try:
        for i in range(args.repeat):
            seconds, payload, extra = WAYS[args.way](args, i)
            times.append(seconds)
            extras.append(extra)
    finally:
        if crypten is not None:
            crypten.uninit()
    best = min(times)
    return {
        "way": args.way,
        "payload_bytes": payload,
        "seconds": [round(t, 4) for t in times],
        "mib_s": round(payload / MIB / best, 1),
        "rss_before_kib": rss_before,
        "peak_rss_kib": peak_rss_kib(),
        **extras[0],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        args.work = Path(tmp)
        print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
