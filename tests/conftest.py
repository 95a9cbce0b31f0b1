"""Shared pytest fixtures: a real SeaweedFS S3 server for tests marked `s3`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from seaweed import S3Server, running_seaweed


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One `weed mini` per test session (about 3 s to start), stopped and removed at the end."""
    with running_seaweed() as server:
        yield server
