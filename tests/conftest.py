"""Shared pytest fixtures: a real SeaweedFS S3 server and a real (temporary) Prefect server."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

# Before anything imports prefect: a private home, no telemetry, patience on a fresh database.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="veiltrain-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from seaweed import S3Server, running_seaweed  # noqa: E402


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One `weed mini` per test session (about 3 s to start), stopped and removed at the end."""
    with running_seaweed() as server:
        yield server


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real Prefect API server (SQLite, random loopback port) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
