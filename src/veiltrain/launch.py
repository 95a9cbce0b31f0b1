"""Start the compute parties and the dealer as separate local processes and watch them."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from veiltrain.config import RunConfig
from veiltrain.errors import PartyError
from veiltrain.party import TrainJob

ProgressFn = Callable[[dict[str, Any]], None]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[str]
    log: IO[str]
    log_path: Path

    def summary(self, lines: int = 15) -> str:
        """The party's own one-line verdict if it printed one, else the end of its log."""
        self.log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        verdicts = [line for line in text if line.startswith("veiltrain ")]
        return verdicts[-1] if verdicts else "\n".join(text[-lines:])


def _command(rank: int, world: int, rendezvous: str, store: str, job: TrainJob) -> list[str]:
    return [
        sys.executable,
        "-m",
        "veiltrain.party",
        "--rank",
        str(rank),
        "--world-size",
        str(world),
        "--rendezvous",
        rendezvous,
        "--store",
        store,
        "--job",
        job.to_json(),
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _start(name: str, cmd: list[str], logdir: Path) -> _Proc:
    log_path = logdir / f"{name.replace(' ', '-')}.log"
    log = log_path.open("w")
    popen = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    return _Proc(name, popen, log, log_path)


def _reader(proc: _Proc, events: queue.Queue[dict[str, Any]]) -> None:
    assert proc.popen.stdout is not None  # created with stdout=PIPE
    for line in proc.popen.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            proc.log.write(line)
            continue
        events.put({"party": proc.name, **event})


def run_local(
    stores: Sequence[str], job: TrainJob, on_event: ProgressFn, logdir: str | None = None
) -> dict[str, Any]:
    """Run parties 0..n-1 and the dealer locally; raise PartyError naming the first to fail."""
    world = len(stores)
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    folder = Path(logdir or tempfile.mkdtemp(prefix="veiltrain-parties-"))
    folder.mkdir(parents=True, exist_ok=True)
    procs = [
        _start(f"party {r}", _command(r, world, rendezvous, stores[r], job), folder)
        for r in range(world)
    ]
    procs.append(_start("dealer", _command(world, world, rendezvous, "", job), folder))
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    threads = [threading.Thread(target=_reader, args=(p, events), daemon=True) for p in procs]
    for t in threads:
        t.start()
    try:
        _watch(procs, job.timeout_s, events, on_event)
    finally:
        _stop(procs)
        for t in threads:
            t.join(timeout=5)
    return {"logs": str(folder), "rendezvous": rendezvous}


def _drain(events: queue.Queue[dict[str, Any]], on_event: ProgressFn) -> bool:
    """Deliver queued events on the caller's thread (progress sinks need not be thread-safe)."""
    seen = False
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return seen
        seen = True
        on_event(event)


def _watch(
    procs: list[_Proc], timeout_s: float, events: queue.Queue[dict[str, Any]], on_event: ProgressFn
) -> None:
    last_seen = time.monotonic()
    while True:
        if _drain(events, on_event):
            last_seen = time.monotonic()
        codes = [p.popen.poll() for p in procs]
        failed = [p for p, c in zip(procs, codes, strict=True) if c not in (None, 0)]
        if failed:
            first = min(failed, key=lambda p: p.log_path.stat().st_mtime)
            raise PartyError(
                f"{first.name} failed (exit {first.popen.returncode}): {first.summary()} "
                f"(full log: {first.log_path})"
            )
        if all(c == 0 for c in codes):
            time.sleep(0.05)  # let the readers hand over the last lines
            _drain(events, on_event)
            return
        if time.monotonic() - last_seen > timeout_s + 30:
            waiting = ", ".join(p.name for p, c in zip(procs, codes, strict=True) if c is None)
            raise PartyError(f"no progress for {timeout_s:.0f} s; still running: {waiting}")
        time.sleep(0.2)


def _stop(procs: list[_Proc]) -> None:
    """SIGTERM what is still running (only our own PIDs), then SIGKILL after a grace period."""
    for p in procs:
        if p.popen.poll() is None:
            p.popen.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()
        p.log.close()


def train_job(cfg: RunConfig, order_seed: int) -> TrainJob:
    """The public part of a run's settings that the parties receive."""
    return TrainJob(
        run_id=cfg.run_id,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        loss=cfg.loss,
        precision_bits=cfg.precision_bits,
        order_seed=order_seed,
        settings_hash=cfg.training_hash(),
        device=cfg.device,
        timeout_s=cfg.timeout_s,
    )
