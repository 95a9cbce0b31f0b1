"""Owner-only reconstruction: loss curve and model from every party's shares, parity and report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from veiltrain import (
    audit,
    checkpoints,
    data,
    ledger,
    lossterms,
    models,
    runstate,
    schedule,
    truncation,
)
from veiltrain.config import RunConfig
from veiltrain.contract import (
    PRIVATE_INITIAL,
    PRIVATE_MODEL_SPEC,
    PRIVATE_TEST,
    ModelSpec,
    lr_at,
    owner_location,
    party_location,
    read_model,
)
from veiltrain.errors import IntegrityError
from veiltrain.owner import training_split
from veiltrain.store import Location, read_npz
from veiltrain.watchdog import Rollback, lr_changes
from veiltrain.watchdog import load as load_rollbacks


@dataclass(frozen=True)
class Reconstruction:
    """What only the owner ever sees: the decrypted loss curve and parameters."""

    attempts: list[int]
    """The training attempt of each epoch's checkpoint, 1 to the last."""
    losses: list[float]
    state: dict[str, torch.Tensor]

    @property
    def epochs(self) -> int:
        return len(self.attempts)

    @property
    def attempt(self) -> int:
        """The training attempt of the final checkpoint (a warm start checks it against its own)."""
        return self.attempts[-1]


def _identity(cfg: RunConfig) -> checkpoints.Identity:
    state = runstate.require(owner_location(cfg), cfg.run_id)
    return checkpoints.Identity(cfg.run_id, state.tag)


def common_epoch(cfg: RunConfig, ident: checkpoints.Identity) -> checkpoints.Agreement:
    """Newest epoch whose checkpoints every party holds from one attempt, verified by hash."""
    locations = [party_location(cfg, p) for p in range(cfg.parties)]
    found = checkpoints.newest_common(locations, ident, cfg.epochs)
    if found is None:
        raise IntegrityError(
            f"no complete checkpoint of run {cfg.run_id} from one training attempt in every "
            f"party store ({', '.join(cfg.stores())}); run the train stage"
        )
    return found


def reconstruct(cfg: RunConfig, model: bool = True, purpose: str = "report") -> Reconstruction:
    """Sum every party's loss and (unless model=False) parameter shares mod 2^64, and decode.

    purpose says in the ledger why the owner revealed them (the report, the watchdog's check).
    """
    ident, attempts = _agreed_attempts(cfg)
    parties = [_party_losses(party_location(cfg, p), ident, attempts) for p in range(cfg.parties)]
    # Every reconstruction goes through the ledger: the report lists what was revealed.
    values = ledger.reveal(
        cfg.out,
        cfg.run_id,
        "training loss",
        parties,
        cfg.precision_bits,
        epochs=len(attempts),
        steps=f"1-{len(parties[0])}",
        purpose=purpose,
    )
    state = _reveal_params(cfg, ident, attempts, purpose) if model else {}
    count = int(runstate.require(owner_location(cfg), cfg.run_id).dataset["count"])
    losses = lossterms.finish(values, count, cfg.batch_size)
    return Reconstruction(attempts, [float(v) for v in losses], state)


def _agreed_attempts(cfg: RunConfig) -> tuple[checkpoints.Identity, list[int]]:
    """The run's identity and the attempt of each of its epochs 1..newest common one."""
    ident = _identity(cfg)
    agreed = common_epoch(cfg, ident)
    return ident, [_attempt_of(agreed.tables, e, cfg.run_id) for e in range(1, agreed.epoch + 1)]


def _attempt_of(tables: list[dict[int, int]], epoch: int, run_id: str) -> int:
    """The one attempt every party's epoch checkpoint came from; mixed attempts are refused."""
    attempts = {table.get(epoch) for table in tables}
    if len(attempts) != 1 or None in attempts:
        raise IntegrityError(
            f"run {run_id}, epoch {epoch}: the party stores hold checkpoints of different "
            "training attempts (or one is missing); their shares cannot be combined: re-run "
            "the train stage"
        )
    return int(attempts.pop() or 0)


def _party_losses(
    loc: Location, ident: checkpoints.Identity, attempts: list[int]
) -> np.ndarray[Any, Any]:
    """One party's stored loss values of epochs 1..last (veiltrain.lossterms)."""
    losses = [
        _loss_values(checkpoints.read(loc, e, "losses.safetensors", ident, a))
        for e, a in enumerate(attempts, start=1)
    ]
    return torch.cat(losses).numpy()


def _reveal_params(
    cfg: RunConfig, ident: checkpoints.Identity, attempts: list[int], purpose: str
) -> dict[str, torch.Tensor]:
    """The parameters after epoch len(attempts), from every party's shares, through the ledger."""
    epoch = len(attempts)
    shares = [
        checkpoints.read_params(party_location(cfg, p), epoch, ident, attempts[-1])
        for p in range(cfg.parties)
    ]
    named = {name: [s[name].numpy() for s in shares] for name in shares[0]}
    decoded = ledger.reveal_many(
        cfg.out,
        cfg.run_id,
        "model parameters",
        named,
        cfg.precision_bits,
        epoch=epoch,
        purpose=purpose,
    )
    return {name: torch.from_numpy(values).float() for name, values in decoded.items()}


