"""Prefect tasks that dispatch a stage to its pinned pool and follow it to the end.

Each dispatch is a task with a persisted result, cached on its inputs (Prefect's default policy:
inputs, task source, flow run id), so a Retry of a failed pipeline run re-runs only the stages
that did not complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling

from veiltrain import ownerhome, watchdog
from veiltrain.contract import TrainJob
from veiltrain.errors import StackError
from veiltrain.launch import free_port

PICKUP_TIMEOUT_S = float(os.environ.get("VEILTRAIN_PICKUP_TIMEOUT_S", "120"))
"""How long a stage may wait for its pool's worker before the dispatch fails naming the pool."""
POLL_S = 1.0
RENDEZVOUS_VARIABLE = "VEILTRAIN_RENDEZVOUS"
"""Where the parties and dealer meet (tcp://HOST:PORT); default a free loopback port."""
_WAITING = {StateType.SCHEDULED, StateType.PENDING}
_FAILED = {StateType.FAILED, StateType.CRASHED, StateType.CANCELLED, StateType.CANCELLING}


def _start(deployment: str, parameters: Mapping[str, Any], name: str) -> UUID:
    """Create the child run (returns at once: timeout=0); a missing deployment is named."""
    try:
        run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync call, not awaited
            deployment, parameters=dict(parameters), timeout=0, flow_run_name=name
        )
    except ObjectNotFound as exc:
        raise StackError(
            f"deployment {deployment!r} is not registered: run `make deploy` (veiltrain deploy)"
        ) from exc
    return run.id


def _reason(run: FlowRun) -> str:
    state = run.state
    message = (state.message or "").strip() if state else ""
    return message or str(run.state_name or "no state")


def _cancel(runs: Mapping[str, UUID], keep: set[str]) -> None:
    """Stop the other children of a failed stage: they would only wait for their timeouts."""
    with get_client(sync_client=True) as client:
        for name, run_id in runs.items():
            if name not in keep:
                client.set_flow_run_state(run_id, Cancelling(), force=True)


def follow(runs: Mapping[str, UUID], pickup_timeout_s: float = PICKUP_TIMEOUT_S) -> None:
    """Wait until every child run completes; on the first failure cancel the rest and raise.

    Never waits forever: a child no worker picks up fails after pickup_timeout_s, naming its
    pool; a running child is bounded by its own timeouts (store and party timeouts).
    """
    started = time.monotonic()
    done: set[str] = set()
    while len(done) < len(runs):
        with get_client(sync_client=True) as client:
            current = {name: client.read_flow_run(rid) for name, rid in runs.items()}
        for name, run in current.items():
            kind = run.state.type if run.state else None
            if kind == StateType.COMPLETED:
                done.add(name)
            elif kind in _FAILED:
                _cancel(runs, keep=done | {name})
                raise StackError(f"{name} ({run.name}) ended {run.state_name}: {_reason(run)}")
            elif kind in _WAITING and time.monotonic() - started > pickup_timeout_s:
                _cancel(runs, keep=done)
                raise StackError(
                    f"{name} was not picked up within {pickup_timeout_s:.0f} s: is the worker "
                    f"of its pool ({run.work_pool_name}) running? (`make up`)"
                )
        time.sleep(POLL_S)


def _result(run_id: UUID) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    value = run.state.result() if run.state else None  # JSON from the shared result store
    if not isinstance(value, dict):
        raise StackError(f"stage run {run.name} returned {type(value).__name__}, not an object")
    return value


@task(name="dispatch", persist_result=True, task_run_name="{deployment}")
def dispatch(deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Run one stage deployment on its pool and return its JSON result."""
    # Named after stage and run, so that the UI and `run --deployed` say what each child is.
    name = f"{deployment.rsplit('/', maxsplit=1)[-1]} {parameters.get('run_id', '')}".strip()
    run_id = _start(deployment, parameters, name)
    get_run_logger().info("dispatched %s as flow run %s", deployment, run_id)
    follow({deployment: run_id})
    return _result(run_id)


@task(name="train", persist_result=True)
def train(job: TrainJob, stores: list[str]) -> dict[str, Any]:
    """Start every party on its own pool and the dealer on the owner's; they meet, train, exit.

    The rendezvous is chosen here, not passed in, so that a Retry finds this task cached once
    training completed. A re-run after a failure resumes from the newest common checkpoint.
    This task runs in the owner's pipeline: its divergence watchdog decrypts the loss curve
    after training and may roll back and dispatch the parties again with a lower lr. Only the
    number of rollbacks goes into the result (shared with every pool), never a loss.
    """
    cfg = ownerhome.load_run(job.run_id)
    ran = watchdog.supervise(
        cfg, job, lambda j: _train_once(j, stores), notify=get_run_logger().warning
    )
    return {**ran, "rollbacks": len(watchdog.load(cfg))}


def _train_once(job: TrainJob, stores: list[str]) -> dict[str, Any]:
    """One joint training run: the parties resume from their newest common checkpoint."""
    world = len(stores)
    rendezvous = os.environ.get(RENDEZVOUS_VARIABLE) or f"tcp://127.0.0.1:{free_port()}"
    fields = json.loads(job.to_json())
    runs = {
        f"party {i}": _start(
            f"party/party-{i}",
            {"rank": i, "world_size": world, "rendezvous": rendezvous, "job": fields, "store": s},
            f"party-{i} {job.run_id}",
        )
        for i, s in enumerate(stores)
    }
    dealer = {"world_size": world, "rendezvous": rendezvous, "job": fields}
    runs["dealer"] = _start("dealer/dealer", dealer, f"dealer {job.run_id}")
    follow(runs)
    return {"rendezvous": rendezvous, "parties": world}
