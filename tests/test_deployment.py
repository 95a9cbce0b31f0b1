"""Deployment mode for real: `veiltrain stack up`, `deploy`, `run --deployed`, Retry, schedule.

One stack per module (Prefect server, SeaweedFS with per-party identities, one worker per pool),
driven through the same commands a user types. The run is made to fail by stopping the object
store during training, then retried through the API once the store is back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from veiltrain import seaweed, stack
from veiltrain.errors import ConfigError, InsecureSetupError
from veiltrain.seaweed import Credentials

pytestmark = [pytest.mark.slow, pytest.mark.prefect, pytest.mark.s3]

REPO = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
SEED = 7340291  # distinctive: the scan looks for it on the server
CLI_TIMEOUT_S = 600


def _env(state: Path) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        VEILTRAIN_STATE_DIR=str(state),
        PREFECT_HOME=str(state / "client-prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        VEILTRAIN_PICKUP_TIMEOUT_S="240",
    )
    return env


def _cli(
    state: Path, *args: str, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "veiltrain.cli", *args]
    return subprocess.run(
        cmd, env=_env(state), capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    """A running, deployed stack in a short private folder; stopped by PID and removed after."""
    root = Path(tempfile.mkdtemp(prefix="vt-stack-"))
    port = seaweed.free_ports(1)[0]
    try:
        _ok(_cli(root, "stack", "up", "--prefect-port", str(port)))
        _ok(_cli(root, "deploy"))
        yield root
    finally:
        _cli(root, "stack", "down")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small owner data set whose file name must never reach the server."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("owner-data") / "cohort-secret-b41d.npz"
    x = digits.images[:240].astype(np.float32).reshape(-1, 1, 8, 8)
    np.savez(path, x=x, y=digits.target[:240].astype(np.int64))
    return path


def _creds(root: Path) -> dict[str, Credentials]:
    data = json.loads((root / "credentials.json").read_text())
    return {name: Credentials(v["key"], v["secret"]) for name, v in data.items()}


def _client(root: Path) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = stack.load(root).api_url

    class _Scoped:
        def __enter__(self) -> Any:
            self._settings = temporary_settings(updates={PREFECT_API_URL: api})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc: object) -> None:
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Scoped()


# ------------------------------------------------------------------------ layout (no server)


def _deployments() -> list[dict[str, Any]]:
    return list(yaml.safe_load(PREFECT_YAML.read_text())["deployments"])


def test_shipped_layout_pins_owner_stages_and_one_pool_per_party() -> None:
    stack.check_layout(_deployments(), parties=2)


@pytest.mark.parametrize("stage", ["dealer", "encrypt-dataset", "decrypt-and-report", "pipeline"])
def test_layout_refuses_an_owner_stage_on_a_cluster_pool(stage: str) -> None:
    bad = [
        {**d, "work_pool": {"name": "cluster-0"}} if d["name"] == stage else d
        for d in _deployments()
    ]
    with pytest.raises(InsecureSetupError, match=stage):
        stack.check_layout(bad, parties=2)


def test_layout_refuses_two_parties_on_one_pool() -> None:
    bad = [
        {**d, "work_pool": {"name": "cluster-0"}} if d["name"] == "party-1" else d
        for d in _deployments()
    ]
    with pytest.raises(InsecureSetupError, match="party-1.*cluster-0"):
        stack.check_layout(bad, parties=2)


def test_layout_refuses_a_missing_party() -> None:
    with pytest.raises(ConfigError, match="party-2"):
        stack.check_layout(_deployments(), parties=3)


def test_up_refuses_a_port_in_use_before_starting_anything(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _cli(tmp_path, "stack", "up", "--prefect-port", str(port), timeout=60)
    assert done.returncode == 2
    assert f"port {port}" in done.stderr and "--prefect-port" in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(stack.status(stack.load(tmp_path)).values())  # nothing was left running


def test_a_port_left_in_time_wait_by_a_stopped_server_counts_as_free() -> None:
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end waits in TIME_WAIT on the port
    client.close()
    server.close()
    assert stack._port_free(port)  # `stack up` right after a store outage (a CI failure once)
    with socket.create_server(("127.0.0.1", port)):
        assert not stack._port_free(port)  # a listener is still "in use"


# ----------------------------------------------------------------------------- the stack


def test_second_up_starts_nothing(state: Path) -> None:
    before = stack.load(state).processes
    _ok(_cli(state, "stack", "up"))
    assert stack.load(state).processes == before
    assert all(stack.status(stack.load(state)).values())


def test_state_files_are_private(state: Path) -> None:
    assert (state.stat().st_mode & 0o077) == 0
    for name in ("credentials.json", "weed/s3.json"):
        assert ((state / name).stat().st_mode & 0o077) == 0, name


def test_each_party_identity_reaches_only_its_own_bucket(state: Path) -> None:
    st, creds = stack.load(state), _creds(state)
    own = seaweed.filesystem(st.endpoint, creds["party-0"])
    own.pipe(f"{stack.party_bucket(0)}/probe", b"mine")
    other = seaweed.filesystem(st.endpoint, creds["party-0"])
    with pytest.raises(PermissionError):
        other.cat_file(f"{stack.party_bucket(1)}/probe")
    with pytest.raises(PermissionError):
        other.pipe(f"{stack.party_bucket(1)}/planted", b"x")
    owner = seaweed.filesystem(st.endpoint, creds["owner"])
    owner.pipe(f"{stack.party_bucket(1)}/from-owner", b"ok")  # the owner uploads shares
    assert owner.cat_file(f"{stack.party_bucket(0)}/probe") == b"mine"


def _environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")


def test_only_each_workers_own_keys_are_in_its_environment(state: Path) -> None:
    st, creds = stack.load(state), _creds(state)
    owners = {"worker-owner": "owner", "worker-cluster-0": "party-0", "worker-cluster-1": "party-1"}
    for proc, role in owners.items():
        env = _environ(st.processes[proc][0])
        for name, c in creds.items():
            held = c.secret in env
            assert held == (name == role), f"{proc} {'holds' if held else 'lacks'} {name}'s key"
        cmdline = Path(f"/proc/{st.processes[proc][0]}/cmdline").read_bytes().decode()
        assert not any(c.secret in cmdline or c.key in cmdline for c in creds.values())


def test_the_schedule_is_registered_off_and_can_be_turned_on(state: Path) -> None:
    with _client(state) as client:
        deployment = client.read_deployment_by_name("veiltrain-deployed/pipeline")
        schedules = client.read_deployment_schedules(deployment.id)
    assert len(schedules) == 1 and schedules[0].schedule.cron == "0 3 * * *"
    assert schedules[0].active is False
    assert "schedule on" in _ok(_cli(state, "schedule", "on"))
    with _client(state) as client:
        assert all(s.active for s in client.read_deployment_schedules(deployment.id))
    _ok(_cli(state, "schedule", "off"))
    with _client(state) as client:
        assert not any(s.active for s in client.read_deployment_schedules(deployment.id))


# ------------------------------------------------------------- a run, an outage, a Retry

RUN_ID = "deployed-outage-1"


def _runs_of(client: Any, flow_name: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    flows = FlowFilter(name=FlowFilterName(any_=[flow_name]))
    return list(client.read_flow_runs(flow_filter=flows, limit=200))


def _wait_for_training(root: Path, timeout_s: float = 420) -> None:
    """Until a party has started its first epoch (its flow logs the 'start' event)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with _client(root) as client:
            parties = _runs_of(client, "party")
            if parties:
                ids = LogFilterFlowRunId(any_=[r.id for r in parties])
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=ids), limit=200)
                if any("'event': 'start'" in log.message for log in logs):
                    return
        time.sleep(1)
    raise AssertionError("training never started")


