"""The owner's controls for deployment mode: register, trigger, follow, retry, schedule.

Run from the owner's machine with the stack's API URL in PREFECT_API_URL (the CLI sets it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.filesystems import RemoteFileSystem
from prefect.states import AwaitingRetry, Cancelling

from veiltrain import ownerhome, stack
from veiltrain.config import RunConfig
from veiltrain.errors import StackError
from veiltrain.flows.deployed import PIPELINE

DEPLOY_TIMEOUT_S = 600
_DONE = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


def repo_root() -> Path:
    """The checkout that holds deployments/prefect.yaml (workers run flows from it)."""
    return Path(__file__).resolve().parent.parent


def _save_results_block(st: stack.Stack) -> None:
    # Only the endpoint goes in the block (every worker can read blocks); each worker reaches
    # the results bucket with its own identity from its environment.
    block = RemoteFileSystem(
        basepath=f"s3://{stack.RESULTS_BUCKET}/results",
        settings={"client_kwargs": {"endpoint_url": st.endpoint}, "skip_instance_cache": True},
    )
    block.save(stack.RESULTS_BLOCK, overwrite=True)


def register(st: stack.Stack, prefect_file: Path | None = None) -> list[str]:
    """Check the layout, then register every deployment without prompts; returns their names."""
    path = prefect_file or repo_root() / "deployments" / "prefect.yaml"
    deployments = (yaml.safe_load(path.read_text()) or {}).get("deployments") or []
    stack.check_layout(deployments, st.parties)
    _save_results_block(st)
    env = {
        **os.environ,
        "PREFECT_API_URL": st.api_url,
        "VEILTRAIN_REPO": str(repo_root()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    done = subprocess.run(
        [*cmd, "--prefect-file", str(path)],
        cwd=repo_root(),
        env=env,
        capture_output=True,
        text=True,
        timeout=DEPLOY_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise StackError(f"prefect deploy failed (exit {done.returncode}):\n{tail}")
    return [str(d.get("name")) for d in deployments]


def trigger(st: stack.Stack, cfg: RunConfig, publish_metrics: bool = True) -> UUID:
    """Save the run's settings in the owner's folder, then start the pipeline deployment."""
    ownerhome.save_run(cfg, st.owner_home)
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(PIPELINE)
        except ObjectNotFound as exc:
            raise StackError(f"deployment {PIPELINE} is not registered: `make deploy`") from exc
        run = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={"run_id": cfg.run_id, "publish_metrics": publish_metrics},
        )
    return run.id


def retry(flow_run_id: UUID) -> None:
    """What the UI's Retry button does: requeue the same run on its deployment's pool."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, AwaitingRetry(), force=True)


def _stage_states(client: Any, flow_run_id: UUID) -> dict[str, str]:
    runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )
    return {r.name: str(r.state_name) for r in runs}


def follow(flow_run_id: UUID, say: Callable[[str], None], pickup_timeout_s: float = 120.0) -> Any:
    """Poll the pipeline run until it ends, saying each stage's changes; returns the run."""
    started, seen = time.monotonic(), dict[str, str]()
    while True:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            stages = _stage_states(client, flow_run_id)
            waiting = run.state_type in (StateType.SCHEDULED, StateType.PENDING)
            if waiting and run.start_time is None and time.monotonic() - started > pickup_timeout_s:
                client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
                raise StackError(
                    f"the pipeline run was not picked up in {pickup_timeout_s:.0f} s: is the "
                    "owner's worker running? (`make up`)"
                )
        for name, state in stages.items():
            if seen.get(name) != state:
                say(f"  {name}: {state}")
        seen = stages
        if run.state_type in _DONE:
            return run
        time.sleep(1.0)


def set_schedule(active: bool) -> int:
    """Turn the pipeline's retraining schedules on or off; returns how many there are."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(PIPELINE)
        schedules = client.read_deployment_schedules(deployment.id)
        for schedule in schedules:
            client.update_deployment_schedule(deployment.id, schedule.id, active=active)
    return len(schedules)
