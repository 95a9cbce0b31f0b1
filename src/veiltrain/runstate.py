"""The owner's private record of a run: its key, data fingerprint, settings and their keyed tag.

A run is encrypted once. Everything that changes training (data, split, scaling, model, batch,
learning rate, loss, parties, precision, seed) is fixed by its first encryption; a later stage or
resume with the same run id must match it, or it is refused. Parties only ever see `tag`, an
HMAC under a 256-bit owner-private key: an unkeyed hash of public settings plus `--seed` gave the
seed back in under a second.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from veiltrain.config import RunConfig
from veiltrain.data import Dataset
from veiltrain.errors import ConfigError, IntegrityError
from veiltrain.store import Location

RECORD = "private/run.json"
_BLAKE3_PREFIX = "blake3:"
_DIGEST_ROWS = 1024  # training samples gathered and hashed at a time
KEY_BYTES = 32
TRAINING_OPTIONS = (
    "dataset",
    "max_samples",
    "test_fraction",
    "standardize",
    "seed",
    "model",
    "model_kwargs",
    "batch_size",
    "lr",
    "loss",
    "parties",
    "precision_bits",
    "warm_start",
)
"""Options that change what is trained; `epochs` may grow on a resume, the rest is operational.

`warm_start` (the run a run starts from) is one of them: it fixes the initial weights. Like the
others it reaches parties only inside the keyed tag, and their job is the same as for any run.
"""


@dataclass(frozen=True)
class RunState:
    """What the owner fixed when it first encrypted a run (stored under OWNER/private/)."""

    run_id: str
    key: bytes
    fingerprint: str
    settings: dict[str, Any]
    order_seed: int
    dataset: dict[str, Any]

    @property
    def tag(self) -> str:
        """The keyed settings tag parties carry in their job and checkpoints."""
        body = {
            "run_id": self.run_id,
            "settings": self.settings,
            "fingerprint": self.fingerprint,
            "order_seed": self.order_seed,
        }
        return hmac.new(self.key, _canonical(body), hashlib.sha256).hexdigest()

    def model_init_key(self, seed: int) -> bytes:
        """The 256-bit key of the initial weights: --seed picks them, the run key hides them."""
        return hmac.new(self.key, f"veiltrain/model-init/{seed}".encode(), hashlib.sha256).digest()

    def to_json(self) -> dict[str, Any]:
        """The record as stored (owner-private: it holds the key)."""
        return {
            "run_id": self.run_id,
            "key": self.key.hex(),
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "order_seed": self.order_seed,
            "dataset": self.dataset,
        }

    @classmethod
    def from_json(cls, value: Any, where: str) -> RunState:
        """Parse a stored record, naming it when malformed."""
        try:
            return cls(
                run_id=str(value["run_id"]),
                key=bytes.fromhex(value["key"]),
                fingerprint=str(value["fingerprint"]),
                settings=dict(value["settings"]),
                order_seed=int(value["order_seed"]),
                dataset=dict(value["dataset"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{where}: malformed run record ({exc!r})") from exc


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def settings_of(cfg: RunConfig) -> dict[str, Any]:
    """The training options of a config, with a local data path made absolute."""
    settings = {name: getattr(cfg, name) for name in TRAINING_OPTIONS}
    if cfg.dataset != "digits":
        settings["dataset"] = str(Path(cfg.dataset).expanduser().resolve())
    return json.loads(_canonical(settings))  # type: ignore[no-any-return]  # JSON round trip


def fingerprint(key: bytes, ds: Dataset) -> str:
    """Keyed digest of the plaintext split: detects a changed data source, reveals nothing.

    BLAKE3 in its keyed mode (a PRF under the 256-bit run key), 5x faster here than the
    HMAC-SHA256 that runs encrypted before 2026-12 still carry (`same_data` reads both): the
    owner hashes the whole data set on every encryption, beside the encoding, on the same cores.
    """
    mac = blake3.blake3(key=key)
    _digest_split(mac, ds)
    return _BLAKE3_PREFIX + mac.hexdigest()


def same_data(state: RunState, ds: Dataset) -> bool:
    """Whether `ds` is the data a run was encrypted from, by the run's own kind of fingerprint."""
    if state.fingerprint.startswith(_BLAKE3_PREFIX):
        computed = fingerprint(state.key, ds)
    else:
        mac = hmac.new(state.key, digestmod=hashlib.sha256)  # a run from before BLAKE3
        _digest_split(mac, ds)
        computed = mac.hexdigest()
    return hmac.compare_digest(computed, state.fingerprint)


def _digest_split(mac: Any, ds: Dataset) -> None:
    """The split's arrays, each as its dtype, shape and bytes; the training features are
    gathered a chunk at a time, in split order (the same bytes as the whole array's)."""
    shape = [ds.train_count, *ds.sample_shape]
    mac.update(_canonical([str(ds.x_source.dtype), shape]))
    for first in range(0, ds.train_count, _DIGEST_ROWS):
        _update(mac, ds.train_features(np.arange(first, min(first + _DIGEST_ROWS, ds.train_count))))
    for array in (ds.y_train, ds.x_test, ds.y_test):
        mac.update(_canonical([str(array.dtype), list(array.shape)]))
        _update(mac, array)
    mac.update(_canonical(ds.classes))


def _update(mac: Any, array: np.ndarray[Any, Any]) -> None:
    mac.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # no copy


def new_key() -> bytes:
    """A fresh owner-private run key from the OS CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def load(owner: Location) -> RunState | None:
    """The run record in an owner store, or None before the first encryption."""
    if not owner.exists(RECORD):
        return None
    return RunState.from_json(owner.read_json(RECORD), f"{owner.url}/{RECORD}")


def require(owner: Location, run_id: str) -> RunState:
    """The run record, or an error saying which stage to run first."""
    state = load(owner)
    if state is None:
        raise ConfigError(
            f"{owner.url}: run {run_id} has not been encrypted here; run encrypt_dataset first"
        )
    return state


def save(owner: Location, state: RunState) -> None:
    """Write the record (atomically) into owner state."""
    owner.write_json(RECORD, state.to_json())


def check_settings(state: RunState, cfg: RunConfig) -> None:
    """Refuse a config whose training options differ from what the run was encrypted with."""
    now = settings_of(cfg)
    was = {name: _stored(state, name) for name in TRAINING_OPTIONS}
    changed = [name for name in TRAINING_OPTIONS if was[name] != now[name]]
    if state.run_id != cfg.run_id:
        raise ConfigError(
            f"owner store holds run {state.run_id!r}, not {cfg.run_id!r}; give each run its own "
            "--owner-store (the default OUT/owner does)"
        )
    if changed:
        lines = [
            f"--{name.replace('_', '-')}: was {was[name]!r}, now {now[name]!r}" for name in changed
        ]
        raise ConfigError(
            f"run {cfg.run_id} was encrypted with other training options; resume it with the "
            "same options or start a new run (a new --run-id):\n  " + "\n  ".join(lines)
        )


def _stored(state: RunState, name: str) -> Any:
    """A stored training option; one added after the run was recorded had its default then."""
    if name in state.settings:
        return state.settings[name]
    return RunConfig.model_fields[name].get_default(call_default_factory=True)
