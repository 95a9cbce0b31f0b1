"""A throwaway SeaweedFS (`weed mini`) on loopback, with per-bucket identities, for S3 tests."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veiltrain import seaweed
from veiltrain.seaweed import Credentials, free_ports

__all__ = [
    "BUCKETS",
    "PARTY_BUCKETS",
    "TEST_BUCKET",
    "S3Server",
    "free_ports",
    "running_seaweed",
    "use_party_identities",
]

TEST_BUCKET = "veiltrain-test"
PARTY_BUCKETS = {"party-0": "veiltrain-party-0", "party-1": "veiltrain-party-1"}
BUCKETS = (*PARTY_BUCKETS.values(), TEST_BUCKET)


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 endpoint and the identities it knows."""

    endpoint_url: str
    identities: dict[str, Credentials] = field(repr=False)
    log_path: Path

    def filesystem(self, identity: str = "admin") -> Any:
        """A fresh s3fs filesystem acting as `identity` ("admin", "party-0" or "party-1")."""
        return seaweed.filesystem(self.endpoint_url, self.identities[identity])


def use_party_identities(monkeypatch: Any, server: S3Server) -> None:
    """Give this test process every party's keys by role, as the owner's environment holds them."""
    for role in PARTY_BUCKETS:
        creds = server.identities[role]
        env = "VEILTRAIN_" + role.upper().replace("-", "_")
        monkeypatch.setenv(env + "_ACCESS_KEY", creds.key)
        monkeypatch.setenv(env + "_SECRET_KEY", creds.secret)
    monkeypatch.setenv("VEILTRAIN_S3_ENDPOINT_URL", server.endpoint_url)


def _identities() -> dict[str, Credentials]:
    return {n: seaweed.new_credentials() for n in ("admin", *PARTY_BUCKETS)}


def _config(identities: dict[str, Credentials]) -> list[dict[str, Any]]:
    parties = [
        seaweed.identity(name, identities[name], seaweed.bucket_actions(bucket))
        for name, bucket in PARTY_BUCKETS.items()
    ]
    return [seaweed.identity("admin", identities["admin"], ["Admin"]), *parties]


@contextlib.contextmanager
def running_seaweed() -> Iterator[S3Server]:
    """Start weed mini on free loopback ports, create the buckets, stop and clean up after."""
    workdir = Path(tempfile.mkdtemp(prefix="vt-weed-"))
    ports = dict(zip(seaweed.PORT_FLAGS, free_ports(len(seaweed.PORT_FLAGS)), strict=True))
    identities = _identities()
    config = workdir / "s3.json"
    seaweed.write_config(config, _config(identities))
    log_path = workdir / "weed.log"
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    proc = seaweed.launch(seaweed.command(workdir, ports, config), workdir, log_path)
    try:
        seaweed.wait_ready(proc, endpoint, log_path)
        seaweed.create_buckets(endpoint, identities["admin"], BUCKETS)
        yield S3Server(endpoint, identities, log_path)
    finally:
        seaweed.stop(proc, ports.values())
        shutil.rmtree(workdir, ignore_errors=True)