@pytest.fixture(scope="module")
def outage(state: Path, dataset: Path) -> dict[str, Any]:
    """Run, stop the store mid-training, bring it back with `stack up`, then Retry the run."""
    args = ["run", "--deployed", "--dataset", str(dataset), "--seed", str(SEED), "--epochs", "2"]
    args += ["--batch-size", "32", "--timeout-s", "60", "--run-id", RUN_ID]
    cmd = [sys.executable, "-m", "veiltrain.cli", *args]
    proc = subprocess.Popen(
        cmd, env=_env(state), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_training(state)
        stopped_at = time.monotonic()
        assert stack.stop_process(stack.load(state), "seaweed")
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
        failed_after = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
    found = re.search(r"pipeline run ([0-9a-f-]{36})", out)
    assert found, out + err
    _ok(_cli(state, "stack", "up"))  # brings back only what stopped: the store
    retried = _cli(state, "retry", found.group(1))
    return {
        "code": proc.returncode,
        "err": err,
        "failed_after": failed_after,
        "flow_run_id": found.group(1),
        "retried": retried,
    }


def test_a_store_outage_fails_the_run_naming_the_store(outage: dict[str, Any]) -> None:
    assert outage["code"] == 2
    err = outage["err"]
    assert "unreachable" in err and "veiltrain-party-" in err, err
    assert f"veiltrain retry {outage['flow_run_id']}" in err
    assert "Traceback" not in err
    assert outage["failed_after"] < 300  # store timeouts, not the 60-s party timeout, decide


def test_retry_completes_without_rerunning_the_encryption(
    state: Path, outage: dict[str, Any]
) -> None:
    out = _ok(outage["retried"])
    assert f"veiltrain run {RUN_ID}" in out and "test accuracy (trained on shares)" in out
    report = json.loads((state / "owner" / "runs" / RUN_ID / "report.json").read_text())
    assert len(report["losses"]) == 2 * 6  # both epochs trained (192 samples / 32)
    with _client(state) as client:
        for stage in ("encrypt-dataset", "encrypt-model", "upload"):
            assert len(_runs_of(client, stage)) == 1, stage
        assert len(_runs_of(client, "party")) == 4  # two cut off by the outage, two retried
        assert len(_runs_of(client, "decrypt-and-report")) == 1


def test_every_stage_ran_on_its_pinned_pool(state: Path, outage: dict[str, Any]) -> None:
    _ok(outage["retried"])
    expected = {
        "veiltrain-deployed": "owner",
        "encrypt-dataset": "owner",
        "encrypt-model": "owner",
        "upload": "owner",
        "dealer": "owner",
        "decrypt-and-report": "owner",
    }
    with _client(state) as client:
        runs = list(client.read_flow_runs(limit=200))
        names = {f.id: f.name for f in client.read_flows(limit=200)}
    assert {names[r.flow_id] for r in runs} >= {*expected, "party"}
    for run in runs:
        flow = names[run.flow_id]
        pool = f"cluster-{run.parameters['rank']}" if flow == "party" else expected[flow]
        assert run.work_pool_name == pool, (flow, run.work_pool_name)


def _server_texts(root: Path) -> dict[str, list[str]]:
    """Everything a worker's API access can read: parameters, logs, artifacts, blocks, results."""
    texts: dict[str, list[str]] = {"parameters": [], "logs": [], "artifacts": [], "blocks": []}
    with _client(root) as client:
        for run in client.read_flow_runs(limit=200):
            texts["parameters"].append(json.dumps(run.parameters) + " " + str(run.state.message))
        offset = 0
        while batch := client.read_logs(limit=200, offset=offset):
            texts["logs"] += [log.message for log in batch]
            offset += len(batch)
        texts["artifacts"] = [f"{a.data} {a.description}" for a in client.read_artifacts(limit=200)]
        texts["blocks"] = [json.dumps(b.data, default=str) for b in client.read_block_documents()]
    st = stack.load(root)
    admin = seaweed.filesystem(st.endpoint, _creds(root)["admin"])
    texts["results"] = [
        admin.cat_file(p).decode(errors="replace") for p in admin.find(stack.RESULTS_BUCKET)
    ]
    return texts


def test_nothing_owner_private_reaches_the_server(
    state: Path, dataset: Path, outage: dict[str, Any]
) -> None:
    _ok(outage["retried"])
    texts = _server_texts(state)
    # The scan sees what it should: public values are there.
    assert any(RUN_ID in t for t in texts["parameters"])
    assert any("party 0:" in t for t in texts["logs"])
    assert any("test accuracy" in t for t in texts["artifacts"])  # published by default
    assert len(texts["results"]) >= 5
    run_record = json.loads(
        (state / "owner" / "runs" / RUN_ID / "owner" / "private" / "run.json").read_text()
    )
    secrets = {
        "data file name": dataset.stem,
        "data folder": str(dataset.parent),
        "run record key": str(run_record["key"]),
        "data fingerprint": str(run_record["fingerprint"]),
        **{f"{name} key": c.secret for name, c in _creds(state).items()},
        **{f"{name} key id": c.key for name, c in _creds(state).items()},
    }
    for kind, items in texts.items():
        for text in items:
            for what, value in secrets.items():
                assert value not in text, f"{what} found in {kind}"
            assert not re.search(rf"\b{SEED}\b", text), f"--seed found in {kind}"
