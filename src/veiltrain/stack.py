"""The local deployment stack: Prefect server, SeaweedFS, one work pool and worker per trust domain.

`veiltrain stack up` starts what is not running (idempotent), `down` stops exactly the processes
`up` started, by PID and start time. Everything binds 127.0.0.1. Credentials are generated once,
kept in the state directory in 0600 files and handed to each worker in its environment only:
party i's worker holds only party i's keys, and only the owner's worker holds the owner's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veiltrain import seaweed
from veiltrain.errors import ConfigError, InsecureSetupError, StackError
from veiltrain.seaweed import Credentials
from veiltrain.store import ENDPOINT_VARIABLE, credential_variables

STATE_VARIABLE = "VEILTRAIN_STATE_DIR"
OWNER_HOME_VARIABLE = "VEILTRAIN_OWNER_HOME"
OWNER_POOL = "owner"
RESULTS_BUCKET = "veiltrain-results"
RESULTS_BLOCK = "veiltrain-results"
DEFAULT_PREFECT_PORT = 4200
SERVER_START_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
# What a worker (and the flow runs it starts) inherits from the caller; nothing else, so that
# a user's own AWS_* or PREFECT_* settings never reach a pool.
_INHERITED = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


def cluster_pool(party: int) -> str:
    """Party i's own work pool (its own trust domain)."""
    return f"cluster-{party}"


def party_bucket(party: int) -> str:
    """Party i's own bucket: only party i's identity and the owner's can touch it."""
    return f"veiltrain-party-{party}"


def default_state_dir() -> Path:
    """VEILTRAIN_STATE_DIR, else ~/.local/state/veiltrain (outside any git checkout)."""
    given = os.environ.get(STATE_VARIABLE)
    if given:
        return Path(given).expanduser().resolve()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "veiltrain"


@dataclass
class Stack:
    """What `up` decided once (ports, party count) and what it started (PID, start time)."""

    root: Path
    parties: int = 2
    prefect_port: int = DEFAULT_PREFECT_PORT
    weed_ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        """The Prefect API every worker and client talks to."""
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def ui_url(self) -> str:
        """The Prefect UI."""
        return f"http://127.0.0.1:{self.prefect_port}"

    @property
    def endpoint(self) -> str:
        """The S3 endpoint of the stack's SeaweedFS."""
        return f"http://127.0.0.1:{self.weed_ports['s3.port']}"

    @property
    def owner_home(self) -> Path:
        """The owner's private folder: run settings, outputs, profiles."""
        return self.root / "owner"

    def pools(self) -> list[str]:
        """The owner's pool, then one pool per party."""
        return [OWNER_POOL, *(cluster_pool(i) for i in range(self.parties))]

    def party_stores(self) -> list[str]:
        """Party i's store base URL (a run scopes it further by run id)."""
        return [f"s3://{party_bucket(i)}" for i in range(self.parties)]

    def save(self) -> None:
        """Write stack.json (ports, PIDs: nothing secret) atomically."""
        data = {
            "parties": self.parties,
            "prefect_port": self.prefect_port,
            "weed_ports": self.weed_ports,
            "processes": self.processes,
        }
        tmp = self.root / "stack.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.root / "stack.json")


