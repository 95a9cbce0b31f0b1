"""The deployment-mode commands: stack up/down/status, deploy, run --deployed, retry, schedule."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from veiltrain import ownerhome, stack
from veiltrain.config import preflight
from veiltrain.errors import ConfigError, StackError
from veiltrain.summary import summary_lines


def dispatch(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Run one deployment-mode command; VeiltrainError propagates to the CLI's one-line error."""
    if args.command == "stack":
        return _stack(args)
    st = stack.load(args.state_dir)
    # Before any Prefect import: every client call goes to the stack's server.
    os.environ["PREFECT_API_URL"] = st.api_url
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.command == "profile":
        path = ownerhome.save_profile(args.name, _with_stores(st, options), st.owner_home)
        print(f"profile {args.name!r} saved to {path} (owner-only, mode 0600)")
        return 0
    from veiltrain.flows import control

    if args.command == "deploy":
        return _deploy(st, control)
    if args.command == "schedule":
        count = control.set_schedule(args.action == "on")
        print(f"retraining schedule {args.action} ({count} schedule(s) of the pipeline deployment)")
        return 0
    if args.command == "retry":
        control.retry(_uuid(args.flow_run_id))
        return _follow(st, control, _uuid(args.flow_run_id), "")
    return _run_deployed(st, control, options, args.publish_metrics)


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise ConfigError(f"flow run id {text!r} is not a UUID (copy it from the UI)") from None


def _stack(args: argparse.Namespace) -> int:
    if args.action == "up":
        st = stack.up(stack.prepare(args.state_dir, args.parties, args.prefect_port, args.s3_port))
        print(f"veiltrain stack up ({st.root}, keys in 0600 files there, never printed)")
        print(f"  Prefect UI   {st.ui_url}")
        print(f"  S3 endpoint  {st.endpoint}")
        print(f"  pools        {', '.join(st.pools())} (one worker each)")
        return 0
    st = stack.load(args.state_dir)
    if args.action == "status":
        for name, running in stack.status(st).items():
            print(f"  {name:<18} {'running' if running else 'stopped'}")
        return 0
    stopped = stack.down(st)
    print(f"veiltrain stack down: stopped {', '.join(stopped) or 'nothing (none running)'}")
    if args.purge:
        stack.purge(st)
        print(f"  removed {st.root}")
    return 0


def _with_stores(st: stack.Stack, options: dict[str, Any]) -> dict[str, Any]:
    """Deployed runs use the stack's party buckets; a data path is made absolute for the worker."""
    options = {"party_stores": st.party_stores(), "parties": st.parties, **options}
    dataset = options.get("dataset")
    if dataset and dataset != "digits" and Path(dataset).expanduser().exists():
        options["dataset"] = str(Path(dataset).expanduser().resolve())
    return options


def _deploy(st: stack.Stack, control: Any) -> int:
    names = control.register(st)
    print(f"registered {len(names)} deployments: {', '.join(names)}")
    if not ownerhome.profile_path("default", st.owner_home).is_file():
        ownerhome.save_profile("default", _with_stores(st, {}), st.owner_home)
        print("saved the default profile for scheduled runs (`veiltrain profile default ...`)")
    print(f"UI: {st.ui_url}/deployments  schedule: `veiltrain schedule on` (off as shipped)")
    return 0


def _run_deployed(st: stack.Stack, control: Any, options: dict[str, Any], publish: bool) -> int:
    run_id = options.pop("run_id", "") or stack_run_id()
    cfg = ownerhome.for_run(_with_stores(st, options), run_id, st.owner_home)
    preflight(cfg)
    flow_run_id = control.trigger(st, cfg, publish)
    print(f"pipeline run {flow_run_id} (run {run_id}): {st.ui_url}/runs/flow-run/{flow_run_id}")
    return _follow(st, control, flow_run_id, run_id)


def stack_run_id() -> str:
    """A new run id, as inline runs get."""
    from veiltrain.config import new_run_id

    return new_run_id()


def _follow(st: stack.Stack, control: Any, flow_run_id: UUID, run_id: str) -> int:
    started = time.monotonic()
    run = control.follow(flow_run_id, print)
    if run.state_type is None or run.state_type.value != "COMPLETED":
        message = (run.state.message or run.state_name) if run.state else "no state"
        raise StackError(
            f"pipeline run {flow_run_id} {run.state_name}: {message}\n  fix the cause, then "
            f"`veiltrain retry {flow_run_id}` (or Retry in the UI): finished stages are not rerun"
        )
    run_id = run_id or str(run.parameters.get("run_id") or "")
    report_path = st.owner_home / "runs" / run_id / "report.json"
    if run_id and report_path.is_file():
        report = json.loads(report_path.read_text())
        headline, *facts = summary_lines(report, time.monotonic() - started)
        print("\n".join([headline, *(f"  {fact}" for fact in facts)]))
        print(f"report: {report_path}")
    return 0
