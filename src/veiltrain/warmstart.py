"""Warm start (scheduled retraining): a new run starts from a previous run's trained shares.

The model is never put back together between runs. The owner reads each party's share of the
previous run's newest complete checkpoint, adds a fresh sharing of zero (so a party cannot link
its new share to its old one, and the sum is unchanged) and stages the result as this run's
initial parameters. The plaintext shadow starts from the model the previous run's report already
decrypted (its OUT/model.safetensors), not from a new reconstruction.

Where the previous run lives: its locations are this run's with this run's id in their paths
replaced by the previous run id. By default every location contains it (OUT = runs/<run id>,
owner store OUT/owner, party stores OUT/store/party-<i>/<run id>), so runs/<previous id> is found.
An explicit --out or --owner-store must contain the run id too (e.g. s3://owner/<run id>); an
explicit --store or --party-store base is shared by runs and used as it is (BASE/<previous id>).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors

from veiltrain import checkpoints, runstate, sharing
from veiltrain.config import RunConfig
from veiltrain.contract import (
    PRIVATE_INITIAL,
    PRIVATE_MODEL_SPEC,
    ModelSpec,
    owner_location,
    party_location,
    read_model,
)
from veiltrain.errors import ConfigError, IntegrityError
from veiltrain.store import Location

PIN = "private/warm_start.json"
"""Owner-private: which checkpoint of the previous run this run started from (fixed once)."""
MODEL = "model.safetensors"
REPORT = "report.json"
_ANY_EPOCH = 1 << 30
"""A run's epoch count is not in its record (it may grow on a resume): take its newest epoch."""


class Pin(BaseModel):
    """The previous run's checkpoint a warm-started run was first encrypted from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    epoch: int = Field(ge=1)
    attempt: int = Field(ge=1)


@dataclass(frozen=True)
class Source:
    """The previous run: its report folder, party stores, model and final checkpoint."""

    run_id: str
    out: Location
    parties: list[Location]
    ident: checkpoints.Identity
    spec: ModelSpec
    epoch: int
    attempt: int
    pinned: bool
    """Whether this run was warm-started before (a rerun): the start is then fixed already."""

    def pin(self) -> Pin:
        """The checkpoint this source starts from, as recorded for reruns."""
        return Pin(run_id=self.run_id, epoch=self.epoch, attempt=self.attempt)


def _flag(cfg: RunConfig) -> str:
    return f"--warm-start {cfg.warm_start}"


# ------------------------------------------------------------------------ finding the run


def _swap(cfg: RunConfig, url: str) -> str | None:
    """`url` with its last path component equal to this run's id replaced; None if it has none."""
    path, mark, query = url.partition("?")
    parts = path.split("/")
    where = [i for i, part in enumerate(parts) if part == cfg.run_id]
    if not where:
        return None
    parts[where[-1]] = cfg.warm_start  # the last one: the most specific folder
    return "/".join(parts) + mark + query


def _required(cfg: RunConfig, url: str, option: str) -> str:
    """A per-run location of the previous run; it must name this run's id to be derived."""
    swapped = _swap(cfg, url)
    if swapped is None:
        raise ConfigError(
            f"{_flag(cfg)}: the previous run's {option} cannot be derived from {url!r}, which "
            f"does not contain this run's id {cfg.run_id!r}; use the default layout "
            "(runs/<run id>) or put the run id in the path"
        )
    return swapped


def previous_config(cfg: RunConfig) -> RunConfig:
    """The previous run's locations: this run's with the previous run id in place of its own.

    --out and --owner-store hold one run each, so they must contain the run id. Party store
    bases are shared by runs (each run is BASE/<run id>): a base that contains the run id (the
    default OUT/store) has it replaced, any other is used as it is.
    """
    return cfg.model_copy(
        update={
            "run_id": cfg.warm_start,
            "warm_start": "",
            "out": _required(cfg, cfg.out, "--out"),
            "owner_store": _required(cfg, cfg.owner_store, "--owner-store"),
            "store": _swap(cfg, cfg.store) or cfg.store,
            "party_stores": [_swap(cfg, url) or url for url in cfg.party_stores],
        }
    )


