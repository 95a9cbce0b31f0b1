"""The `veiltrain` command: validate options, then run the pipeline flow inline."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic_core import PydanticUndefined

from veiltrain.config import RunConfig, load_config, preflight
from veiltrain.errors import VeiltrainError
from veiltrain.stack import STATE_VARIABLE
from veiltrain.summary import summary_lines

_NUMBERS: dict[str, type] = {
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "parties": int,
    "precision_bits": int,
    "seed": int,
    "max_samples": int,
    "test_fraction": float,
    "timeout_s": float,
    "max_rollbacks": int,
}
_TEXT = (
    "dataset",
    "model",
    "loss",
    "device",
    "store",
    "owner_store",
    "out",
    "run_id",
    "warm_start",
    "truncation",
)


def _help(field: str) -> str:
    """Help text from the RunConfig field (its description and default): one source of truth."""
    info = RunConfig.model_fields[field]
    default = "" if info.default in (None, "", PydanticUndefined) else f" (default {info.default})"
    return f"{info.description or ''}{default}".strip()


def _run_options(run: argparse.ArgumentParser) -> None:
    for field in _TEXT:
        run.add_argument("--" + field.replace("_", "-"), help=_help(field))
    for field, kind in _NUMBERS.items():
        run.add_argument("--" + field.replace("_", "-"), type=kind, help=_help(field))
    run.add_argument("--model-kwargs", type=_json_object, help=_help("model_kwargs"))
    run.add_argument(
        "--no-standardize",
        dest="standardize",
        action="store_false",
        default=None,
        help="use features as they are (default: standardise with owner-only statistics)",
    )
    run.add_argument(
        "--party-store", dest="party_stores", action="append", help=_help("party_stores")
    )


def _state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        help=f"the stack's state folder (default ${STATE_VARIABLE} or ~/.local/state/veiltrain)",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="veiltrain", description="Train on secret shares; only the owner decrypts."
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline (inline by default)")
    _run_options(run)
    run.add_argument(
        "--deployed",
        action="store_true",
        help="trigger the `pipeline` deployment on the running stack and follow it",
    )
    run.add_argument(
        "--no-publish-metrics",
        dest="publish_metrics",
        action="store_false",
        help="deployed: keep decrypted metrics out of Prefect artifacts (owner's report only)",
    )
    _state_dir(run)
    _stack_commands(sub)
    _audit_command(sub)
    return p


def _audit_command(sub: Any) -> None:
    audit = sub.add_parser(
        "audit", help="scan party stores for anything a party should not see (exit 1 if found)"
    )
    audit.add_argument("locations", nargs="+", metavar="LOCATION", help="store URL or path")
    audit.add_argument("--role", default="owner", help="whose credentials to use (S3)")
    audit.add_argument("--json", action="store_true", help="print a JSON document")
    audit.add_argument(
        "--no-hash",
        dest="hashes",
        action="store_false",
        help="check object sizes only (skip the full read that hashes every listed object)",
    )


def _stack_commands(sub: Any) -> None:
    st = sub.add_parser("stack", help="the local deployment stack: up | down | status")
    st.add_argument("action", choices=["up", "down", "status"])
    st.add_argument("--parties", type=int, default=2, help="compute parties (first up only)")
    st.add_argument("--prefect-port", type=int, help="Prefect server/UI port (default 4200)")
    st.add_argument("--s3-port", type=int, help="SeaweedFS S3 port (default: a free port)")
    st.add_argument("--purge", action="store_true", help="down: also delete state and keys")
    _state_dir(st)
    _state_dir(sub.add_parser("deploy", help="register every deployment (make deploy)"))
    retry = sub.add_parser("retry", help="retry a failed pipeline run (the UI's Retry button)")
    retry.add_argument("flow_run_id", help="the pipeline's flow run id")
    _state_dir(retry)
    sched = sub.add_parser("schedule", help="turn scheduled retraining on or off")
    sched.add_argument("action", choices=["on", "off"])
    _state_dir(sched)
    prof = sub.add_parser("profile", help="save run options under a name for scheduled runs")
    prof.add_argument("name", help="profile name (scheduled runs use 'default')")
    _run_options(prof)
    _state_dir(prof)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"width\": 8}'")
    return value


_NOT_RUN_OPTIONS = {"command", "deployed", "publish_metrics", "state_dir", "name"}


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options given on the command line (RunConfig fields only)."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_RUN_OPTIONS and v is not None}


def _prefect_defaults() -> None:
    # Embedded mode: an ephemeral server, no telemetry, and patience on a fresh database.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _link_latest(out: str) -> None:
    latest = Path("runs") / "latest"
    latest.parent.mkdir(exist_ok=True)
    tmp = latest.with_name(".latest.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(out).resolve(), target_is_directory=True)
    tmp.replace(latest)


def _summary(report: dict[str, Any], seconds: float) -> str:
    headline, *facts = summary_lines(report, seconds)
    return "\n".join([headline, *(f"  {fact}" for fact in facts)])


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run the pipeline flow inline and keep runs/latest pointing at this run."""
    _prefect_defaults()
    from veiltrain.flows.pipeline import pipeline

    report = pipeline(cfg)
    _link_latest(cfg.out)
    return report


def _inline(args: argparse.Namespace) -> int:
    cfg = load_config(**_options(args)).resolved()
    # Everything checkable is checked here, before Prefect's server starts (15-30 s); inline,
    # this process holds every role's keys, so the stores are probed too.
    preflight(cfg, probe_stores=True)
    started = time.monotonic()
    report = run(cfg)
    print(_summary(report, time.monotonic() - started))
    print(f"report: {cfg.out}/report.json  plot: {cfg.out}/loss.png  (runs/latest -> {cfg.out})")
    return 0


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` and atexit handler runs."""

    signal = 15


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted


def _interrupted(exc: BaseException) -> int | None:
    """The signal behind an interruption (Ctrl-C, our SIGTERM, Prefect's TerminationSignal)."""
    if isinstance(exc, Interrupted):
        return Interrupted.signal
    if isinstance(exc, KeyboardInterrupt):
        return 2
    if type(exc).__name__ == "TerminationSignal":  # Prefect's, raised inside a running flow
        return int(getattr(exc, "signal", 15))
    return None


def _say_interrupted(args: argparse.Namespace) -> None:
    from veiltrain.progress import current_stage

    stage = current_stage() or "set-up"
    run_id = getattr(args, "run_id", None)
    again = f"--run-id {run_id}" if run_id else "--run-id <the run id above>"
    print(
        f"veiltrain: interrupted during stage {stage}; its parties, dealer and Prefect server "
        f"are stopped. Run the same command with {again} to resume: finished stages are "
        "reused and training resumes from the newest checkpoint every party holds.",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    args = _parser().parse_args(argv)
    # Python's default SIGTERM ends the process without unwinding: the launcher's `finally` and
    # Prefect's atexit hook (which stops its temporary server) would never run.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return _main(args)
    except BaseException as exc:
        signum = _interrupted(exc)
        if signum is None:
            raise
        _say_interrupted(args)
        return 128 + signum


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "run" and not args.deployed:
            return _inline(args)
        if args.command == "audit":
            from veiltrain import audit

            return audit.run(args.locations, args.role, args.json, args.hashes)
        from veiltrain import stackcli

        return stackcli.dispatch(args, _options(args))
    except VeiltrainError as exc:
        print(f"veiltrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