def _loss_values(blob: bytes) -> torch.Tensor:
    """(steps, width) loss terms; checkpoints from before hold (steps,) losses as `loss`."""
    tensors = load_safetensors(blob)
    return tensors["loss_terms"] if "loss_terms" in tensors else tensors["loss"]


def restore_model(cfg: RunConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain PyTorch model with the decrypted parameters (integer buffers keep their init)."""
    spec = read_model(owner_location(cfg), PRIVATE_MODEL_SPEC, ModelSpec)
    model = models.build(spec.factory, spec.kwargs)  # every float weight is replaced
    merged = {**model.state_dict(), **state}
    model.load_state_dict(merged)
    return model


def accuracy(model: torch.nn.Module, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> float:
    """Top-1 accuracy in eval mode."""
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x).float())
    return float((logits.argmax(1).numpy() == y).mean())


def shadow_training(
    cfg: RunConfig,
    order_seed: int,
    epochs: int,
    rollbacks: Sequence[Rollback] = (),
    rounded: bool = False,
) -> tuple[torch.nn.Module, list[float]]:
    """Plaintext training with the same initial weights, batches and schedule, for parity.

    `rollbacks` (the divergence watchdog's) lower the lr from their epochs on, as for the parties.
    `rounded` starts from the initial weights rounded to the fixed point's 2^-precision_bits.
    """
    owner = owner_location(cfg)
    x_train, y_train = training_split(cfg)
    initial = load_safetensors(owner.read_bytes(PRIVATE_INITIAL))
    if rounded:
        initial = round_to_fixed_point(initial, cfg.precision_bits)
    model = restore_model(cfg, initial).train()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    classes = int(runstate.require(owner, cfg.run_id).dataset["num_classes"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    losses = []
    steps = schedule.steps_per_epoch(len(x), cfg.batch_size)
    for epoch in range(1, epochs + 1):
        order = data.batch_order(len(x), epoch, order_seed)
        for group in opt.param_groups:  # plain SGD has no state: changing lr is exact
            group["lr"] = lr_at(cfg.lr, lr_changes(rollbacks), epoch)
        for step in range(steps):
            idx = torch.from_numpy(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            loss = _plain_loss(cfg.loss, model(x[idx]), y[idx], classes)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
    return model, losses


SAME_WEIGHT_EPOCHS = 8
"""The report checks at most this many epoch starts on the same weights (each decrypts them)."""


_DROPOUTS = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def checked_epochs(epochs: int, most: int = SAME_WEIGHT_EPOCHS) -> list[int]:
    """Epochs whose first step is checked: every one, or `most` spread from first to last."""
    if epochs <= most:
        return list(range(1, epochs + 1))
    return sorted({round(1 + i * (epochs - 1) / (most - 1)) for i in range(most)})


def same_weights_losses(
    cfg: RunConfig, rec: Reconstruction, order_seed: int
) -> list[dict[str, float]] | None:
    """Each checked epoch's first decrypted loss against plaintext's on the same weights and batch.

    The shadow's curve drifts from the parties' as training amplifies rounding (a ResNet18 moves
    by more than 0.01 within 3 steps from rounding its initial weights alone). Here the weights
    are the parties' own, decrypted, so the gap is the error of computing the loss on shares.
    None for a model with dropout: plaintext cannot replay the parties' masks.
    """
    ident = _identity(cfg)
    x, y = (torch.from_numpy(a) for a in training_split(cfg))
    steps = schedule.steps_per_epoch(len(x), cfg.batch_size)
    classes = int(runstate.require(owner_location(cfg), cfg.run_id).dataset["num_classes"])
    rows = []
    for epoch in checked_epochs(rec.epochs):
        model = restore_model(cfg, _weights_before(cfg, ident, rec.attempts[: epoch - 1]))
        if any(isinstance(m, _DROPOUTS) for m in model.modules()):
            return None
        idx = torch.from_numpy(data.batch_order(len(x), epoch, order_seed)[: cfg.batch_size])
        with torch.no_grad():  # training mode: BatchNorm on the batch's statistics, as on shares
            plain = float(_plain_loss(cfg.loss, model.train()(x[idx]), y[idx], classes))
        step = (epoch - 1) * steps
        rows.append(
            {"epoch": epoch, "step": step + 1, "decrypted": rec.losses[step], "plaintext": plain}
        )
    return rows


def _weights_before(
    cfg: RunConfig, ident: checkpoints.Identity, earlier: list[int]
) -> dict[str, torch.Tensor]:
    """The parameters the parties started an epoch from: the encoded initial ones for the first,
    else the previous epoch's checkpoint (decrypted through the ledger)."""
    if not earlier:
        initial = load_safetensors(owner_location(cfg).read_bytes(PRIVATE_INITIAL))
        return round_to_fixed_point(initial, cfg.precision_bits)
    return _reveal_params(cfg, ident, earlier, "report: loss on the same weights")


def round_to_fixed_point(state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Float tensors rounded to multiples of 2^-bits, as encoding them as shares rounds them."""
    scale = float(2**bits)
    return {
        k: torch.round(v * scale) / scale if v.is_floating_point() else v for k, v in state.items()
    }


def largest_gap(a: Sequence[float], b: Sequence[float]) -> float:
    """The largest step-by-step difference of two loss curves of the same length."""
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def _plain_loss(name: str, out: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    if name == "mse":
        target = torch.nn.functional.one_hot(y, classes).float()
        return torch.nn.functional.mse_loss(out, target)
    return torch.nn.functional.cross_entropy(out, y)


def plot(path: str, losses: list[float], plain: list[float]) -> bytes:
    """Loss curves (decrypted and plaintext shadow) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(plain) + 1), plain, label="plaintext shadow", lw=2, alpha=0.6)
    ax.plot(range(1, len(losses) + 1), losses, label="decrypted (trained on shares)", lw=1.2)
    ax.set(xlabel="step", ylabel="training loss", title=path)
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def build_report(cfg: RunConfig, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """Decrypt, evaluate, compare with the plaintext shadow; write report.json and loss.png."""
    owner = owner_location(cfg)
    rec = reconstruct(cfg)
    test = read_npz(owner, PRIVATE_TEST)
    model = restore_model(cfg, rec.state)
    order_seed = runstate.require(owner, cfg.run_id).order_seed  # what the parties were given
    rollbacks = load_rollbacks(cfg)  # the watchdog's: the shadow replays their learning rates
    shadow, plain = shadow_training(cfg, order_seed, rec.epochs, rollbacks)
    # The same plaintext training from the fixed-point-rounded weights: how far training's own
    # sensitivity moves the curve (a deep net with BatchNorm on small batches moves a lot; a
    # ResNet18 on digits by 0.3-0.8 within 8 steps), so a gap can be read against it.
    rounded_shadow, rounded = shadow_training(cfg, order_seed, rec.epochs, rollbacks, rounded=True)
    acc, plain_acc = accuracy(model, test["x"], test["y"]), accuracy(shadow, test["x"], test["y"])
    same = same_weights_losses(cfg, rec, order_seed)
    count = int(runstate.require(owner, cfg.run_id).dataset["count"])
    mode, expected = truncation.choose(cfg, count)  # as owner.train_job chose it
    report = {
        **_settings(cfg),
        "epochs": rec.epochs,
        "final_attempt": rec.attempt,
        "losses": rec.losses,
        "plaintext_losses": plain,
        "max_loss_gap": largest_gap(rec.losses, plain),
        "plaintext_rounded_losses": rounded,
        "plaintext_rounding_gap": largest_gap(rounded, plain),
        "plaintext_rounded_test_accuracy": accuracy(rounded_shadow, test["x"], test["y"]),
        "same_weights_losses": same,
        "same_weights_gap": None if same is None else _same_gap(same),
        "test_accuracy": acc,
        "plaintext_test_accuracy": plain_acc,
        "accuracy_gap": plain_acc - acc,
        "test_samples": len(test["y"]),
        "stage_seconds": stage_seconds,
        "party_stores": cfg.stores(),
        # What each party can read in its own store, checked after training (veiltrain.audit).
        "audit": audit.party_results([party_location(cfg, p) for p in range(cfg.parties)]),
        "reveals": ledger.entries(cfg.out, cfg.run_id),
        "rollbacks": [asdict(r) for r in rollbacks],
        "truncation": {"mode": mode, "asked": cfg.truncation, "expected_local_wraps": expected},
    }
    _write_outputs(cfg, report, model)
    return report


def _same_gap(rows: list[dict[str, float]]) -> float:
    """The largest decrypted-against-plaintext difference of the checked steps."""
    return max((abs(r["decrypted"] - r["plaintext"]) for r in rows), default=0.0)


def _settings(cfg: RunConfig) -> dict[str, Any]:
    keys = (
        "run_id",
        "warm_start",
        "parties",
        "dataset",
        "model",
        "batch_size",
        "lr",
        "loss",
        "precision_bits",
    )
    return {k: getattr(cfg, k) for k in keys}


def _write_outputs(cfg: RunConfig, report: dict[str, Any], model: torch.nn.Module) -> None:
    out = Location(cfg.out, role="owner")
    out.write_bytes(
        "loss.png", plot(f"run {cfg.run_id}", report["losses"], report["plaintext_losses"])
    )
    out.write_json("report.json", report)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out.write_bytes("model.safetensors", save_safetensors(state))
