"""Errors that know whether to retry: store failures are mapped once, only unavailability retries.

The Prefect tests run real tasks with the project's retry policy (delays set to 0) against real
stores: a missing object and a denied credential fail on the first attempt; a store that is
unreachable for two attempts and then comes back succeeds on the third.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from seaweed import PARTY_BUCKETS, S3Server
from veiltrain.errors import StoreError, StoreUnavailableError, is_transient
from veiltrain.store import Location

DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens on loopback here


def _s3(server: S3Server, identity: str, bucket: str, endpoint: str | None = None) -> Location:
    creds = server.identities[identity]
    return Location(
        f"s3://{bucket}/retry-tests/{uuid.uuid4().hex}",
        identity,
        key=creds.key,
        secret=creds.secret,
        endpoint_url=endpoint or server.endpoint_url,
        skip_instance_cache=True,
        config_kwargs={"connect_timeout": 2, "retries": {"max_attempts": 1}},
    )


def test_a_missing_object_is_final(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not found") as info:
        Location(str(tmp_path)).read_bytes("absent.bin")
    assert not is_transient(info.value)


@pytest.mark.s3
def test_a_denied_credential_is_final(s3_server: S3Server) -> None:
    intruder = _s3(s3_server, "party-0", PARTY_BUCKETS["party-1"])
    with pytest.raises(StoreError, match="access denied") as info:
        intruder.write_bytes("x.bin", b"x")
    assert not is_transient(info.value)


@pytest.mark.s3
def test_an_unreachable_store_is_transient_and_named(s3_server: S3Server) -> None:
    dead = _s3(s3_server, "party-0", PARTY_BUCKETS["party-0"], endpoint=DEAD_ENDPOINT)
    with pytest.raises(StoreUnavailableError, match="unreachable") as info:
        dead.exists("x.bin")
    assert is_transient(info.value) and dead.url in str(info.value)


# ------------------------------------------------------------------- with Prefect's retries


def _run_with_policy(fn: Any) -> tuple[Any, int]:
    """Run fn as a task with the project's IO retry policy (no delays); (state, attempts)."""
    from prefect import flow, task

    from veiltrain.tasks.stages import IO_RETRIES

    calls = [0]

    def counted() -> Any:
        calls[0] += 1
        return fn(calls[0])

    policy = {**IO_RETRIES, "retry_delay_seconds": 0}
    wrapped = task(counted, name="store-call", **policy)

    @flow
    def once() -> Any:
        return wrapped()

    state = once(return_state=True)
    return state, calls[0]


@pytest.mark.prefect
def test_a_missing_object_is_not_retried(prefect_server: None, tmp_path: Path) -> None:
    state, attempts = _run_with_policy(lambda _: Location(str(tmp_path)).read_bytes("absent"))
    assert state.is_failed() and attempts == 1


@pytest.mark.prefect
@pytest.mark.s3
def test_a_denied_credential_is_not_retried(prefect_server: None, s3_server: S3Server) -> None:
    intruder = _s3(s3_server, "party-0", PARTY_BUCKETS["party-1"])
    state, attempts = _run_with_policy(lambda _: intruder.write_bytes("x.bin", b"x"))
    assert state.is_failed() and attempts == 1


@pytest.mark.prefect
@pytest.mark.s3
def test_a_store_that_comes_back_within_the_retries_succeeds(
    prefect_server: None, s3_server: S3Server
) -> None:
    live = _s3(s3_server, "party-0", PARTY_BUCKETS["party-0"])
    live.write_bytes("object.bin", b"payload")

    def read(attempt: int) -> bytes:
        # Unreachable on the first two attempts (a real connection failure), back on the third.
        endpoint = DEAD_ENDPOINT if attempt < 3 else s3_server.endpoint_url
        creds = s3_server.identities["party-0"]
        loc = Location(
            live.url,
            "party-0",
            key=creds.key,
            secret=creds.secret,
            endpoint_url=endpoint,
            skip_instance_cache=True,
            config_kwargs={"retries": {"max_attempts": 1}},
        )
        return loc.read_bytes("object.bin")

    state, attempts = _run_with_policy(read)
    assert state.is_completed() and attempts == 3
    assert state.result() == b"payload"
