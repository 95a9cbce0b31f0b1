"""Stock CrypTen training as a CrypTen user writes it: 2 parties + CrypTen's TTP, timed per step.

    python bench/stock_crypten.py --data D.npz --model small-cnn --batch 128 --steps 10 --out R.json

The launcher starts parties 0..1 and the dealer (rank 2) as processes of this script with
CrypTen's environment convention (RANK, WORLD_SIZE, RENDEZVOUS, DISTRIBUTED_BACKEND), as
CrypTen's own multiprocess launcher does. D.npz holds `x` (N, C, H, W) float and `y` labels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PARTIES = 2


def load_crypten() -> Any:
    """CrypTen with veiltrain's torch-2.13 compatibility patches but CrypTen's own randomness.

    veiltrain.compat.apply() ends by installing veiltrain.protocol (AES keystreams, a JSON dealer
    channel): not stock. It is the last thing apply() does, so a no-op in its place leaves the
    import fixes and CrypTen's torch generators and pickled TTP messages.
    """
    from veiltrain import protocol  # importing veiltrain arms the compat import hook

    protocol.install = _stock_protocol
    import crypten
    import crypten.nn

    return crypten


def _stock_protocol() -> None:
    """Stands in for veiltrain.protocol.install: keep CrypTen's protocol as shipped."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: stdout only)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one process


def _batches(args: argparse.Namespace) -> tuple[list[tuple[Any, Any]], tuple[int, ...], int]:
    """The steps' batches (fixed order: every party must agree) and the data's shape facts."""
    import torch

    with np.load(args.data) as f:
        x, y = f["x"].astype(np.float32), f["y"].astype(np.int64)
    classes = int(y.max()) + 1
    order = np.random.default_rng(0).permutation(len(x))
    per_epoch = len(x) // args.batch  # full batches only, as the median is taken over them
    batches = []
    for step in range(args.steps):
        idx = order[(step % per_epoch) * args.batch : (step % per_epoch + 1) * args.batch]
        labels = torch.nn.functional.one_hot(torch.from_numpy(y[idx]), classes).float()
        batches.append((torch.from_numpy(x[idx]), labels))
    return batches, tuple(int(d) for d in x.shape[1:]), classes


def _train(crypten: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What a CrypTen tutorial does: from_pytorch, encrypt, then cryptensor each batch."""
    import torch

    from bench_models import build

    batches, shape, classes = _batches(args)
    model = build(args.model, shape, classes)
    cmodel = crypten.nn.from_pytorch(model, torch.zeros((1, *shape)))
    cmodel.encrypt()
    if args.device != "cpu":
        cmodel = cmodel.to(args.device)  # as CrypTen's GPU examples do: encrypt, then move
    cmodel.train()
    loss_fn = crypten.nn.CrossEntropyLoss()
    steps = []
    for index, (x, y) in enumerate(batches):
        _progress(args, {"started": index, "at": time.time()})
        t0 = time.perf_counter()
        xe = crypten.cryptensor(x.to(args.device), src=0)
        ye = crypten.cryptensor(y.to(args.device), src=0)
        t1 = time.perf_counter()
        out = cmodel(xe)
        t2 = time.perf_counter()
        loss = loss_fn(out, ye)
        t3 = time.perf_counter()
        cmodel.zero_grad()
        loss.backward()
        t4 = time.perf_counter()
        cmodel.update_parameters(args.lr)
        if args.device != "cpu":
            torch.cuda.synchronize()
        t5 = time.perf_counter()
        steps.append(
            {
                "step_s": t5 - t0,
                "phases": {
                    "data": t1 - t0,
                    "forward": t2 - t1,
                    "loss": t3 - t2,
                    "backward": t4 - t3,
                    "update": t5 - t4,
                },
            }
        )
    # Evidence that the stock protocol ran: where the TTP's draw function comes from.
    draw = crypten.mpc.provider.ttp_provider.generate_random_ring_element
    return {"steps": steps, "batch": args.batch, "model": args.model, "rng": draw.__module__}


def _progress(args: argparse.Namespace, event: dict[str, Any]) -> None:
    """Rank 0 notes each step's start, so that a run stopped at its deadline still tells how
    long its unfinished step had been running (a lower bound of a step's time)."""
    if int(os.environ["RANK"]) == 0 and args.out is not None:
        with args.out.with_name("progress.jsonl").open("a") as f:
            f.write(json.dumps(event) + "\n")


def worker(args: argparse.Namespace) -> int:
    """One party (rank < 2) or CrypTen's TTP server (rank 2)."""
    import torch

    torch.set_num_threads(1)  # three processes share the host, as veiltrain's parties do
    crypten = load_crypten()
    crypten.cfg.mpc.provider = "TTP"  # the dealer, not party 0, makes the triples
    rank = int(os.environ["RANK"])
    if rank == PARTIES:
        crypten.mpc.provider.TTPServer()  # serves until party 0's uninit says 'terminate'
        return 0
    crypten.init(device=args.device if args.device != "cpu" else None)
    try:
        result = _train(crypten, args)
    finally:
        crypten.uninit()
    if rank == 0 and args.out is not None:
        args.out.write_text(json.dumps(result) + "\n")
    return 0


# ---------------------------------------------------------------------------------- launcher


def _free_port() -> int:
    from veiltrain.launch import free_port

    return free_port()


def launch(args: argparse.Namespace) -> dict[str, Any]:
    """Start both parties and the dealer; wait for all; return rank 0's timings."""
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="stock-crypten-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", *_forwarded(args), "--out", str(result)]
        procs = []
        for rank in range(PARTIES + 1):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(PARTIES),
                "RENDEZVOUS": rendezvous,
                "DISTRIBUTED_BACKEND": "gloo",
                "OMP_NUM_THREADS": "1",
            }
            log = (Path(tmp) / f"rank{rank}.log").open("w")
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
        try:
            _wait(procs, args.timeout_s, Path(tmp))
        except TimeoutError as exc:
            return _unfinished(Path(tmp) / "progress.jsonl", args, str(exc))
        return dict(json.loads(result.read_text()))


def _unfinished(progress: Path, args: argparse.Namespace, why: str) -> dict[str, Any]:
    """No timings, but how long the step running at the deadline had run: a lower bound."""
    events = (
        [json.loads(line) for line in progress.read_text().splitlines()]
        if progress.exists()
        else []
    )
    last = events[-1] if events else None
    return {
        "steps": [],
        "batch": args.batch,
        "model": args.model,
        "unfinished": {
            "why": why,
            "step": last["started"] if last else None,
            "running_s": round(time.time() - last["at"], 1) if last else None,
        },
    }


def _forwarded(args: argparse.Namespace) -> list[str]:
    return [
        *("--data", str(args.data.resolve())),
        *("--model", args.model, "--batch", str(args.batch)),
        *("--steps", str(args.steps), "--lr", str(args.lr), "--device", args.device),
    ]


def _wait(procs: list[tuple[subprocess.Popen[bytes], Any]], timeout_s: float, logs: Path) -> None:
    """Until all exit 0; a failed or late process stops the rest at once (gloo would hang)."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p, _ in procs):
            if any(p.returncode not in (None, 0) for p, _ in procs):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"stock CrypTen did not finish in {timeout_s:.0f} s")
            time.sleep(0.2)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()  # only our own children
                proc.wait()
            log.close()
    failed = [i for i, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        tail = (logs / f"rank{failed[0]}.log").read_text()[-2000:]
        raise RuntimeError(f"stock CrypTen rank {failed[0]} failed:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    result = launch(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}))
    print("step_s:", [round(s["step_s"], 3) for s in result["steps"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
