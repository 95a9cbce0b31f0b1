"""Run settings, validated once with pydantic; the same model is the Prefect parameter schema."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from veiltrain.errors import ConfigError, InsecureSetupError
from veiltrain.sharing import MAX_ENCODED_BITS

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random suffix."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class RunConfig(BaseModel):
    """Everything one pipeline run needs; only JSON-friendly values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(
        "digits", description="'digits', a PATH.npz, or an image folder (one sub-folder per class)"
    )
    model: str = Field(
        "small-cnn", description="'small-cnn', 'resnet18' or 'package.module:factory'"
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the model factory"
    )
    epochs: int = Field(3, ge=1, le=1000, description="passes over the training set")
    batch_size: int = Field(64, ge=2, le=65536, description="samples per SGD step")
    lr: float = Field(0.2, gt=0, le=100, description="SGD learning rate")
    loss: Literal["cross-entropy", "mse"] = Field(
        "cross-entropy", description="cross-entropy | mse"
    )
    parties: int = Field(2, description="compute parties (non-colluding); at least 2")
    # One rule with the encoder: sharing refuses precision_bits >= MAX_ENCODED_BITS mid-run.
    precision_bits: int = Field(
        16,
        ge=8,
        lt=MAX_ENCODED_BITS,
        description=f"fractional bits of the fixed-point encoding (8..{MAX_ENCODED_BITS - 1})",
    )
    seed: int = Field(
        0,
        ge=0,
        description=(
            "initial weights and the owner's shuffle and test split "
            "(never masks; parties never see it)"
        ),
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="the parties' device: cpu | cuda")
    standardize: bool = Field(True, description="standardise features with owner-only statistics")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share kept by the owner")
    max_samples: int | None = Field(
        None, ge=10, description="use only the first N samples (quick runs)"
    )
    out: str = Field("", description="owner's output folder; default runs/<run id>")
    store: str = Field(
        "", description="store URL; party i uses STORE/party-<i>/<run id>; default OUT/store"
    )
    party_stores: list[str] = Field(
        default_factory=list, description="one store URL per party (each used as URL/<run id>)"
    )
    owner_store: str = Field("", description="owner-only URL for private state; default OUT/owner")
    timeout_s: float = Field(
        300.0, gt=0, le=86400, description="longest wait for any party or network"
    )
    run_id: str = Field("", description="fixed run id (default: time and random suffix)")
    warm_start: str = Field(
        "",
        description=(
            "run id of a finished run whose trained parameter shares this run starts from "
            "(re-randomised, never decrypted); found where this run's stores are, with the "
            "run id in their paths replaced"
        ),
    )

    @field_validator("parties")
    @classmethod
    def _two_parties(cls, v: int) -> int:
        if v < 2:
            raise InsecureSetupError(
                f"--parties {v}: with one compute party its share IS the data (times 2^16); "
                "use 2 or more non-colluding parties"
            )
        if v > 16:
            raise ValueError("at most 16 parties are supported")
        return v

    @field_validator("run_id", "warm_start")
    @classmethod
    def _run_id(cls, v: str) -> str:
        if v and not _RUN_ID.match(v):
            raise ValueError("run id: letters, digits, '_', '.', '-' only, at most 64 characters")
        return v

    @model_validator(mode="after")
    def _stores(self) -> RunConfig:
        if self.party_stores and len(self.party_stores) != self.parties:
            raise ValueError(
                f"--party-store given {len(self.party_stores)} times for {self.parties} parties"
            )
        check_locations(self)
        return self

    @model_validator(mode="after")
    def _not_from_itself(self) -> RunConfig:
        if self.warm_start and self.warm_start == self.run_id:
            # A rerun of one run id resumes from its checkpoints; it cannot also start over.
            raise ValueError(
                f"--warm-start {self.warm_start}: a run cannot start from itself; give the id "
                "of a previous run (a rerun of the same --run-id resumes by itself)"
            )
        return self

    def resolved(self) -> RunConfig:
        """Fill in run id and default locations (done once, by the owner, before any work)."""
        run_id = self.run_id or new_run_id()
        out = self.out or str(Path("runs") / run_id)
        out = str(Path(out).expanduser().resolve())
        store = self.store or (Path(out) / "store").as_uri()
        owner = self.owner_store or str(Path(out) / "owner")
        resolved = self.model_copy(
            update={"run_id": run_id, "out": out, "store": store, "owner_store": owner}
        )
        # model_copy skips validators, and the defaults just filled in may overlap a party.
        check_locations(resolved)
        return resolved

    def party_bases(self) -> list[str]:
        """One base URL per party, not yet scoped by run: explicit, or STORE/party-<i>."""
        if self.party_stores:
            return list(self.party_stores)
        base = (self.store or "store").rstrip("/")
        return [f"{base}/party-{i}" for i in range(self.parties)]

    def stores(self) -> list[str]:
        """One URL per party, scoped by run: BASE/<run id>, so runs never overwrite each other."""
        if not self.run_id:
            raise ConfigError(
                "party store URLs need a run id: call RunConfig.resolved() first (or give --run-id)"
            )
        return [f"{base.rstrip('/')}/{self.run_id}" for base in self.party_bases()]


