"""Process isolation: each party sees only its own keys, the dealer none, and argv holds no job."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from veiltrain import launch, owner
from veiltrain.config import load_config
from veiltrain.contract import TrainJob

# Values, not just names, are searched for: a secret must not appear anywhere in a process.
SECRETS = {
    "VEILTRAIN_PARTY_0_ACCESS_KEY": "party0-access-0f1e2d",
    "VEILTRAIN_PARTY_0_SECRET_KEY": "party0-secret-3c4b5a",
    "VEILTRAIN_PARTY_1_ACCESS_KEY": "party1-access-6978a6",
    "VEILTRAIN_PARTY_1_SECRET_KEY": "party1-secret-b5c4d3",
    "VEILTRAIN_OWNER_ACCESS_KEY": "owner-access-e2f1a0",
    "VEILTRAIN_OWNER_SECRET_KEY": "owner-secret-9a8b7c",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-6d5e4f",
    "PREFECT_API_KEY": "prefect-key-3a2b1c",
    "UNLISTED_HARMLESS_SETTING": "unlisted-value-0d9c8b",  # proves an allow-list, not a deny-list
}
ENDPOINT = "http://127.0.0.1:1"
FORBIDDEN_PREFIXES = ("VEILTRAIN_OWNER_", "AWS_", "PREFECT_")


def _own_keys(role: str) -> set[str]:
    prefix = "VEILTRAIN_" + role.upper().replace("-", "_") + "_"
    return {name for name in SECRETS if name.startswith(prefix)}


def _expected_store_env(name: str) -> dict[str, str]:
    """Store settings a process must see: party i its own keys and the endpoint; dealer none."""
    if name == "dealer":
        return {}
    own = _own_keys(name.replace(" ", "-"))
    return {**{k: SECRETS[k] for k in own}, "VEILTRAIN_S3_ENDPOINT_URL": ENDPOINT}


def _check_isolation(
    name: str, env: dict[str, str], argv: list[str], world: int, entry: Sequence[str]
) -> None:
    rank = world if name == "dealer" else int(name.split()[1])
    veiltrain = {k: v for k, v in env.items() if k.startswith("VEILTRAIN_")}
    assert veiltrain == _expected_store_env(name), name
    assert not [k for k in env if k.startswith(FORBIDDEN_PREFIXES)], name
    allowed = set(_expected_store_env(name).values())
    leaked = [v for v in SECRETS.values() if v not in allowed and v in "\0".join(env.values())]
    assert not leaked, (name, leaked)
    assert (env["PYTHONUNBUFFERED"], env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == ("1",) * 3
    assert argv == [*entry, "--rank", str(rank), "--world-size", str(world)], argv


@pytest.fixture
def secrets_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VEILTRAIN_S3_ENDPOINT_URL", ENDPOINT)


# ---------------------------------------------------------------------------------------------
# Fast: a wrapper entry reports what a child receives, without CrypTen.

WRAPPER = """
import json, os, sys
message = json.loads(sys.stdin.read())
env = {k: v for k, v in os.environ.items()}
print(json.dumps({"event": "seen", "env": env, "argv": sys.argv[1:], "message": message}))
"""


def _job() -> TrainJob:
    return TrainJob("r-1", 1, 8, 0.1, "mse", 16, order_seed=12345, settings_hash="ab" * 32)


def test_children_get_an_allow_listed_environment_and_the_job_on_stdin(
    tmp_path: Path, secrets_in_environment: None
) -> None:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    events: list[dict[str, Any]] = []
    stores = ["s3://b/party-0/r-1", "s3://b/party-1/r-1"]
    launch.run_local(
        stores,
        _job(),
        events.append,
        logdir=str(tmp_path / "logs"),
        entry=[sys.executable, str(wrapper)],
    )
    seen = {e["party"]: e for e in events if e["event"] == "seen"}
    assert set(seen) == {"party 0", "party 1", "dealer"}
    for name, event in seen.items():
        _check_isolation(name, event["env"], event["argv"], world=2, entry=[])
        assert isinstance(event["pid"], int)
        message = event["message"]
        assert TrainJob(**message["job"]) == _job()
        assert message["store"] == ("" if name == "dealer" else stores[int(name[-1])])
        assert message["rendezvous"].startswith("tcp://127.0.0.1:")


# ---------------------------------------------------------------------------------------------
# Real: a short training run through the real launcher, inspected from /proc while it runs.


def _proc(pid: int) -> tuple[dict[str, str], list[str]]:
    """A running process's initial environment and command line, as any local user sees them."""
    raw_env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    env = dict(item.split("=", 1) for item in raw_env.split("\0") if "=" in item)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    return env, argv


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_training_processes_see_only_their_own_keys_and_no_job_on_argv(
    tmp_path: Path, secrets_in_environment: None
) -> None:
    cfg = load_config(
        max_samples=120, epochs=1, batch_size=40, timeout_s=120, out=str(tmp_path / "run")
    ).resolved()
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    owner.upload(cfg)
    job = owner.train_job(cfg)  # as tasks/stages.py builds it
    pids: dict[str, int] = {}
    seen: dict[str, tuple[dict[str, str], list[str]]] = {}
    stepped: set[str] = set()

    def on_event(event: dict[str, Any]) -> None:
        pids.setdefault(event["party"], event["pid"])  # every process emits "started" first
        if event["event"] == "step" and event["party"] not in stepped:
            stepped.add(event["party"])
            for name, pid in pids.items():  # mid-training: every process is still running
                seen[name] = _proc(pid)

    launch.run_local(cfg.stores(), job, on_event, logdir=str(tmp_path / "logs"))
    assert stepped == {"party 0", "party 1"}
    assert set(seen) == {"party 0", "party 1", "dealer"}
    secrets_on_argv = [job.settings_hash, str(job.order_seed), "settings_hash", "order_seed"]
    secrets_on_argv += [*cfg.stores(), *cfg.party_bases(), cfg.run_id, "tcp://"]
    for name, (env, argv) in seen.items():
        _check_isolation(name, env, argv, world=cfg.parties, entry=launch.PARTY_ENTRY)
        cmdline = " ".join(argv)
        assert not [s for s in secrets_on_argv if s in cmdline], (name, cmdline)
