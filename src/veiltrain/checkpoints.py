"""Per-party encrypted checkpoints: share files first, then a record that marks them complete.

Each record names the run, the keyed settings tag and the training attempt that wrote it. The
parties of one attempt compute together, so their epoch-k checkpoints belong together; shares of
different attempts (a party rerun alone, a store restored from elsewhere) must never be mixed.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors

from veiltrain.contract import ObjectMeta, read_model
from veiltrain.errors import IntegrityError, VeiltrainError
from veiltrain.store import Location, sha256_bytes

RECORD = "checkpoint.json"
PARAMS_FILE = "params.safetensors"
"""A checkpoint's parameter shares: int64 safetensors by state_dict key."""
ATTEMPT_BITS = 63
"""Attempt ids are random 63-bit numbers: they fit a signed int64 tensor for the agreement."""


@dataclass(frozen=True)
class Identity:
    """What a checkpoint must match to be resumed or decrypted."""

    run_id: str
    settings_hash: str


def new_attempt() -> int:
    """A fresh attempt id (drawn by party 0, shared with the others at start)."""
    return secrets.randbits(ATTEMPT_BITS) + 1  # never 0: 0 marks "no checkpoint"


def folder(epoch: int) -> str:
    """Where one epoch's checkpoint lives inside a party's store."""
    return f"checkpoints/epoch-{epoch:04d}"


def write(loc: Location, epoch: int, blobs: Mapping[str, bytes], fields: dict[str, Any]) -> None:
    """Write the share files, then the record with their hashes (a missing record = incomplete)."""
    for name, blob in blobs.items():
        loc.write_bytes(f"{folder(epoch)}/{name}", blob)
    objects = {n: {"sha256": sha256_bytes(b), "size": len(b)} for n, b in blobs.items()}
    loc.write_json(f"{folder(epoch)}/{RECORD}", {**fields, "epoch": epoch, "objects": objects})


class Record(BaseModel):
    """checkpoint.json: which run, settings and attempt wrote an epoch's share files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    party: int = Field(ge=0)
    epoch: int = Field(ge=1)
    step: int = Field(ge=0)
    settings_hash: str
    precision_bits: int
    attempt: int = Field(ge=1)
    objects: dict[str, ObjectMeta]


def _record(loc: Location, epoch: int, ident: Identity) -> Record:
    record = read_model(loc, f"{folder(epoch)}/{RECORD}", Record)
    if record.run_id != ident.run_id or record.settings_hash != ident.settings_hash:
        raise IntegrityError(
            f"{loc.url}/{folder(epoch)}: belongs to another run or other settings; "
            "re-run the train stage"
        )
    return record


def read(
    loc: Location, epoch: int, name: str, ident: Identity, attempt: int | None = None
) -> bytes:
    """One share file of a checkpoint, checked against its record, run and attempt."""
    record = _record(loc, epoch, ident)
    if attempt is not None and record.attempt != attempt:
        raise IntegrityError(
            f"{loc.url}/{folder(epoch)}: written by training attempt {record.attempt}, "
            f"the other parties' by {attempt}: their shares cannot be combined; re-run training"
        )
    blob = loc.read_bytes(f"{folder(epoch)}/{name}")
    meta = record.objects.get(name)
    if meta is None or sha256_bytes(blob) != meta.sha256:
        raise IntegrityError(f"{loc.url}/{folder(epoch)}/{name}: SHA-256 differs from {RECORD}")
    return blob


def epochs(loc: Location) -> list[int]:
    """Epochs that have a record, complete or not, sorted."""
    names = [n for n in loc.list("checkpoints") if n.endswith(f"/{RECORD}")]
    found = []
    for name in names:
        try:
            found.append(int(name.split("/")[1].removeprefix("epoch-")))
        except ValueError:
            continue  # a stray folder is not a checkpoint
    return sorted(found)


def candidates(loc: Location, ident: Identity, max_epoch: int) -> dict[int, int]:
    """Epoch -> attempt id of every record of this run whose objects have the right sizes."""
    found = {}
    for epoch in epochs(loc):
        attempt = _sized(loc, epoch, ident) if epoch <= max_epoch else None
        if attempt is not None:
            found[epoch] = attempt
    return found


def _sized(loc: Location, epoch: int, ident: Identity) -> int | None:
    try:
        record = _record(loc, epoch, ident)
        sizes_match = all(
            loc.size(f"{folder(epoch)}/{name}") == meta.size
            for name, meta in record.objects.items()
        )
    except VeiltrainError:
        return None  # unreadable, partial or foreign: not a resume point
    return record.attempt if sizes_match and record.epoch == epoch else None


def verified(loc: Location, epoch: int, ident: Identity) -> bool:
    """Whether every object of the epoch's checkpoint hashes to its record (a full read)."""
    try:
        record = _record(loc, epoch, ident)
        return all(
            loc.sha256(f"{folder(epoch)}/{name}") == meta.sha256
            for name, meta in record.objects.items()
        )
    except VeiltrainError:
        return False


def common(tables: Sequence[Mapping[int, int]]) -> list[int]:
    """Epochs, newest first, for which every party holds a checkpoint of one same attempt."""
    shared = set(tables[0]).intersection(*tables[1:]) if tables else set()
    agreeing = [e for e in shared if len({table[e] for table in tables}) == 1]
    return sorted(agreeing, reverse=True)


@dataclass(frozen=True)
class Agreement:
    """The newest epoch every party holds from one attempt, and each party's epoch table."""

    epoch: int
    tables: list[dict[int, int]]

    @property
    def attempt(self) -> int:
        """The training attempt that wrote every party's checkpoint of `epoch`."""
        return self.tables[0][self.epoch]


def newest_common(
    locations: Sequence[Location], ident: Identity, max_epoch: int
) -> Agreement | None:
    """Newest epoch whose checkpoints every location holds from one attempt, verified by hash.

    The owner's view of what the parties agree on when they resume: the report decrypts it and
    a warm start continues from it. None when no epoch qualifies.
    """
    tables = [candidates(loc, ident, max_epoch) for loc in locations]
    for epoch in common(tables):
        if all(verified(loc, epoch, ident) for loc in locations):
            return Agreement(epoch, tables)
    return None


def read_params(
    loc: Location, epoch: int, ident: Identity, attempt: int
) -> dict[str, torch.Tensor]:
    """One party's parameter shares of one epoch, checked against its record and attempt."""
    return load_safetensors(read(loc, epoch, PARAMS_FILE, ident, attempt))
