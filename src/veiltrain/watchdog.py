"""Divergence watchdog: the owner checks the decrypted loss curve and rolls a diverged run back.

On shares a too-high learning rate does not end in NaN or an error: fixed-point values wrap
around the ring (Z/2^64) and training goes on, silently, on garbage. Only the owner can see it,
in the decrypted losses. After the parties have trained, the owner's train stage reconstructs the
loss curve (through the report module, so every reveal is in the ledger), finds the first bad
epoch, removes that epoch's and every later checkpoint record in every party store, and reruns the
parties with the learning rate from that epoch on 10x lower (TrainJob.lr_from_epoch). The
checkpoints of the good epochs resume unchanged. At most `max_rollbacks` times; then the stage
fails and says what to do.

Thresholds (measured with digits, 128 training samples, batch 32, small CNN; NOTES.md):

- NaN or infinity: impossible after a fixed-point decode (int64 / 2^f), checked anyway.
- |loss| >= OVERFLOW_LIMIT (1e4): wrapped. Cross-entropy on shares cannot legitimately get near
  it: CrypTen's exp, (1 + x/256)^256, itself wraps once a logit gap passes about 550, so a
  correctly computed loss stays below that. Wrapped losses measured at 16 fractional bits were
  1e7 to 6e8 (lr 5, 20, 50).
- loss < -NEGATIVE_TOLERANCE (0.1): both losses are means of non-negative terms, so a negative
  one wrapped around. The tolerance covers the exp approximation's error (the owner takes the log).
- a jump: an epoch whose mean loss exceeds the best so far (the first step's loss, then each
  good epoch's mean) by more than a chance-level loss (the larger of the untrained model's first
  loss and guessing: ln K for cross-entropy, (K-1)/K^2 for MSE on one-hot targets). Such an
  epoch lost more than training from scratch could ever gain: it diverged, wrapped or not. Epoch
  means, not single steps: one noisy batch of a healthy run never moves a mean that far.

A lone bad step (nan, overflow or negative) whose later steps are all healthy is most likely not
divergence but a wrap of the parties' share-wise truncation: each party truncates its own share
of a product, and for a value x at scale 2^32 the two shares overflow together with probability
about |x| / 2^64 (ResNet18 meets one in about 435 steps; bench/bench_truncation.py), putting
one activation 2^32 off. Emulated in a ResNet-style run, one such wrap in the forward pass gave
that step a loss near 2e9 and left the later steps' losses healthy, but the decrypted model's
parity with plaintext weaker (NOTES.md, thirteenth session). Its epoch is retrained once at the
same learning rate (a retry, with fresh protocol randomness; not counted in `max_rollbacks`);
if the epoch goes wrong again, the learning rate is lowered as for divergence. `--truncation
exact` (veiltrain.truncation) removes such wraps from the forward pass.

The rollback record (private/watchdog.json in the owner's store) keeps the schedule, so a rerun
of the stage, the report's plaintext shadow and a later resume all use the same learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, TypeVar

from veiltrain import checkpoints, runstate
from veiltrain.config import RunConfig
from veiltrain.contract import TrainJob, lr_at, owner_location, party_location
from veiltrain.errors import IntegrityError, VeiltrainError

OVERFLOW_LIMIT = 1e4
"""A decoded loss at or beyond this magnitude wrapped around the fixed-point ring."""
NEGATIVE_TOLERANCE = 0.1
"""How far below zero a decoded loss may be (approximation error) before it counts as wrapped."""
LR_BACKOFF = 0.1
"""A rollback multiplies the learning rate by this. Wrap-around is a cliff, not a slope: lr 20
wraps at step 3, lr 5 within two epochs, lr 2 trains (NOTES.md); halving would need three
reruns, each costing the parties' start and every epoch after the rollback."""
RECORD = "private/watchdog.json"
"""The rollbacks of a run, in the owner's store (decrypted facts: never uploaded)."""

Kind = Literal["nan", "overflow", "negative", "jump"]
R = TypeVar("R")


class DivergenceError(VeiltrainError, RuntimeError):
    """Training diverged and the watchdog may not (or cannot usefully) roll back again."""


@dataclass(frozen=True)
class Divergence:
    """The first bad epoch of a loss curve, and why.

    `reason` holds no decrypted value: it reaches logs, error messages and Prefect states.
    """

    epoch: int
    step: int
    """The first bad global step (1-based); for a jump, the epoch's first step."""
    kind: Kind
    reason: str
    lone: bool = False
    """The only bad step, with healthy steps after it: most likely a truncation wrap."""


