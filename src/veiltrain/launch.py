"""Start the compute parties and the dealer as separate local processes and watch them."""

from __future__ import annotations

import json
import os
import queue
import signal
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

from veiltrain.contract import TrainJob, TrainRun
from veiltrain.errors import PartyError
from veiltrain.store import ENDPOINT_VARIABLE, credential_variables

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


PARTY_ENTRY: tuple[str, ...] = (sys.executable, "-m", "veiltrain.party")
"""The default command prefix of a party or dealer process; rank and world size follow it."""

# Copied from the launcher's environment when set: what the interpreter, torch and the C
# libraries below them (locale, BLAS, CUDA, OpenSSL's trust store) read. None is a secret.
# PYTHONPATH stays: parties import a user's model factory. Everything else is dropped, including
# AWS_* (even AWS_CA_BUNDLE: one rule is easier to audit than exceptions) and PREFECT_*.
_INHERITED = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TMPDIR",
        "TZ",
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "LD_LIBRARY_PATH",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    }
)
_INHERITED_PREFIXES = ("LC_",)
# Several parties share a host in tests and demos: one thread each, and unbuffered event lines.
_FIXED = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _command(entry: Sequence[str], rank: int, world: int) -> list[str]:
    """Only rank and world size go on argv: every user on the host can read /proc/*/cmdline."""
    return [*entry, "--rank", str(rank), "--world-size", str(world)]


def _message(job: TrainJob, store: str, rendezvous: str) -> str:
    """The JSON object a party (or, with no store, the dealer) reads on stdin."""
    # The job's own serialisation, nested as an object: the party parses it with from_json.
    fields = json.loads(job.to_json())
    return json.dumps({"job": fields, "store": store, "rendezvous": rendezvous})


def child_env(role: str | None) -> dict[str, str]:
    """A child's environment built from scratch: the allow-list plus, for a party, its own keys.

    role is 'party-<i>' for party i and None for the dealer, which gets no store settings at all.
    """
    env = {
        k: v for k, v in os.environ.items() if k in _INHERITED or k.startswith(_INHERITED_PREFIXES)
    }
    env.update(_FIXED)
    if role is not None:
        for name in (*credential_variables(role), ENDPOINT_VARIABLE):
            if name in os.environ:
                env[name] = os.environ[name]
    return env


def _start(name: str, cmd: list[str], message: str, env: dict[str, str], logdir: Path) -> _Proc:
    log_path = logdir / f"{name.replace(' ', '-')}.log"
    log = log_path.open("w")
    popen = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert popen.stdin is not None  # created with stdin=PIPE
    try:
        popen.stdin.write(message)
        popen.stdin.close()
    except BrokenPipeError:
        pass  # it exited before reading: _watch reports its exit code and log
    return _Proc(name, popen, log, log_path)


def _reader(proc: _Proc, events: queue.Queue[dict[str, Any]]) -> None:
    assert proc.popen.stdout is not None  # created with stdout=PIPE
    for line in proc.popen.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            proc.log.write(line)
            continue
        events.put({"party": proc.name, "pid": proc.popen.pid, **event})


def run_local(
    stores: Sequence[str],
    job: TrainJob,
    on_event: ProgressFn,
    logdir: str | None = None,
    entry: Sequence[str] | None = None,
) -> TrainRun:
    """Run parties 0..n-1 and the dealer locally; raise PartyError naming the first to fail.

    entry replaces the command prefix (default PARTY_ENTRY), e.g. to start through a wrapper.
    """
    world = len(stores)
    prefix = PARTY_ENTRY if entry is None else tuple(entry)
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    folder = _logdir(logdir)
    procs = [
        _start(
            f"party {r}",
            _command(prefix, r, world),
            _message(job, stores[r], rendezvous),
            child_env(f"party-{r}"),
            folder,
        )
        for r in range(world)
    ]
    dealer_message = _message(job, "", rendezvous)
    procs.append(
        _start("dealer", _command(prefix, world, world), dealer_message, child_env(None), folder)
    )
    _supervise(procs, job.timeout_s, on_event)
    return TrainRun(logs=str(folder), rendezvous=rendezvous)


def run_one(
    rank: int,
    world: int,
    store: str,
    job: TrainJob,
    rendezvous: str,
    *,
    on_event: ProgressFn,
    logdir: str | None = None,
) -> TrainRun:
    """Run one party (or the dealer: rank == world, no store) of a run spread over machines.

    Deployment mode: each trust domain's worker runs its own process; they meet at rendezvous.
    """
    folder = _logdir(logdir)
    is_dealer = rank == world
    proc = _start(
        "dealer" if is_dealer else f"party {rank}",
        _command(PARTY_ENTRY, rank, world),
        _message(job, "" if is_dealer else store, rendezvous),
        child_env(None if is_dealer else f"party-{rank}"),
        folder,
    )
    _supervise([proc], job.timeout_s, on_event)
    return TrainRun(logs=str(folder), rendezvous=rendezvous)


def _logdir(logdir: str | None) -> Path:
    folder = Path(logdir or tempfile.mkdtemp(prefix="veiltrain-parties-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _supervise(procs: list[_Proc], timeout_s: float, on_event: ProgressFn) -> None:
    """Relay events until every process exits 0; stop them all on failure or interruption."""
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    threads = [threading.Thread(target=_reader, args=(p, events), daemon=True) for p in procs]
    for t in threads:
        t.start()
    try:
        _watch(procs, timeout_s, events, on_event)
    finally:
        _stop(procs)
        for t in threads:
            t.join(timeout=5)


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
            first = _culprit(failed)
            raise PartyError(
                f"{first.name} {_exit(first.popen.returncode)}: {first.summary()} "
                f"(full log: {first.log_path}); a rerun of the stage resumes from the newest "
                "checkpoint every party holds"
            )
        if all(c == 0 for c in codes):
            time.sleep(0.05)  # let the readers hand over the last lines
            _drain(events, on_event)
            return
        if time.monotonic() - last_seen > timeout_s + 30:
            waiting = ", ".join(p.name for p, c in zip(procs, codes, strict=True) if c is None)
            raise PartyError(f"no progress for {timeout_s:.0f} s; still running: {waiting}")
        time.sleep(0.2)


def _culprit(failed: list[_Proc]) -> _Proc:
    """The process that most likely failed first: one killed by a signal (its peers then fail
    on the broken connection), else the one whose log changed first."""
    killed = [p for p in failed if (p.popen.returncode or 0) < 0]
    return min(killed or failed, key=lambda p: p.log_path.stat().st_mtime)


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed ({name})"
    return f"failed (exit {code})"


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