def load(root: Path | None = None) -> Stack:
    """The stack recorded in a state directory; StackError if `up` never ran there."""
    root = root or default_state_dir()
    path = root / "stack.json"
    if not path.is_file():
        raise StackError(f"no stack in {root}: run `make up` (or `veiltrain stack up`) first")
    try:
        data = json.loads(path.read_text())
        return Stack(
            root=root,
            parties=int(data["parties"]),
            prefect_port=int(data["prefect_port"]),
            weed_ports={str(k): int(v) for k, v in data["weed_ports"].items()},
            processes={str(k): [int(x) for x in v] for k, v in data["processes"].items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StackError(f"{path} is damaged ({exc}); `veiltrain stack down --purge`") from exc


# ------------------------------------------------------------------------------ credentials


def roles(parties: int) -> list[str]:
    """Every S3 identity: admin (bucket creation only, given to no worker), owner, parties."""
    return ["admin", "owner", *(f"party-{i}" for i in range(parties))]


def credentials(stack: Stack) -> dict[str, Credentials]:
    """The stack's identities, generated on first use into a 0600 file, never printed."""
    path = stack.root / "credentials.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return {name: Credentials(v["key"], v["secret"]) for name, v in data.items()}
    creds = {name: seaweed.new_credentials() for name in roles(stack.parties)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({name: c.to_json() for name, c in creds.items()}, out)
    return creds


def identities(stack: Stack, creds: dict[str, Credentials]) -> list[dict[str, Any]]:
    """Per-bucket rights: party i its bucket; the owner every party bucket; all the results."""
    parties = [party_bucket(i) for i in range(stack.parties)]
    entries = [seaweed.identity("admin", creds["admin"], ["Admin"])]
    entries.append(
        seaweed.identity("owner", creds["owner"], seaweed.bucket_actions(*parties, RESULTS_BUCKET))
    )
    for i, bucket in enumerate(parties):
        actions = seaweed.bucket_actions(bucket, RESULTS_BUCKET)
        entries.append(seaweed.identity(f"party-{i}", creds[f"party-{i}"], actions))
    return entries


# -------------------------------------------------------------------------------- processes


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(record: list[int] | None) -> bool:
    """Whether a recorded [pid, start time] is still that very process (PIDs get reused)."""
    return bool(record) and record is not None and _start_time(record[0]) == record[1]


def _restore_sigint() -> None:
    # Started from a background shell job, SIGINT arrives ignored, and Prefect's worker turns
    # SIGTERM into SIGINT: restore it so that one SIGTERM stops the worker.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str]) -> None:
    logs = stack.root / "logs"
    logs.mkdir(exist_ok=True)
    with (logs / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_restore_sigint,  # noqa: PLW1509 - only restores a signal disposition
        )
    started = _start_time(proc.pid)
    stack.processes[name] = [proc.pid, started if started is not None else -1]
    stack.save()


def log_tail(stack: Stack, name: str) -> str:
    """The end of one process's log under the state directory."""
    return seaweed.log_tail(stack.root / "logs" / f"{name}.log", 20)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _INHERITED or k.startswith("LC_")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _port_free(port: int) -> bool:
    """Whether a server could listen on the port now."""
    with socket.socket() as sock:
        # As the servers themselves do: connections left in TIME_WAIT by a server that just
        # stopped must not count as "in use" (a listener still does, SO_REUSEADDR or not).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _require_free(port: int, what: str, flag: str) -> None:
    if not _port_free(port):
        raise ConfigError(
            f"port {port} on 127.0.0.1 ({what}) is in use by another program: stop it, or "
            f"choose another with {flag}"
        )


# --------------------------------------------------------------------------------- services


def _start_seaweed(stack: Stack, creds: dict[str, Credentials]) -> None:
    workdir = stack.root / "weed"
    workdir.mkdir(mode=0o700, exist_ok=True)
    config = workdir / "s3.json"
    seaweed.write_config(config, identities(stack, creds))
    if not alive(stack.processes.get("seaweed")):
        cmd = seaweed.command(workdir, stack.weed_ports, config)
        _spawn(stack, "seaweed", cmd, seaweed.environment())
    _wait_http(stack, "seaweed", f"{stack.endpoint}/healthz", seaweed.START_TIMEOUT_S)
    buckets = [party_bucket(i) for i in range(stack.parties)] + [RESULTS_BUCKET]
    seaweed.create_buckets(stack.endpoint, creds["admin"], buckets)


def _start_server(stack: Stack) -> None:
    if not alive(stack.processes.get("server")):
        env = _base_env() | {"PREFECT_HOME": str(stack.root / "prefect")}
        cmd = [
            *_prefect(),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(stack.prefect_port),
        ]
        _spawn(stack, "server", cmd, env)
    _wait_http(stack, "server", f"{stack.api_url}/health", SERVER_START_TIMEOUT_S)


def _prefect() -> list[str]:
    # The prefect beside this interpreter: the stack runs the venv's own Prefect.
    return [sys.executable, "-m", "prefect"]


def _wait_http(stack: Stack, name: str, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not seaweed.healthy(url):
        if not alive(stack.processes.get(name)):
            raise StackError(f"{name} exited while starting; log tail:\n{log_tail(stack, name)}")
        if time.monotonic() > deadline:
            raise StackError(f"{name} not ready after {timeout_s:.0f} s at {url}")
        time.sleep(0.2)


def _api(stack: Stack, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call to the stack's Prefect REST API (stdlib only: the core never imports Prefect)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 (our loopback URL)
        f"{stack.api_url}{path}", data=data, method=method
    )
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310
            text = reply.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise StackError(f"Prefect API {method} {path}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise StackError(f"Prefect API at {stack.api_url} unreachable: {exc}") from exc
    return json.loads(text) if text else None


def _ensure_pools(stack: Stack) -> None:
    for pool in stack.pools():
        if _api(stack, "GET", f"/work_pools/{pool}") is None:
            _api(stack, "POST", "/work_pools/", {"name": pool, "type": "process"})


def worker_env(stack: Stack, pool: str, creds: dict[str, Credentials]) -> dict[str, str]:
    """A worker's whole environment: Prefect settings plus its own role's keys, nothing else."""
    role = "owner" if pool == OWNER_POOL else "party-" + pool.removeprefix("cluster-")
    mine = creds[role]
    key_name, secret_name = credential_variables(role)
    env = _base_env() | {
        "PREFECT_API_URL": stack.api_url,
        "PREFECT_HOME": str(stack.root / "workers" / pool),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"remote-file-system/{RESULTS_BLOCK}",
        # Results go to the results bucket under this worker's own identity (s3fs reads AWS_*).
        "AWS_ACCESS_KEY_ID": mine.key,
        "AWS_SECRET_ACCESS_KEY": mine.secret,
        ENDPOINT_VARIABLE: stack.endpoint,
        key_name: mine.key,
        secret_name: mine.secret,
    }
    if pool == OWNER_POOL:
        env[OWNER_HOME_VARIABLE] = str(stack.owner_home)
    return env


def _start_workers(stack: Stack, creds: dict[str, Credentials]) -> None:
    for pool in stack.pools():
        name = f"worker-{pool}"
        if alive(stack.processes.get(name)):
            continue
        (stack.root / "workers" / pool).mkdir(parents=True, exist_ok=True)
        cmd = [*_prefect(), "worker", "start", "--pool", pool, "--type", "process"]
        _spawn(stack, name, [*cmd, "--name", f"{pool}-worker"], worker_env(stack, pool, creds))


# ------------------------------------------------------------------------------- up / down


def _new_stack(root: Path, parties: int, prefect_port: int | None, s3_port: int | None) -> Stack:
    ports = dict(zip(seaweed.PORT_FLAGS, seaweed.free_ports(len(seaweed.PORT_FLAGS)), strict=True))
    if s3_port:
        ports["s3.port"] = s3_port
    return Stack(root, parties, prefect_port or DEFAULT_PREFECT_PORT, ports, {})


def prepare(
    root: Path | None = None,
    parties: int = 2,
    prefect_port: int | None = None,
    s3_port: int | None = None,
) -> Stack:
    """The recorded stack, or a new one: ports and party count are fixed at the first `up`."""
    root = root or default_state_dir()
    if (root / "stack.json").is_file():
        stack = load(root)
        if parties != stack.parties or (prefect_port and prefect_port != stack.prefect_port):
            raise ConfigError(
                f"the stack in {root} was made for {stack.parties} parties on port "
                f"{stack.prefect_port}; `veiltrain stack down --purge` to start over"
            )
        return stack
    if parties < 2:
        raise ConfigError(f"--parties {parties}: at least 2 non-colluding parties")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)
    stack = _new_stack(root, parties, prefect_port, s3_port)
    stack.save()
    return stack


def _check_ports(stack: Stack) -> None:
    """Before starting anything: the ports of whatever is not running yet must be free."""
    if not alive(stack.processes.get("seaweed")):
        _require_free(stack.weed_ports["s3.port"], "SeaweedFS S3", "--s3-port")
    if not alive(stack.processes.get("server")):
        _require_free(stack.prefect_port, "Prefect server", "--prefect-port")


def up(stack: Stack) -> Stack:
    """Start whatever of the stack is not running; a second call changes nothing."""
    _check_ports(stack)
    creds = credentials(stack)
    _start_seaweed(stack, creds)
    _start_server(stack)
    _ensure_pools(stack)
    _start_workers(stack, creds)
    stack.owner_home.mkdir(mode=0o700, exist_ok=True)
    return stack


def stop_process(stack: Stack, name: str) -> bool:
    """SIGTERM one recorded process (only if it is still the one we started), then SIGKILL."""
    record = stack.processes.get(name)
    if not alive(record):
        return False
    assert record is not None  # alive() checked it
    os.kill(record[0], signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while alive(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(record):
        os.kill(record[0], signal.SIGKILL)
    stack.processes.pop(name, None)
    stack.save()
    return True


def down(stack: Stack) -> list[str]:
    """Stop exactly what `up` started, workers first; keep state (credentials, data)."""
    order = [f"worker-{pool}" for pool in stack.pools()] + ["server", "seaweed"]
    stopped = [name for name in order if stop_process(stack, name)]
    seaweed.remove_sockets(stack.weed_ports.values())
    return stopped


def status(stack: Stack) -> dict[str, bool]:
    """Which of the stack's processes are running."""
    names = ["seaweed", "server", *(f"worker-{pool}" for pool in stack.pools())]
    return {name: alive(stack.processes.get(name)) for name in names}


def purge(stack: Stack) -> None:
    """Remove the state directory (credentials, data, outputs) after `down`."""
    import shutil

    if any(status(stack).values()):
        raise StackError("the stack is still running: `veiltrain stack down` first")
    shutil.rmtree(stack.root)


# ---------------------------------------------------------------------------------- layout

OWNER_STAGES = (
    "pipeline",
    "encrypt-dataset",
    "encrypt-model",
    "upload",
    "dealer",
    "decrypt-and-report",
)


def check_layout(deployments: list[dict[str, Any]], parties: int) -> None:
    """Refuse a deployment layout that breaks the trust domains, before anything registers.

    Owner stages and the dealer stay on the owner's pool (they hold owner secrets, or deal
    every party's triples); each party has a pool of its own, which is no owner's pool.
    """
    pools = {str(d.get("name")): str((d.get("work_pool") or {}).get("name")) for d in deployments}
    for stage in OWNER_STAGES:
        if pools.get(stage) != OWNER_POOL:
            raise InsecureSetupError(
                f"deployment {stage!r} is on pool {pools.get(stage)!r}: owner stages and the "
                f"dealer must run on pool {OWNER_POOL!r} (the owner's machine), never on a cluster"
            )
    seen: dict[str, str] = {}
    for i in range(parties):
        name, pool = f"party-{i}", pools.get(f"party-{i}")
        if pool is None or pool == "None":
            raise ConfigError(f"no deployment {name!r} for party {i} of {parties}")
        if pool == OWNER_POOL or pool in seen:
            other = "the owner" if pool == OWNER_POOL else seen[pool]
            raise InsecureSetupError(
                f"deployment {name!r} is on pool {pool!r}, which {other} also uses: each party "
                "needs a pool (and worker, and credentials) of its own"
            )
        seen[pool] = name