@dataclass(frozen=True)
class Rollback:
    """One rollback: the epoch training restarted at, why, and its learning rate from then on
    (unchanged for a retry after a lone bad step)."""

    epoch: int
    reason: str
    lr: float
    retry: bool = False


# ---------------------------------------------------------------------------------- detection


def chance_loss(loss: str, num_classes: int) -> float:
    """The loss of guessing uniformly: the scale of a jump that counts as divergence."""
    k = max(num_classes, 2)
    return (k - 1) / k**2 if loss == "mse" else math.log(k)


def detect(losses: Sequence[float], steps_per_epoch: int, chance: float) -> Divergence | None:
    """The first bad epoch of a decrypted per-step loss curve, or None when it is healthy."""
    found = _scan(losses, steps_per_epoch, chance)
    if found is None or found.kind == "jump":
        return found
    return replace(found, lone=_lone(losses, found.step, steps_per_epoch, chance))


def _scan(losses: Sequence[float], steps_per_epoch: int, chance: float) -> Divergence | None:
    """detect's pass over the curve, without judging whether a bad step is lone."""
    if not losses:
        return None
    scale = max(losses[0], chance) if math.isfinite(losses[0]) else chance
    best = losses[0]
    for start in range(0, len(losses), steps_per_epoch):
        epoch = start // steps_per_epoch + 1
        values = losses[start : start + steps_per_epoch]
        found = _bad_step(values, epoch, start + 1)
        if found is not None:
            return found
        mean = sum(values) / len(values)
        if mean > best + scale:
            # The first step above the bar, not the epoch's first: a jump within epoch 1 is
            # not the untrained model's loss (losses[0] is the bar's own start).
            first = next((i for i, v in enumerate(values) if v > best + scale), 0)
            return Divergence(
                epoch,
                start + first + 1,
                "jump",
                f"epoch {epoch}'s mean loss rose above the best so far by more than a "
                "chance-level loss: training diverged",
            )
        best = min(best, mean)
    return None


def _lone(losses: Sequence[float], step: int, steps_per_epoch: int, chance: float) -> bool:
    """Whether bad `step` (1-based, not the first) has later steps and the curve is healthy with
    its loss replaced by the step before's: nothing else went wrong."""
    if step < 2 or step >= len(losses):
        return False
    patched = [*losses[: step - 1], losses[step - 2], *losses[step:]]
    return _scan(patched, steps_per_epoch, chance) is None


def _bad_step(values: Sequence[float], epoch: int, first_step: int) -> Divergence | None:
    for step, value in enumerate(values, start=first_step):
        kind = _step_kind(value)
        if kind is not None:
            return Divergence(epoch, step, kind, _STEP_REASONS[kind].format(step=step))
    return None


def _step_kind(value: float) -> Kind | None:
    if not math.isfinite(value):
        return "nan"
    if abs(value) >= OVERFLOW_LIMIT:
        return "overflow"
    if value < -NEGATIVE_TOLERANCE:
        return "negative"
    return None


_STEP_REASONS: dict[Kind, str] = {
    "nan": "the decrypted loss at step {step} is not a finite number",
    "overflow": (
        f"the decrypted loss at step {{step}} is beyond +-{OVERFLOW_LIMIT:g}: the fixed-point "
        "arithmetic wrapped around"
    ),
    "negative": (
        "the decrypted loss at step {step} is negative, which a mean of non-negative terms "
        "cannot be: the fixed-point arithmetic wrapped around"
    ),
}


# ------------------------------------------------------------------------- the rollback record


