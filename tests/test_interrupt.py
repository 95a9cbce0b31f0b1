"""A `veiltrain run` stopped by SIGTERM or Ctrl-C stops all it started and says how to go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

RUN_ID = "interrupted-1"
# Long enough (60 steps) that the run is still training when the first checkpoint appears.
OPTIONS = ["--max-samples", "200", "--epochs", "12", "--batch-size", "32", "--timeout-s", "60"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "VIRTUAL_ENV")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    return env


def _command(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "veiltrain.cli",
        "run",
        *OPTIONS,
        "--run-id",
        RUN_ID,
        "--out",
        str(out),
    ]


def _descendants(root: int) -> set[int]:
    """Every live process below root (from /proc: ppid is field 4 of /proc/PID/stat)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)}


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen[str], timeout_s: float = 240) -> None:
    """Until a party has checkpointed epoch 1: training is under way and not yet finished."""
    deadline = time.monotonic() + timeout_s
    while not any(out.glob("**/checkpoints/epoch-0001/checkpoint.json")):
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no epoch-1 checkpoint appeared"
        time.sleep(0.2)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


# SIGTERM (a supervisor, `kill`) and SIGINT (Ctrl-C); the resume is shown once, after SIGTERM.
@pytest.mark.parametrize(("how", "resume"), [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_a_stopped_run_stops_its_server_and_parties_and_resumes(
    tmp_path: Path, how: signal.Signals, resume: bool
) -> None:
    out = tmp_path / "run"
    # Ctrl-C as at a terminal: a suite started in the background (`make test &`) has SIGINT
    # ignored, children inherit that, and Python then never raises KeyboardInterrupt. A handled
    # signal is reset to the default in the child at exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            _command(out),
            cwd=tmp_path,
            env=_env(tmp_path),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        _wait_for(out / "logs" / "party-0.log", proc)
        _wait_for_checkpoint(out, proc)  # the parties are training
        started = _descendants(proc.pid)
        assert len(started) >= 4, "expected the Prefect server, two parties and the dealer"
        proc.send_signal(how)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + how.value
    assert "interrupted during stage train" in err and f"--run-id {RUN_ID}" in err, err
    assert "Traceback" not in err
    deadline = time.monotonic() + 20
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(started), "left running after the stop"
    if not resume:
        return
    # The advice works: the same command with the run id resumes and finishes.
    again = subprocess.run(
        _command(out),
        cwd=tmp_path,
        env=_env(tmp_path),
        text=True,
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert f"veiltrain run {RUN_ID}" in again.stdout
