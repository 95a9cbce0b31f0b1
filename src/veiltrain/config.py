"""Run settings, validated once with pydantic; the same model is the Prefect parameter schema."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from veiltrain.errors import ConfigError, InsecureSetupError, VeiltrainError
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
    max_rollbacks: int = Field(
        2,
        ge=0,
        le=10,
        description=(
            "times the divergence watchdog may roll training back to the last good checkpoint "
            "and retry with a 10x lower learning rate before the train stage fails (a retry at "
            "the same rate after one lone bad step, a truncation wrap, is not counted)"
        ),
    )

    truncation: Literal["auto", "local", "exact"] = Field(
        "auto",
        description=(
            "how the parties truncate the forward pass's fixed-point products: 'local' (each "
            "its own share, CrypTen's way; now and then one activation 2^32 off, about once in "
            "435 ResNet18 steps), 'exact' (one opening more per product, never that; about "
            "1.05-1.3x the step; 2 parties on the CPU), or 'auto' (exact where "
            "built when the run's shapes and steps expect 0.01 wraps or more, else local)"
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

    @model_validator(mode="after")
    def _exact_where_built(self) -> RunConfig:
        if self.truncation == "exact" and (self.parties != 2 or self.device != "cpu"):
            # CrypTen's own truncation runs there (its three-party one wraps the same way).
            raise ValueError(
                f"--truncation exact is built for 2 parties on the CPU, not {self.parties} "
                f"parties on {self.device}; use --truncation local there"
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


_PASSED: set[str] = set()
"""Settings whose preflight passed in this process: the pipeline flow calls preflight again
(for callers that skip the CLI) and need not load the data and convert the model twice."""


def preflight(cfg: RunConfig, probe_stores: bool = False) -> None:
    """Checks before any work, so that bad input is refused in seconds, before Prefect starts.

    The data source exists and holds a trainable data set (loaded and checked as the owner's
    stage will: shapes, labels, NaN, batch size, fixed-point range), the model factory builds a
    model CrypTen can convert, store protocols resolve and, with probe_stores, every store
    answers each role that writes to it (the inline run holds every role's keys; a deployed
    run's CLI does not, so it does not probe).
    """
    targets = _store_targets(cfg) if probe_stores else []
    for label, url, _ in targets:  # writes nothing: first, as cheap as the option checks
        if _is_local(url):
            _check_local_folder(label, url)
    key = cfg.model_dump_json()
    if key not in _PASSED:
        _check_sources(cfg)
        _PASSED.add(key)
    for label, url, role in targets:  # last: only a run that passed everything else writes
        if not _is_local(url):
            _probe(label, url, role)
    if probe_stores:
        _check_rerun(cfg)


def _check_sources(cfg: RunConfig) -> None:
    from veiltrain import data

    if cfg.dataset != "digits":
        path = Path(cfg.dataset).expanduser()
        if not path.exists():
            raise ConfigError(
                f"--dataset {cfg.dataset!r}: no such file or folder ({path.resolve()}); give "
                "'digits', an .npz file or an image folder"
            )
        if not (path.is_dir() or (path.suffix == ".npz" and path.is_file())):
            raise ConfigError(
                f"--dataset {cfg.dataset!r}: not 'digits', an .npz file or an image folder; "
                "save the data with numpy.savez(path, x=..., y=...)"
            )
    for url in [*cfg.stores(), cfg.owner_store]:
        _check_protocol(url)
    # The data first: it needs no torch, so a bad file is refused in a second or two.
    ds = data.load(cfg.dataset, cfg.test_fraction, cfg.seed, cfg.max_samples)
    data.check_trainable(ds, cfg.dataset, cfg.batch_size, cfg.standardize, cfg.precision_bits)
    from veiltrain import models  # imports torch (a few seconds)

    models.resolve(cfg.model)
    source = None
    if cfg.warm_start:
        from veiltrain import warmstart  # imports the checkpoint and report machinery

        source = warmstart.locate(cfg)
    spec = _check_model(cfg, list(ds.sample_shape), ds.num_classes)
    if source is not None:
        warmstart.check_model(cfg, source, spec)


def _check_model(cfg: RunConfig, shape: list[int], classes: int) -> dict[str, Any]:
    """Build the model as the owner will, then check what CrypTen and the encoder need."""
    from veiltrain import models, owner

    try:
        model, spec = owner.model_spec(cfg, shape, classes)
    except VeiltrainError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's forward() may fail in any way
        raise ConfigError(
            f"--model {cfg.model!r}: a forward pass on samples of shape {tuple(shape)} raised "
            f"{type(exc).__name__}: {str(exc)[:300]}; adjust the model or --model-kwargs"
        ) from exc
    models.check_layers(model, cfg.model)
    _check_weights(model, cfg)
    models.check_convertible(model, tuple(shape), cfg.model)
    return spec


def _check_weights(model: Any, cfg: RunConfig) -> None:
    """The initial weights are encoded too (encrypt_model): refuse any beyond the range."""
    from veiltrain import sharing

    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        try:
            sharing.encode(tensor.detach().double().numpy(), cfg.precision_bits)
        except ConfigError as exc:
            raise ConfigError(
                f"--model {cfg.model!r}: initial parameter {name!r} cannot be encoded: {exc}"
            ) from exc


def _check_protocol(url: str) -> None:
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            f"store URL {url!r}: unknown or unavailable protocol {protocol!r}"
        ) from exc


_PROBE_TIMEOUTS = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 1}}
"""A probe asks once and briefly: an unreachable store should be refused in seconds, not after
the run's retries (which are for a store that goes away during a run)."""


def _store_targets(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """(what, URL, role) for every store the run writes, once per role that writes there.

    Remote stores are probed by writing and deleting one empty object (a failed probe leaves
    nothing behind); local folders only get the check that they can be created.
    """
    from veiltrain.contract import party_location

    targets = [("--owner-store", cfg.owner_store, "owner")]
    for i, url in enumerate(cfg.stores()):
        roles = dict.fromkeys([party_location(cfg, i).role, f"party-{i}"])  # ordered, no repeats
        targets += [(f"party {i}'s store", url, role) for role in roles]
    return targets


def _check_rerun(cfg: RunConfig) -> None:
    """A rerun of a --run-id resumes its checkpoints: refuse other training options now rather
    than in the pipeline's first stage (the same check, runstate.check_settings)."""
    from veiltrain import runstate
    from veiltrain.contract import owner_location

    previous = runstate.load(owner_location(cfg))
    if previous is not None:
        runstate.check_settings(previous, cfg)


def _is_local(url: str) -> bool:
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    return protocol in ("file", "local")


def _check_local_folder(label: str, url: str) -> None:
    import os

    path = Path(url.split("://", 1)[1] if "://" in url else url).expanduser().resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{label} {url}: cannot be created or written, {existing} is not a folder this "
            "user may write to; choose another location or fix the permissions"
        )


def _probe(label: str, url: str, role: str) -> None:
    from veiltrain.store import Location, credential_variables, s3_options

    options: dict[str, Any] = {}
    if url.startswith(("s3://", "s3a://")):
        options = {**s3_options(role), "config_kwargs": _PROBE_TIMEOUTS}
    where = f"{label} {url} (role {role}, keys {'/'.join(credential_variables(role))})"
    loc = Location(url, role=role, **options)
    name = loc.path(f".veiltrain-preflight-{secrets.token_hex(4)}")
    _probe_call(where, "nothing was written", loc.fs.pipe_file, name, b"")
    _probe_call(where, f"remove the empty object {name} by hand", loc.fs.rm_file, name)


def _probe_call(where: str, left: str, fn: Any, *args: Any) -> None:
    from veiltrain.errors import StoreError
    from veiltrain.store import STORE_FAILURES, store_error

    try:
        fn(*args)
    except FileNotFoundError as exc:
        raise StoreError(f"{where}: the bucket does not exist; create it or fix the URL") from exc
    except STORE_FAILURES as exc:
        if type(exc).__name__ == "NoCredentialsError":  # botocore's; found no keys anywhere
            raise StoreError(
                f"{where}: no credentials for this role; set both variables (nothing was written)"
            ) from exc
        error = store_error(where, exc)
        raise type(error)(f"{error} (preflight; {left})") from exc