def locate(cfg: RunConfig) -> Source:
    """The previous run and the checkpoint to start from, refusing anything that cannot work.

    A run that was already warm-started keeps its first choice (its pin): a newer checkpoint of
    the previous run must not change the start of a run that may have trained already.
    """
    prev = previous_config(cfg)
    owner = owner_location(prev)
    state = runstate.load(owner)
    if state is None or state.run_id != prev.run_id:
        raise ConfigError(
            f"{_flag(cfg)}: no run {prev.run_id} at {owner.url} (its owner record "
            f"{runstate.RECORD} is missing); give the id of a finished run whose owner store "
            "and outputs are kept"
        )
    _check_settings(cfg, state.settings)
    parties = [party_location(prev, i) for i in range(prev.parties)]
    ident = checkpoints.Identity(prev.run_id, state.tag)
    pin = _load_pin(cfg)
    epoch, attempt = _checkpoint(cfg, parties, ident, pin)
    out = Location(prev.out, role="owner")
    spec = _spec(cfg, owner)
    source = Source(prev.run_id, out, parties, ident, spec, epoch, attempt, pin is not None)
    if not source.pinned:
        _check_outputs(cfg, source)
    return source


def _check_settings(cfg: RunConfig, settings: dict[str, Any]) -> None:
    """Shares fit only the same party count, fixed-point precision and model factory."""
    for name, now in (
        ("parties", cfg.parties),
        ("precision_bits", cfg.precision_bits),
        ("model", cfg.model),
    ):
        was = settings.get(name)
        if was != now:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{_flag(cfg)}: run {cfg.warm_start} was trained with {flag} {was}, this run "
                f"has {flag} {now}; its shares only fit the same {flag}"
            )


def _spec(cfg: RunConfig, owner: Location) -> ModelSpec:
    if not owner.exists(PRIVATE_MODEL_SPEC):
        raise ConfigError(
            f"{_flag(cfg)}: run {cfg.warm_start} has no model ({owner.url}/"
            f"{PRIVATE_MODEL_SPEC} is missing); it never got past encrypt_dataset"
        )
    return read_model(owner, PRIVATE_MODEL_SPEC, ModelSpec)


def _load_pin(cfg: RunConfig) -> Pin | None:
    owner = owner_location(cfg)
    return read_model(owner, PIN, Pin) if owner.exists(PIN) else None


def _checkpoint(
    cfg: RunConfig, parties: list[Location], ident: checkpoints.Identity, pin: Pin | None
) -> tuple[int, int]:
    """(epoch, attempt): the pinned checkpoint if any, else the newest complete common one."""
    if pin is None:
        found = checkpoints.newest_common(parties, ident, _ANY_EPOCH)
        if found is not None:
            return found.epoch, found.attempt
    elif pin.run_id == cfg.warm_start and _holds(parties, ident, pin):
        return pin.epoch, pin.attempt
    which = "" if pin is None else f" at epoch {pin.epoch}, where this run started from"
    raise ConfigError(
        f"{_flag(cfg)}: no complete checkpoint of run {cfg.warm_start}{which} from one "
        f"training attempt in every party store ({', '.join(p.url for p in parties)}); "
        "train that run first, or keep its checkpoints until this run has finished"
    )


def _holds(parties: list[Location], ident: checkpoints.Identity, pin: Pin) -> bool:
    return all(
        checkpoints.candidates(loc, ident, pin.epoch).get(pin.epoch) == pin.attempt
        and checkpoints.verified(loc, pin.epoch, ident)
        for loc in parties
    )


def _check_outputs(cfg: RunConfig, source: Source) -> None:
    """The previous report must describe the checkpoint we start from: the shadow starts there."""
    stored = source.out.read_json(REPORT) if source.out.exists(REPORT) else {}
    report: dict[str, Any] = stored if isinstance(stored, dict) else {}
    covered = (report.get("run_id"), report.get("epochs"), report.get("final_attempt"))
    # Reports written before final_attempt existed are trusted on the epoch alone.
    ok = covered[:2] == (source.run_id, source.epoch) and covered[2] in (None, source.attempt)
    if not ok or not source.out.exists(MODEL):
        raise ConfigError(
            f"{_flag(cfg)}: the report of run {source.run_id} at {source.out.url} does not "
            f"cover its checkpoint of epoch {source.epoch} (it covers epoch {covered[1]}); "
            f"build that run's report (decrypt_and_report) first: this run's plaintext shadow "
            f"starts from its {MODEL}"
        )


