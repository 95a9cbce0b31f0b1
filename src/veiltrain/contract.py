"""What the owner and the parties agree on: object names, their JSON formats, the job, locations.

Owner, party and report code import this module, never each other. Every JSON object a party
reads is parsed into a frozen pydantic model here, so a malformed one is one IntegrityError that
names the object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from veiltrain.config import RunConfig
from veiltrain.errors import ConfigError, IntegrityError
from veiltrain.store import Location, credential_variables

MANIFEST = "manifest.json"
MANIFEST_FORMAT: Final = "veiltrain.party-manifest"
MANIFEST_VERSION: Final = 1
INFO = "dataset/info.json"
SPEC = "model/spec.json"
PARAMS = "model/params.safetensors"
STAGED_REQUIRED = (INFO, SPEC, PARAMS)
"""What every party's staging must hold before an upload may publish a manifest."""

# Owner-private objects (under the owner store, never uploaded). PRIVATE_TRAIN is no longer
# written (the training split is rebuilt from the source); runs from before still hold it.
PRIVATE_TRAIN = "private/train.npz"
PRIVATE_TEST = "private/test.npz"
PRIVATE_SCALER = "private/scaler.npz"
PRIVATE_INITIAL = "private/initial.safetensors"
PRIVATE_MODEL_SPEC = "private/model.json"
PRIVATE_ORDER = "private/record_order.npz"


@dataclass(frozen=True)
class TrainJob:
    """What a party is told: public hyperparameters only (no --seed: it fixes the weights)."""

    run_id: str
    epochs: int
    batch_size: int
    lr: float
    loss: str
    precision_bits: int
    order_seed: int
    settings_hash: str
    """HMAC of the run's training settings under an owner-private key: comparable, not
    invertible (veiltrain.runstate)."""
    device: str = "cpu"
    timeout_s: float = 300.0
    truncation: Literal["local", "exact"] = "local"
    """How the forward pass's products are truncated (RunConfig.truncation); operational, like
    the device: outside the settings tag, so a resume may switch."""
    lr_from_epoch: dict[int, float] = field(default_factory=dict)
    """Learning-rate changes, epoch -> lr from that epoch on (the divergence watchdog's backoff);
    empty: `lr` throughout. Public like `lr`, and outside the settings tag, so that the
    checkpoints of the epochs before a change still resume."""

    def lr_at(self, epoch: int) -> float:
        """The learning rate of one epoch (1-based)."""
        return lr_at(self.lr, self.lr_from_epoch, epoch)

    def to_json(self) -> str:
        """Serialise for the launch message on stdin or a flow parameter."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        """Parse, refusing unknown or missing fields (a message without lr_from_epoch, from
        before it existed, means a constant lr)."""
        try:
            fields = json.loads(text)
            # JSON object keys are strings; the epochs are ints again here.
            changes = {int(k): float(v) for k, v in fields.pop("lr_from_epoch", {}).items()}
            if any(e < 1 or not v > 0 for e, v in changes.items()):
                raise ValueError(f"lr_from_epoch {changes}: epochs from 1, rates above 0")
            if fields.get("truncation", "local") not in ("local", "exact"):
                raise ValueError(f"truncation {fields['truncation']!r}: 'local' or 'exact'")
            return cls(**fields, lr_from_epoch=changes)
        except (TypeError, ValueError, AttributeError) as exc:  # JSONDecodeError is a ValueError
            raise ConfigError(f"train job is malformed: {exc}") from exc


def lr_at(lr: float, changes: Mapping[int, float], epoch: int) -> float:
    """The lr of `epoch`: that of the latest change at or before it, else the base `lr`.

    One rule for the parties (TrainJob.lr_at) and the owner's plaintext shadow, so they agree.
    """
    started = [e for e in changes if e <= epoch]
    return changes[max(started)] if started else lr


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ObjectMeta(_Frozen):
    """Size and SHA-256 of one stored object."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(_Frozen):
    """A party store's table of contents, written last by the owner's upload."""

    format: Literal["veiltrain.party-manifest"] = MANIFEST_FORMAT
    version: Literal[1] = MANIFEST_VERSION
    run_id: str
    party: int = Field(ge=0)
    parties: int = Field(ge=2)
    precision_bits: int
    created: str = ""
    objects: dict[str, ObjectMeta]

    def table(self) -> dict[str, dict[str, Any]]:
        """The objects as plain dicts ({"sha256", "size"}), e.g. for store.check_objects."""
        return {name: meta.model_dump() for name, meta in self.objects.items()}

    def canonical(self) -> bytes:
        """The manifest without its time stamp: equal when it describes the same objects."""
        return json.dumps(self.model_dump(exclude={"created"}), sort_keys=True).encode()