def load(cfg: RunConfig) -> list[Rollback]:
    """The run's rollbacks so far (none before the first)."""
    owner = owner_location(cfg)
    if not owner.exists(RECORD):
        return []
    value = owner.read_json(RECORD)
    try:
        if value["run_id"] != cfg.run_id:
            raise ValueError(f"it belongs to run {value['run_id']!r}")
        return [
            Rollback(int(r["epoch"]), str(r["reason"]), float(r["lr"]), r.get("retry") is True)
            for r in value["rollbacks"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{owner.url}/{RECORD}: malformed watchdog record ({exc})") from None


def save(cfg: RunConfig, rollbacks: Sequence[Rollback]) -> None:
    """Write the record (atomically) into the owner's store."""
    value = {"run_id": cfg.run_id, "rollbacks": [asdict(r) for r in rollbacks]}
    owner_location(cfg).write_json(RECORD, value)


def lr_changes(rollbacks: Sequence[Rollback]) -> dict[int, float]:
    """The schedule the rollbacks set: epoch -> lr from that epoch on (a later one wins)."""
    return {r.epoch: r.lr for r in rollbacks}


def rewind(cfg: RunConfig, epoch: int) -> None:
    """Remove the checkpoint records of `epoch` and later in every party store.

    Without its record a checkpoint is incomplete: the parties resume from the epoch before,
    and their rewritten share files replace the old ones.
    """
    for party in range(cfg.parties):
        loc = party_location(cfg, party)
        for stored in checkpoints.epochs(loc):
            if stored >= epoch:
                loc.remove(f"{checkpoints.folder(stored)}/{checkpoints.RECORD}")


# ------------------------------------------------------------------------------ the train stage


def check(cfg: RunConfig) -> Divergence | None:
    """Decrypt the run's loss curve (an owner-side reveal) and find its first bad epoch."""
    # Imported here: report reads this module's record for the report and the shadow.
    from veiltrain import report

    rec = report.reconstruct(cfg, model=False, purpose="divergence check")
    classes = int(runstate.require(owner_location(cfg), cfg.run_id).dataset["num_classes"])
    steps = len(rec.losses) // max(rec.epochs, 1)
    return detect(rec.losses, steps, chance_loss(cfg.loss, classes))


def supervise(
    cfg: RunConfig,
    job: TrainJob,
    train: Callable[[TrainJob], R],
    notify: Callable[[str], Any] = print,
) -> R:
    """Train, check the decrypted losses, roll back and retrain until healthy or out of tries.

    `train` runs every party and the dealer for the given job (inline or dispatched). Earlier
    rollbacks of the run (a rerun of the stage) are applied before the first training.
    """
    rollbacks = load(cfg)
    while True:
        result = train(replace(job, lr_from_epoch=lr_changes(rollbacks)))
        found = check(cfg)
        if found is None:
            return result
        rollbacks = _roll_back(cfg, job, rollbacks, found)
        notify(_note(cfg, found, rollbacks))


def _note(cfg: RunConfig, found: Divergence, rollbacks: Sequence[Rollback]) -> str:
    last, back = rollbacks[-1], f"rolled back to the checkpoint of epoch {found.epoch - 1}"
    if last.retry:
        return (
            f"watchdog: {found.reason}; a lone bad step with healthy steps after it, most likely "
            f"a share-wise truncation wrap: {back}, retraining from epoch {found.epoch} at the "
            f"same lr {last.lr:g} (a retry, once an epoch; --truncation exact avoids such wraps)"
        )
    return (
        f"watchdog: {found.reason}; {back}, retraining from epoch {found.epoch} with lr "
        f"{last.lr:g} (rollback {_backoffs(rollbacks)} of at most {cfg.max_rollbacks})"
    )


def _backoffs(rollbacks: Sequence[Rollback]) -> int:
    """Rollbacks that lowered the lr: the ones `max_rollbacks` limits."""
    return sum(not r.retry for r in rollbacks)


def _roll_back(
    cfg: RunConfig, job: TrainJob, rollbacks: list[Rollback], found: Divergence
) -> list[Rollback]:
    """Record the rollback first, then remove the checkpoints: a crash in between costs at most
    one more rollback, never a rerun at the old learning rate."""
    lr = lr_at(job.lr, lr_changes(rollbacks), found.epoch)
    if found.step == 1:  # the untrained model's loss: no learning rate can be the cause
        raise DivergenceError(
            f"run {cfg.run_id}: {found.reason}, before any training step, so a lower "
            "learning rate cannot help; check the data's scale (standardise it) and the model"
        )
    retried = any(r.retry and r.epoch == found.epoch for r in rollbacks)
    if found.lone and not retried:
        return _record(cfg, [*rollbacks, Rollback(found.epoch, found.reason, lr, retry=True)])
    if _backoffs(rollbacks) >= cfg.max_rollbacks:
        wraps = (
            " or, as this bad step was a lone one (a share-wise truncation wrap, most likely), "
            "rerun with --truncation exact"
            if found.lone and job.truncation != "exact"
            else ""
        )
        raise DivergenceError(
            f"run {cfg.run_id}: training diverged in epoch {found.epoch} at lr {lr:g}: "
            f"{found.reason}. The watchdog rolled back {_backoffs(rollbacks)} time(s), the most "
            f"allowed (max_rollbacks {cfg.max_rollbacks}). Start a new run with a lower --lr "
            f"(e.g. --lr {lr * LR_BACKOFF:g}){wraps}; the checkpoints are left as they are"
        )
    return _record(cfg, [*rollbacks, Rollback(found.epoch, found.reason, lr * LR_BACKOFF)])


def _record(cfg: RunConfig, updated: list[Rollback]) -> list[Rollback]:
    save(cfg, updated)
    rewind(cfg, updated[-1].epoch)
    return updated
