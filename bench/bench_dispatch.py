"""dispatch_s: in deployment mode, seconds from dispatching a stage to the stage's start.

    python bench/bench_dispatch.py [--out F.json] [--max-samples 300]

Brings up a private stack in a temporary folder (Prefect server, SeaweedFS, one worker per
pool), registers the deployments, runs one small pipeline with `veiltrain run --deployed`,
then reads every flow run from the Prefect API: a stage is dispatched when its flow run is
created (the pipeline's `run_deployment`, or `veiltrain run` for the pipeline itself) and starts
when its worker's process has loaded the flow and entered Running. The stack is stopped by PID
and its folder removed at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from veiltrain import seaweed, stack

CLI_TIMEOUT_S = 900
# What the client-side processes keep of this environment: the stack builds each worker's own.
_KEEP = ("PATH", "HOME", "LANG", "TMPDIR", "VIRTUAL_ENV")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=None, help="also write the result here")
    p.add_argument("--max-samples", type=int, default=300, help="digits samples in the run")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(f"[dispatch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _KEEP}
    env.update(
        VEILTRAIN_STATE_DIR=str(state),
        PREFECT_HOME=str(state / "client-prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def _cli(state: Path, *args: str) -> tuple[str, float]:
    """A veiltrain command against the private stack: its stdout and seconds; raises on failure."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "veiltrain.cli", *args],
        env=_env(state),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"veiltrain {args[0]} exited {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout, round(time.perf_counter() - start, 1)


@contextmanager
def private_stack() -> Iterator[Path]:
    """A stack in a short temporary folder, always stopped by PID and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vt-bench-"))
    try:
        yield root
    finally:
        subprocess.run(
            [sys.executable, "-m", "veiltrain.cli", "stack", "down"],
            env=_env(root),
            capture_output=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


def flow_runs(root: Path) -> list[dict[str, Any]]:
    """Every flow run on the stack's server: its flow, creation, expected and actual start."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = {PREFECT_API_URL: stack.load(root).api_url}
    # The client is made after the settings are entered: it reads the API URL from them.
    with temporary_settings(updates=api), get_client(sync_client=True) as client:
        runs = list(client.read_flow_runs(limit=200))
        names = {f.id: f.name for f in client.read_flows(limit=200)}
    return [
        {
            "flow": names.get(run.flow_id, str(run.flow_id)),
            "created": run.created,
            "start_time": run.start_time,
            "state": run.state_name,
        }
        for run in runs
    ]


def dispatch_seconds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds from creation to start per stage run, with their median (runs never started are
    counted apart, not as zero)."""
    per_stage: dict[str, list[float]] = {}
    unstarted = 0
    for run in runs:
        if run["created"] is None or run["start_time"] is None:
            unstarted += 1
            continue
        seconds = (run["start_time"] - run["created"]).total_seconds()
        per_stage.setdefault(run["flow"], []).append(round(seconds, 2))
    every = [s for values in per_stage.values() for s in values]
    return {
        "median_s": round(statistics.median(every), 2) if every else None,
        "max_s": max(every, default=None),
        "stage_runs": len(every),
        "unstarted_runs": unstarted,
        "per_stage_s": dict(sorted(per_stage.items())),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Stack up, deploy, one deployed run; then the dispatch times read back from the API."""
    timings: dict[str, float] = {}
    with private_stack() as root:
        port = seaweed.free_ports(1)[0]
        log(f"stack up in {root}")
        _, timings["stack_up_s"] = _cli(root, "stack", "up", "--prefect-port", str(port))
        log("deploy")
        _, timings["deploy_s"] = _cli(root, "deploy")
        log(f"run --deployed: digits, {args.max_samples} samples, 1 epoch")
        options = ["--max-samples", str(args.max_samples), "--epochs", "1", "--batch-size", "32"]
        out, timings["run_s"] = _cli(root, "run", "--deployed", *options)
        if not re.search(r"pipeline run [0-9a-f-]{36}", out):
            raise RuntimeError(f"veiltrain run --deployed printed no pipeline run: {out[-800:]}")
        result = dispatch_seconds(flow_runs(root))
    return {**result, **timings, "run": f"digits, {args.max_samples} samples, 1 epoch, batch 32"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
