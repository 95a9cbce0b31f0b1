"""The `veiltrain` command: validate options, then run the pipeline flow inline."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic_core import PydanticUndefined

from veiltrain.config import RunConfig, load_config, preflight
from veiltrain.errors import VeiltrainError
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
}
_TEXT = ("dataset", "model", "loss", "device", "store", "owner_store", "out", "run_id")


def _help(field: str) -> str:
    """Help text from the RunConfig field (its description and default): one source of truth."""
    info = RunConfig.model_fields[field]
    default = "" if info.default in (None, "", PydanticUndefined) else f" (default {info.default})"
    return f"{info.description or ''}{default}".strip()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="veiltrain", description="Train on secret shares; only the owner decrypts."
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline inline (local parties, local store)")
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
    return p


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"width\": 8}'")
    return value


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "command" and v is not None}


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


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(**_options(args)).resolved()
        preflight(cfg)
        started = time.monotonic()
        report = run(cfg)
    except VeiltrainError as exc:
        print(f"veiltrain: error: {exc}", file=sys.stderr)
        return 2
    print(_summary(report, time.monotonic() - started))
    print(f"report: {cfg.out}/report.json  plot: {cfg.out}/loss.png  (runs/latest -> {cfg.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
