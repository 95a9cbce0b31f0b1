"""A compute party (or the dealer) in its own process: train on shares, reveal nothing."""

from __future__ import annotations

import argparse
import json
import math
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from veiltrain import data, models, sharing
from veiltrain.errors import ConfigError, IntegrityError, VeiltrainError
from veiltrain.ffrecord import FileReader
from veiltrain.owner import read_manifest
from veiltrain.store import Location, check_objects, sha256_bytes


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
    device: str = "cpu"
    timeout_s: float = 300.0

    def to_json(self) -> str:
        """Serialise for a command line or a flow parameter."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        """Parse, refusing unknown or missing fields."""
        try:
            return cls(**json.loads(text))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"train job is malformed: {exc}") from exc


class PartyData:
    """Streams this party's share of one batch of records: full FFRecord or seed-expanded."""

    def __init__(self, loc: Location) -> None:
        self.info = loc.read_json("dataset/info.json")
        self.count = int(self.info["count"])
        self.record_words = int(self.info["record_words"])
        self.sample_shape = tuple(int(d) for d in self.info["sample_shape"])
        self.num_classes = int(self.info["num_classes"])
        self._reader: FileReader | None = None
        self._seed: sharing.SeedShare | None = None
        if self.info["format"] == "ffrecord":
            shards = [loc.path(n) for n in loc.list("dataset") if n.endswith(".ffr")]
            self._reader = FileReader(shards, check_data=True, fs=loc.fs)
            if self._reader.n != self.count:
                raise IntegrityError(
                    f"{loc.url}/dataset: {self._reader.n} records, info says {self.count}"
                )
        else:
            self._seed = sharing.SeedShare.from_json(self.info["seed_share"])

    def batch(self, indices: np.ndarray[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """This party's int64 shares of features (B, *shape) and one-hot labels (B, classes)."""
        rows = np.empty((len(indices), self.record_words), dtype=np.int64)
        if self._reader is not None:
            for i, raw in enumerate(self._reader.read(indices.tolist())):
                rows[i] = raw.view("<i8")
        else:
            assert self._seed is not None  # one of the two formats is always set
            for i, j in enumerate(indices.tolist()):
                rows[i] = sharing.expand(self._seed, self.record_words, j * self.record_words)
        features = self.record_words - self.num_classes
        x = torch.from_numpy(rows[:, :features].reshape(len(indices), *self.sample_shape).copy())
        return x, torch.from_numpy(rows[:, features:].copy())


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout: progress for the launcher (counts only, never a value)."""
    print(json.dumps({"event": event, **fields}), flush=True)


class Trainer:
    """One party's training loop over its shares."""

    def __init__(self, loc: Location, job: TrainJob, rank: int, world_size: int) -> None:
        self.loc, self.job, self.rank, self.world_size = loc, job, rank, world_size
        manifest = read_manifest(loc)
        if manifest["run_id"] != job.run_id or manifest["party"] != rank:
            raise IntegrityError(
                f"{loc.url}: holds run {manifest['run_id']!r} party {manifest['party']}, "
                f"but this is run {job.run_id!r} party {rank}; check the store URLs"
            )
        # Sizes here; parameter files are hashed when loaded, data records carry CRCs.
        check_objects(loc, manifest["objects"], deep=False)
        self.manifest = manifest
        self.data = PartyData(loc)
        self.spec = loc.read_json("model/spec.json")
        self.steps_per_epoch = math.ceil(self.data.count / job.batch_size)

    def build(self) -> Any:
        """The CrypTen graph for the named factory; its weights are replaced by shares later."""
        from veiltrain import mpc

        # A random init seed: the party must not be able to rebuild the owner's weights.
        model = models.build(self.spec["factory"], self.spec["kwargs"], secrets.randbits(31))
        model.train()
        return mpc.to_crypten(model, torch.zeros((1, *self.data.sample_shape)))

    def run(self, cmodel: Any) -> None:
        """Load shares, agree on a resume point with the other parties, train, checkpoint."""
        from veiltrain import mpc

        mpc.tune_for(self.data.num_classes)
        start = self._agree_resume()
        shares = self._initial_shares(start)
        cmodel.encrypt()
        mpc.load_shares(cmodel, shares, self.job.precision_bits)
        cmodel.train()
        loss_fn = _loss(self.job.loss)
        emit("start", epoch=start + 1, epochs=self.job.epochs, steps_per_epoch=self.steps_per_epoch)
        for epoch in range(start + 1, self.job.epochs + 1):
            losses = self._epoch(cmodel, loss_fn, epoch)
            self._checkpoint(cmodel, epoch, losses)

    def _epoch(self, cmodel: Any, loss_fn: Any, epoch: int) -> list[torch.Tensor]:
        from veiltrain import mpc

        order = data.batch_order(self.data.count, epoch, self.job.order_seed)
        losses = []
        for step in range(self.steps_per_epoch):
            idx = order[step * self.job.batch_size : (step + 1) * self.job.batch_size]
            x, y = self.data.batch(idx)
            xe, ye = (mpc.from_shares(t, self.job.precision_bits) for t in (x, y))
            loss = loss_fn(cmodel(xe), ye)
            cmodel.zero_grad()
            loss.backward()
            mpc.sgd_step(cmodel, self.job.lr)
            losses.append(mpc.share_of(loss).reshape(1))
            emit(
                "step",
                epoch=epoch,
                step=step + 1,
                global_step=(epoch - 1) * self.steps_per_epoch + step + 1,
            )
        return losses

    def _checkpoint(self, cmodel: Any, epoch: int, losses: list[torch.Tensor]) -> None:
        from veiltrain import mpc

        folder = f"checkpoints/epoch-{epoch:04d}"
        blobs = {
            "params.safetensors": save_safetensors(mpc.export_shares(cmodel)),
            "losses.safetensors": save_safetensors({"loss": torch.cat(losses)}),
        }
        for name, blob in blobs.items():
            self.loc.write_bytes(f"{folder}/{name}", blob)
        record = {
            "run_id": self.job.run_id,
            "party": self.rank,
            "epoch": epoch,
            "step": epoch * self.steps_per_epoch,
            "settings_hash": self.job.settings_hash,
            "precision_bits": self.job.precision_bits,
            "objects": {n: {"sha256": sha256_bytes(b), "size": len(b)} for n, b in blobs.items()},
        }
        self.loc.write_json(f"{folder}/checkpoint.json", record)  # last: marks it complete
        emit("checkpoint", epoch=epoch)

    def _agree_resume(self) -> int:
        """Newest epoch every party has a valid checkpoint for (epoch numbers are public)."""
        mine = latest_checkpoint(self.loc, self.job)
        agreed = torch.tensor([mine], dtype=torch.int64)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=_main_group())
        return int(agreed.item())

    def _initial_shares(self, epoch: int) -> dict[str, torch.Tensor]:
        if epoch == 0:
            name, listed = "model/params.safetensors", self.manifest["objects"]
        else:
            folder = f"checkpoints/epoch-{epoch:04d}"
            name = f"{folder}/params.safetensors"
            listed = {
                name: self.loc.read_json(f"{folder}/checkpoint.json")["objects"][
                    "params.safetensors"
                ]
            }
        blob = self.loc.read_bytes(name)
        if sha256_bytes(blob) != listed[name]["sha256"]:
            raise IntegrityError(
                f"{self.loc.url}/{name}: SHA-256 differs from its record; re-upload"
            )
        return load_safetensors(blob)


def _main_group() -> Any:
    import crypten.communicator as comm

    return comm.get().main_group


def _loss(name: str) -> Any:
    import crypten.nn

    return crypten.nn.MSELoss() if name == "mse" else crypten.nn.CrossEntropyLoss()


def latest_checkpoint(loc: Location, job: TrainJob) -> int:
    """Highest epoch with a complete checkpoint of this run and settings, or 0."""
    epochs = [
        _usable_epoch(loc, n, job)
        for n in loc.list("checkpoints")
        if n.endswith("/checkpoint.json")
    ]
    return max((e for e in epochs if e is not None and e <= job.epochs), default=0)


def _usable_epoch(loc: Location, name: str, job: TrainJob) -> int | None:
    """The epoch of a complete checkpoint of this run and settings; None for anything else."""
    folder = name.rsplit("/", 1)[0]
    try:
        record = loc.read_json(name)
        ok = record["run_id"] == job.run_id and record["settings_hash"] == job.settings_hash
        ok = ok and all(
            loc.size(f"{folder}/{o}") == m["size"] for o, m in record["objects"].items()
        )
        return int(record["epoch"]) if ok else None
    except (KeyError, TypeError, ValueError, VeiltrainError):
        return None  # an unreadable, partial or foreign checkpoint is not a resume point


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m veiltrain.party", description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True, help="number of compute parties")
    p.add_argument("--rendezvous", required=True, help="e.g. tcp://127.0.0.1:29500")
    p.add_argument("--store", default="", help="this party's store URL (not for the dealer)")
    p.add_argument("--job", required=True, help="TrainJob as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one party process; exit 0 on success, 2 on a reported error."""
    args = _parse(argv)
    # Started from a background shell job, SIGINT arrives ignored; restore it so that Ctrl-C and
    # SIGTERM (which some supervisors turn into SIGINT) stop the party.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        job = TrainJob.from_json(args.job)
        run_party(args.rank, args.world_size, args.rendezvous, args.store, job)
    except VeiltrainError as exc:
        who = "dealer" if args.rank == args.world_size else f"party {args.rank}"
        print(f"veiltrain {who}: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def run_party(rank: int, world_size: int, rendezvous: str, store: str, job: TrainJob) -> None:
    """Run one party (or the dealer, rank == world_size) to completion."""
    from veiltrain import mpc

    torch.set_num_threads(1)  # several parties share a host in tests and demos
    spec = mpc.PartySpec(
        rank, world_size, rendezvous, job.timeout_s, job.precision_bits, job.device
    )
    if spec.is_dealer:
        with mpc.session(spec):
            emit("dealer-done")
        return
    trainer = Trainer(Location(store, role=f"party-{rank}"), job, rank, world_size)
    cmodel = trainer.build()
    started = time.monotonic()
    with mpc.session(spec):
        trainer.run(cmodel)
    emit("done", seconds=round(time.monotonic() - started, 3))


if __name__ == "__main__":
    sys.exit(main())