# Protocols that name the same store under another spelling (fsspec maps each pair to one class).
_SAME_PROTOCOL = {
    "s3a": "s3",
    "s3n": "s3",
    "gcs": "gs",
    "abfs": "az",
    "abfss": "az",
    "local": "file",
}

Place = tuple[str, tuple[str, ...]]


def _place(url: str) -> Place:
    """A location as (protocol, path components): one value for every spelling of one place."""
    protocol, sep, rest = url.partition("://")
    protocol = protocol.lower() if sep else "file"
    protocol = _SAME_PROTOCOL.get(protocol, protocol)
    if protocol == "file":
        path = rest if sep else url
        path = path.removeprefix("localhost") if path.startswith("localhost/") else path
        # Local only (no network): symlinks and relative paths resolve to one absolute path.
        return protocol, Path(path).expanduser().resolve().parts
    parts: list[str] = []
    for part in rest.split("?", 1)[0].split("/"):
        if part == "..":
            # Object stores keep '..' literally; treating it as a step up only errs on refusing.
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    if parts:
        parts[0] = parts[0].lower()  # bucket and host names are case-insensitive
    return protocol, tuple(parts)


def _contains(outer: Place, inner: Place) -> bool:
    """Whether inner is outer or below it, by whole components (/a holds /a/b, not /ab)."""
    return outer[0] == inner[0] and inner[1][: len(outer[1])] == outer[1]


def _overlap(a: str, b: str) -> bool:
    """Whether two locations are the same place or one lies inside the other."""
    pa, pb = _place(a), _place(b)
    return _contains(pa, pb) or _contains(pb, pa)


def check_locations(cfg: RunConfig) -> None:
    """Refuse party, owner and output locations that overlap: one role could read another's."""
    bases = cfg.party_bases()
    for i, j in combinations(range(len(bases)), 2):
        if _overlap(bases[i], bases[j]):
            raise InsecureSetupError(
                f"--party-store/--store: party {i} ({bases[i]!r}) and party {j} "
                f"({bases[j]!r}) share one store location (the same place, or one inside the "
                "other), so each could read the other's shares; give each party its own location"
            )
    for i, base in enumerate(bases):
        if cfg.out and _contains(_place(base), _place(cfg.out)):
            raise InsecureSetupError(
                f"--out {cfg.out!r} lies inside party {i}'s store location {base!r}, so that "
                "party could read the report and the decrypted model; choose an --out outside "
                "every party store"
            )
        if cfg.owner_store and _overlap(cfg.owner_store, base):
            raise InsecureSetupError(
                f"--owner-store {cfg.owner_store!r} and party {i}'s store location {base!r} "
                "overlap (the same place, or one inside the other), so the party could read "
                "the owner's plaintext data; put the owner store apart from every party store"
            )


def load_config(**options: Any) -> RunConfig:
    """Validate options, turning pydantic's report into one ConfigError naming each bad option."""
    try:
        return RunConfig(**options)
    except ValidationError as exc:
        insecure = [
            e for e in exc.errors() if isinstance(e.get("ctx", {}).get("error"), InsecureSetupError)
        ]
        lines = [_describe(e) for e in exc.errors()]
        error = InsecureSetupError if insecure else ConfigError
        raise error("invalid options:\n  " + "\n  ".join(lines)) from None


def _describe(error: Any) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()))
    if not where:  # a check across options: its message names them itself
        return str(error.get("msg", "invalid options")).removeprefix("Value error, ")
    flag = "--" + where.replace("_", "-")
    return f"{flag}: {error.get('msg', 'invalid')} (got {error.get('input')!r})"


def preflight(cfg: RunConfig) -> None:
    """Cheap checks before any work: the data source exists, the model and stores resolve."""
    from veiltrain import models

    if cfg.dataset != "digits":
        path = Path(cfg.dataset).expanduser()
        if not (path.is_dir() or (path.suffix == ".npz" and path.is_file())):
            raise ConfigError(
                f"--dataset {cfg.dataset!r}: not 'digits', an existing .npz file or an image folder"
            )
    models.resolve(cfg.model)
    for url in [*cfg.stores(), cfg.owner_store]:
        _check_protocol(url)
    if cfg.warm_start:
        from veiltrain import warmstart  # imports the checkpoint and report machinery

        warmstart.locate(cfg)


def _check_protocol(url: str) -> None:
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            f"store URL {url!r}: unknown or unavailable protocol {protocol!r}"
        ) from exc