# ------------------------------------------------------------------------- the new start


def check_model(cfg: RunConfig, source: Source, spec: dict[str, Any]) -> None:
    """Refuse a model other than the previous run's: its shares would not fit the graph."""
    if _canonical(spec["kwargs"]) != _canonical(source.spec.kwargs):
        raise ConfigError(
            f"{_flag(cfg)}: run {source.run_id} built {source.spec.factory} with kwargs "
            f"{source.spec.kwargs}, this run with {spec['kwargs']}; give the same "
            "--model-kwargs (and data of the same shape)"
        )
    before, now = source.spec.parameters, spec["parameters"]
    if before != now:
        differing = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
        raise ConfigError(
            f"{_flag(cfg)}: parameter shapes differ from run {source.run_id}'s: "
            + ", ".join(f"{n} {before.get(n)} -> {now.get(n)}" for n in differing[:5])
        )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def start(
    cfg: RunConfig, spec: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """This run's initial state: the shadow's plaintext start and each party's new share.

    Records the checkpoint it starts from (the pin) before anything is staged. A rerun draws
    a new zero-sharing of the pinned checkpoint and keeps the plaintext start it wrote first.
    """
    source = locate(cfg)
    check_model(cfg, source, spec)
    owner_location(cfg).write_json(PIN, source.pin().model_dump())
    shares = [
        checkpoints.read_params(loc, source.epoch, source.ident, source.attempt)
        for loc in source.parties
    ]
    _check_shares(source, shares)
    return _plaintext_start(cfg, source), rerandomise(shares)


def _check_shares(source: Source, shares: list[dict[str, torch.Tensor]]) -> None:
    """Every party's checkpoint holds int64 shares of exactly the previous model's parameters."""
    expected = {name: list(shape) for name, shape in source.spec.parameters.items()}
    for party, tensors in enumerate(shares):
        found = {name: list(t.shape) for name, t in tensors.items()}
        if found != expected or any(t.dtype != torch.int64 for t in tensors.values()):
            raise IntegrityError(
                f"--warm-start {source.run_id}: party {party}'s checkpoint of run {source.run_id}, "
                f"epoch {source.epoch}, does not hold int64 shares of that run's parameters"
            )


def rerandomise(shares: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Add a fresh sharing of zero to every party's share: the same sum, unlinkable shares.

    The zero-sharing's masks come from new ChaCha20 seeds (the OS CSPRNG), never from torch's
    generators or --seed; int64 addition wraps mod 2^64 like the shares themselves.
    """
    out: list[dict[str, torch.Tensor]] = [{} for _ in shares]
    for name, first in shares[0].items():
        zeros = sharing.split_full(np.zeros(tuple(first.shape), dtype=np.int64), len(shares))
        for party, zero in enumerate(zeros):
            fresh = np.add(shares[party][name].numpy(), zero)
            out[party][name] = torch.from_numpy(fresh).contiguous()
    return out


def _plaintext_start(cfg: RunConfig, source: Source) -> dict[str, torch.Tensor]:
    """The decrypted parameters the shares hold, for the shadow: written once per run."""
    own = owner_location(cfg)
    if source.pinned and own.exists(PRIVATE_INITIAL):
        # The previous run's report may have moved on since (more epochs): keep the first copy.
        return load_safetensors(own.read_bytes(PRIVATE_INITIAL))
    _check_outputs(cfg, source)
    return previous_model(source)


def previous_model(source: Source) -> dict[str, torch.Tensor]:
    """The previous run's decrypted final parameters, as its report wrote them (owner-local)."""
    state = load_safetensors(source.out.read_bytes(MODEL))
    missing = sorted(set(source.spec.parameters) - set(state))
    if missing:
        raise ConfigError(
            f"--warm-start {source.run_id}: {source.out.url}/{MODEL} lacks {missing[:5]}; "
            "rebuild that run's report"
        )
    return {name: state[name].float().contiguous() for name in source.spec.parameters}