class DatasetInfo(_Frozen):
    """dataset/info.json: public facts of a party's data shares (shapes and counts by design)."""

    count: int = Field(ge=1)
    record_words: int = Field(ge=1)
    sample_shape: tuple[int, ...]
    num_classes: int = Field(ge=1)
    format: Literal["ffrecord", "keystream"]
    seed_share: dict[str, Any] | None = None


class ModelSpec(_Frozen):
    """model/spec.json: the model factory by name (never a pickle) and its parameter shapes."""

    factory: str
    kwargs: dict[str, Any]
    sample_shape: tuple[int, ...]
    num_classes: int = Field(ge=1)
    parameters: dict[str, list[int]]


class DatasetFacts(_Frozen):
    """What encrypt_dataset returns: the public facts of the shared training set."""

    count: int = Field(ge=1)
    record_words: int = Field(ge=1)
    sample_shape: tuple[int, ...]
    num_classes: int = Field(ge=1)


class ModelFacts(_Frozen):
    """What encrypt_model returns: how many parameter tensors and values were shared."""

    parameters: int = Field(ge=0)
    values: int = Field(ge=0)


class UploadCounts(_Frozen):
    """What upload returns: objects copied, objects already in place, bytes copied."""

    uploaded: int = 0
    skipped: int = 0
    bytes: int = 0

    def __add__(self, other: UploadCounts) -> UploadCounts:
        return UploadCounts(
            uploaded=self.uploaded + other.uploaded,
            skipped=self.skipped + other.skipped,
            bytes=self.bytes + other.bytes,
        )


class TrainRun(_Frozen):
    """What the train stage returns: where the party logs are, where the parties met."""

    logs: str
    rendezvous: str


_Model = TypeVar("_Model", bound=BaseModel)


def read_model(loc: Location, name: str, model: type[_Model]) -> _Model:
    """Read and validate one JSON object; anything malformed names the object."""
    value = loc.read_json(name)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()
        )
        raise IntegrityError(f"{loc.url}/{name}: malformed ({problems})") from None


def read_manifest(loc: Location) -> Manifest:
    """A party manifest, with clear words for another format or version than this one reads."""
    raw = loc.read_json(MANIFEST)
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(f"{loc.url}/{MANIFEST}: not a veiltrain party manifest")
    if raw.get("version") != MANIFEST_VERSION:
        raise IntegrityError(
            f"{loc.url}/{MANIFEST}: version {raw.get('version')}, this veiltrain reads "
            f"{MANIFEST_VERSION}; re-run encrypt and upload with this version"
        )
    if not isinstance(raw.get("objects"), dict):
        raise IntegrityError(f"{loc.url}/{MANIFEST}: no object list")
    return read_model(loc, MANIFEST, Manifest)


def write_manifest(loc: Location, manifest: Manifest) -> None:
    """Publish a manifest (atomically: readers see the old one or the new one)."""
    loc.write_json(MANIFEST, manifest.model_dump())


# ------------------------------------------------------------------------------ locations


def owner_location(cfg: RunConfig) -> Location:
    """The owner's private store: plaintext splits, statistics, staging; never a party's."""
    return Location(cfg.owner_store, role="owner")


def staging(cfg: RunConfig, party: int) -> Location:
    """Where party i's artifacts wait before upload."""
    return owner_location(cfg).child(f"staging/party-{party}")


def party_location(cfg: RunConfig, party: int) -> Location:
    """Party i's store location as the owner reaches it (upload, reconstruction).

    With an owner identity of its own (deployment mode: the owner's worker holds only the
    owner's keys, which may write every party bucket) the owner uses it; inline, where one
    machine holds every key, it uses party i's.
    """
    role = "owner" if all(os.environ.get(v) for v in credential_variables("owner")) else None
    return Location(cfg.stores()[party], role=role or f"party-{party}")
