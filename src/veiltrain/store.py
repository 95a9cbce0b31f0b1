"""Object-store access through fsspec: atomic writes, hashing, JSON, per-role credentials."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from veiltrain.errors import ConfigError, IntegrityError, StoreError, StoreUnavailableError

_CHUNK = 8 << 20
MAX_JSON_BYTES = 64 << 20
"""Manifests and checkpoint records are small; refuse to parse anything larger."""


ENDPOINT_VARIABLE = "VEILTRAIN_S3_ENDPOINT_URL"


def credential_variables(role: str) -> tuple[str, str]:
    """One role's access-key and secret-key variable names ('party-0': VEILTRAIN_PARTY_0_...)."""
    prefix = "VEILTRAIN_" + role.upper().replace("-", "_")
    return prefix + "_ACCESS_KEY", prefix + "_SECRET_KEY"


def s3_options(role: str) -> dict[str, Any]:
    """Storage options for one role ('owner', 'party-0', ...), read from its environment.

    Credentials never live in code, YAML or logs: each role reads
    VEILTRAIN_<ROLE>_ACCESS_KEY / VEILTRAIN_<ROLE>_SECRET_KEY (ROLE like PARTY_0), and the shared
    VEILTRAIN_S3_ENDPOINT_URL; without them s3fs falls back to its usual credential chain.
    """
    key_name, secret_name = credential_variables(role)
    options: dict[str, Any] = {
        "skip_instance_cache": True,
        "config_kwargs": {
            "connect_timeout": 10,
            "read_timeout": 60,
            "retries": {"max_attempts": 3, "mode": "standard"},
        },
    }
    key, secret = os.environ.get(key_name), os.environ.get(secret_name)
    if key and secret:
        options.update(key=key, secret=secret)
    endpoint = os.environ.get(ENDPOINT_VARIABLE)
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


