"""Start the compute parties and the dealer as separate local processes and watch them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from veiltrain.errors import PartyError
from veiltrain.party import TrainJob

ProgressFn = Callable[[dict[str, Any]], None]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _restore_sigint() -> None:
    # A child of a shell's background job inherits "ignore SIGINT"; undo it so SIGTERM works.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[str]
    log: IO[str]
    log_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    def tail(self, lines: int = 15) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])


def _command(rank: int, world: int, rendezvous: str, store: str, job: TrainJob) -> list[str]:
    return [sys.executable, "-m", "veiltrain.party", "--rank", str(rank), "--world-size",
            str(world), "--rendezvous", rendezvous, "--store", store, "--job", job.to_json()]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _start(name: str, cmd: list[str], logdir: Path) -> _Proc:
    log_path = logdir / f"{name.replace(' ', '-')}.log"
    log = log_path.open("w")
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=_env(),
                             start_new_session=True, preexec_fn=_restore_sigint)
    return _Proc(name, popen, log, log_path)


def _reader(proc: _Proc, on_event: ProgressFn, last_seen: list[float]) -> None:
    assert proc.popen.stdout is not None  # created with stdout=PIPE
    for line in proc.popen.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            proc.log.write(line)
            continue
        last_seen[0] = time.monotonic()
        proc.events.append(event)
        on_event({"party": proc.name, **event})


def run_local(stores: Sequence[str], job: TrainJob, on_event: ProgressFn,
              logdir: str | None = None) -> dict[str, Any]:
    """Run parties 0..n-1 and the dealer locally; raise PartyError naming the first to fail."""
    world = len(stores)
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    folder = Path(logdir or tempfile.mkdtemp(prefix="veiltrain-parties-"))
    folder.mkdir(parents=True, exist_ok=True)
    procs = [_start(f"party {r}", _command(r, world, rendezvous, stores[r], job), folder)
             for r in range(world)]
    procs.append(_start("dealer", _command(world, world, rendezvous, "", job), folder))
    last_seen = [time.monotonic()]
    threads = [threading.Thread(target=_reader, args=(p, on_event, last_seen), daemon=True)
               for p in procs]
    for t in threads:
        t.start()
    try:
        _watch(procs, job.timeout_s, last_seen)
    finally:
        _stop(procs)
        for t in threads:
            t.join(timeout=5)
    return {"logs": str(folder), "rendezvous": rendezvous}


def _watch(procs: list[_Proc], timeout_s: float, last_seen: list[float]) -> None:
    while True:
        codes = [p.popen.poll() for p in procs]
        failed = [p for p, c in zip(procs, codes, strict=True) if c not in (None, 0)]
        if failed:
            first = min(failed, key=lambda p: p.log_path.stat().st_mtime)
            raise PartyError(
                f"{first.name} failed (exit {first.popen.returncode}); its log "
                f"{first.log_path} ends:\n{first.tail()}"
            )
        if all(c == 0 for c in codes):
            return
        if time.monotonic() - last_seen[0] > timeout_s + 30:
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