class Location:
    """A folder in a store (local path, file://, memory://, s3://) with safe read/write helpers."""

    def __init__(self, url: str, role: str = "owner", **storage_options: Any) -> None:
        self.url = url.rstrip("/")
        self.role = role
        if self.url.startswith(("s3://", "s3a://")) and not storage_options:
            storage_options = s3_options(role)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"store URL {url!r} ({role}): {exc}") from exc

    def __repr__(self) -> str:
        return f"Location({self.url!r}, role={self.role!r})"

    def child(self, name: str) -> Location:
        """A sub-folder, sharing this location's filesystem and credentials."""
        sub = object.__new__(Location)
        sub.url, sub.role, sub.fs = f"{self.url}/{name}", self.role, self.fs
        sub.root = f"{self.root}/{name}"
        return sub

    def path(self, name: str) -> str:
        """Filesystem path of an object below this location."""
        return f"{self.root}/{name}" if name else self.root

    def exists(self, name: str) -> bool:
        """Whether the object exists (a denied or unreachable store raises StoreError)."""
        with self._errors(name):
            return bool(self.fs.exists(self.path(name)))

    def size(self, name: str) -> int:
        """Size in bytes of an object."""
        with self._errors(name):
            return int(self.fs.size(self.path(name)))

    def list(self, prefix: str = "") -> list[str]:
        """Names of all objects below prefix, relative to this location, sorted."""
        base = self.path(prefix)
        with self._errors(prefix):
            if not self.fs.exists(base):
                return []
            found = self.fs.find(base)
        strip = len(self.root.rstrip("/")) + 1
        return sorted(p[strip:] for p in found)

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """Whole object, refusing objects larger than limit."""
        if limit is not None and self.size(name) > limit:
            raise IntegrityError(
                f"{self.url}/{name} is larger than {limit} bytes; refusing to read"
            )
        with self._errors(name):
            return bytes(self.fs.cat_file(self.path(name)))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write all or nothing: no reader ever sees a partial object under this name."""
        self.put_stream(name, io.BytesIO(data))

    def put_stream(self, name: str, stream: Any) -> None:
        """Copy a binary stream to an object, all or nothing."""
        with self.open_atomic(name) as out:
            _copy(stream, out)

    @contextmanager
    def open_atomic(self, name: str) -> Iterator[Any]:
        """A binary file to write `name` through: it appears whole when the block ends without
        an exception, and not at all otherwise (each byte is written once)."""
        target = self.path(name)
        with self._errors(name):
            if isinstance(self.fs, LocalFileSystem):
                with _local_atomic(target) as out:
                    yield out
                return
            # Remote stores publish an object only when the upload completes (single PUT or a
            # completed multipart upload); a transaction keeps a failed write from committing.
            with self.fs.transaction, self.fs.open(target, "wb") as out:
                yield out

    def open_read(self, name: str) -> Any:
        """A binary file object for streaming reads."""
        with self._errors(name):
            return self.fs.open(self.path(name), "rb")

    def read_json(self, name: str) -> Any:
        """Parse a small JSON object; corrupt JSON is an IntegrityError naming the object."""
        raw = self.read_bytes(name, limit=MAX_JSON_BYTES)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(
                f"{self.url}/{name}: not valid JSON ({exc}); re-create it"
            ) from exc

    def write_json(self, name: str, value: Any) -> None:
        """Write JSON atomically."""
        self.write_bytes(name, json.dumps(value, indent=1, sort_keys=True).encode())

    def sha256(self, name: str) -> str:
        """Streamed SHA-256 of an object."""
        digest = hashlib.sha256()
        with self.open_read(name) as src, self._errors(name):
            for block in iter(lambda: src.read(_CHUNK), b""):
                digest.update(block)
        return digest.hexdigest()

    def remove(self, name: str) -> None:
        """Delete one object (checked: s3fs's bulk delete ignores per-key denials)."""
        with self._errors(name):
            if self.fs.exists(self.path(name)):
                self.fs.rm_file(self.path(name))

    @contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        where = f"{self.url}/{name}" if name else self.url
        try:
            yield
        except StoreError:
            raise  # already names its object
        except STORE_FAILURES as exc:
            raise store_error(f"{where} ({self.role})", exc) from exc


def _botocore_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(transport failures, every botocore error); empty when botocore is not installed."""
    try:
        from botocore import exceptions as boto
    except ImportError:
        return (), ()
    transport = (
        boto.EndpointConnectionError,
        boto.ConnectTimeoutError,
        boto.ReadTimeoutError,
        boto.ConnectionClosedError,
    )
    return transport, (boto.BotoCoreError,)


_TRANSPORT, _BOTOCORE = _botocore_errors()
STORE_FAILURES: tuple[type[BaseException], ...] = (OSError, TimeoutError, *_BOTOCORE)
"""What a store client (the OS, fsspec, s3fs, botocore) raises: catch these, then store_error."""


def store_error(where: str, exc: BaseException) -> StoreError:
    """The one mapping from fsspec, s3fs and botocore failures to veiltrain's store errors.

    Only an unreachable or slow store becomes StoreUnavailableError (retried); a missing
    object, a denied or missing credential and anything else fail at once.
    """
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return StoreError(
            f"{where}: the disk is full; free space and rerun the stage (writes are all or "
            "nothing: no half-written object was left)"
        )
    if isinstance(exc, FileNotFoundError):
        return StoreError(f"{where}: not found; check the URL, or run the stage that writes it")
    if isinstance(exc, PermissionError):
        return StoreError(
            f"{where}: access denied; check this role's credentials "
            "(VEILTRAIN_<ROLE>_ACCESS_KEY/SECRET_KEY) and bucket policy"
        )
    if isinstance(exc, (TimeoutError, ConnectionError, *_TRANSPORT)):
        return StoreUnavailableError(
            f"{where}: the store is unreachable or timed out ({exc}); check the endpoint "
            "(VEILTRAIN_S3_ENDPOINT_URL) and the network"
        )
    return StoreError(f"{where}: store error ({type(exc).__name__}: {exc})")


def _copy(src: Any, dst: Any) -> None:
    for block in iter(lambda: src.read(_CHUNK), b""):
        dst.write(block)


@contextmanager
def _local_atomic(target: str) -> Iterator[Any]:
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)  # atomic on POSIX: readers see the old object or the new one
    except BaseException:
        os.unlink(tmp)
        raise


def read_npz(loc: Location, name: str) -> dict[str, np.ndarray[Any, Any]]:
    """Read an owner-side .npz of plain arrays without ever unpickling."""
    with np.load(io.BytesIO(loc.read_bytes(name)), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class HashingReader:
    """A binary stream that hashes and counts what is read through it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._digest = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        """Read like the wrapped stream, hashing the bytes on the way."""
        block = bytes(self._stream.read(n))
        self._digest.update(block)
        self.size += len(block)
        return block

    def hexdigest(self) -> str:
        """SHA-256 of everything read so far."""
        return self._digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """SHA-256 hex digest of bytes."""
    return hashlib.sha256(data).hexdigest()


def check_objects(
    loc: Location, objects: Mapping[str, Mapping[str, Any]], deep: bool = True
) -> None:
    """Verify that every object listed in a manifest exists with its size (and hash, if deep)."""
    for name, meta in sorted(objects.items()):
        size = loc.size(name)
        if size != meta["size"]:
            raise IntegrityError(
                f"{loc.url}/{name}: {size} bytes, manifest says {meta['size']}; re-run upload"
            )
        if deep and loc.sha256(name) != meta["sha256"]:
            raise IntegrityError(
                f"{loc.url}/{name}: SHA-256 differs from its manifest; re-run upload"
            )


def download_verified(loc: Location, name: str, meta: Mapping[str, Any], folder: str) -> str:
    """Copy an object to a local file while hashing it; refuse it unless it matches `meta`.

    One streamed read both verifies an object against its manifest and gives a local copy to
    read records from, so a party never reads unverified bytes nor downloads them twice.
    """
    target = os.path.join(folder, name.replace("/", "_"))
    digest = hashlib.sha256()
    size = 0
    with loc.open_read(name) as src, loc._errors(name), open(target, "wb") as out:
        for block in iter(lambda: src.read(_CHUNK), b""):
            digest.update(block)
            size += len(block)
            out.write(block)
    if size != meta["size"] or digest.hexdigest() != meta["sha256"]:
        os.unlink(target)
        raise IntegrityError(
            f"{loc.url}/{name} ({loc.role}): {size} bytes that do not match its manifest "
            "(size or SHA-256); the store copy is corrupt or was replaced: re-run upload"
        )
    return target
