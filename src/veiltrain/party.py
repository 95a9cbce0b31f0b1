"""A compute party (or the dealer) in its own process: train on shares, reveal nothing."""

from __future__ import annotations

import argparse
import json
import math
import secrets
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from veiltrain import checkpoints, data, models, sharing
from veiltrain.errors import ConfigError, IntegrityError, VeiltrainError
from veiltrain.ffrecord import FileReader
from veiltrain.owner import read_manifest
from veiltrain.store import Location, check_objects


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

    def __init__(self, loc: Location, objects: Mapping[str, Any]) -> None:
        self.info = loc.read_json("dataset/info.json")
        try:
            self.count = int(self.info["count"])
            self.record_words = int(self.info["record_words"])
            self.sample_shape = tuple(int(d) for d in self.info["sample_shape"])
            self.num_classes = int(self.info["num_classes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{loc.url}/dataset/info.json: malformed ({exc!r})") from exc
        self._reader: FileReader | None = None
        self._seed: sharing.SeedShare | None = None
        if self.info["format"] == "ffrecord":
            # The manifest, not a listing, names the shards: stray objects are never read.
            names = sorted(n for n in objects if n.startswith("dataset/") and n.endswith(".ffr"))
            shards = [loc.path(n) for n in names]
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

    def __init__(self, loc: Location, job: TrainJob, rank: int) -> None:
        self.loc, self.job, self.rank = loc, job, rank
        manifest = read_manifest(loc)
        if manifest["run_id"] != job.run_id or manifest["party"] != rank:
            raise IntegrityError(
                f"{loc.url}: holds run {manifest['run_id']!r} party {manifest['party']}, "
                f"but this is run {job.run_id!r} party {rank}; check the store URLs"
            )
        # Everything but the record shards is small: hash it. Shards carry a CRC per record.
        objects = manifest["objects"]
        shards = {n: m for n, m in objects.items() if n.endswith(".ffr")}
        check_objects(loc, shards, deep=False)
        check_objects(loc, {n: m for n, m in objects.items() if n not in shards})
        self.data = PartyData(loc, objects)
        self.spec = loc.read_json("model/spec.json")
        self.steps_per_epoch = math.ceil(self.data.count / job.batch_size)
        self.ident = checkpoints.Identity(job.run_id, job.settings_hash)

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

        blobs = {
            "params.safetensors": save_safetensors(mpc.export_shares(cmodel)),
            "losses.safetensors": save_safetensors({"loss": torch.cat(losses)}),
        }
        fields = {
            "run_id": self.job.run_id,
            "party": self.rank,
            "step": epoch * self.steps_per_epoch,
            "settings_hash": self.job.settings_hash,
            "precision_bits": self.job.precision_bits,
        }
        checkpoints.write(self.loc, epoch, blobs, fields)
        emit("checkpoint", epoch=epoch)

    def _agree_resume(self) -> int:
        """Newest epoch every party has a valid checkpoint for (epoch numbers are public)."""
        mine = checkpoints.latest(self.loc, self.ident, self.job.epochs)
        agreed = torch.tensor([mine], dtype=torch.int64)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=_main_group())
        return int(agreed.item())

    def _initial_shares(self, epoch: int) -> dict[str, torch.Tensor]:
        if epoch == 0:  # hashed against the manifest on start
            return load_safetensors(self.loc.read_bytes("model/params.safetensors"))
        return load_safetensors(checkpoints.read(self.loc, epoch, "params.safetensors", self.ident))


def _main_group() -> Any:
    import crypten.communicator as comm

    return comm.get().main_group


def _loss(name: str) -> Any:
    import crypten.nn

    return crypten.nn.MSELoss() if name == "mse" else crypten.nn.CrossEntropyLoss()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m veiltrain.party", description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True, help="number of compute parties")
    p.add_argument("--rendezvous", required=True, help="e.g. tcp://127.0.0.1:29500")
    p.add_argument("--store", default="", help="this party's store URL (not for the dealer)")
    p.add_argument("--job", required=True, help="TrainJob as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one party process; exit 0 on success, 2 on a reported error, 3 otherwise."""
    args = _parse(argv)
    who = "dealer" if args.rank == args.world_size else f"party {args.rank}"
    # Started from a background shell job, SIGINT arrives ignored; restore it so that Ctrl-C and
    # SIGTERM (which some supervisors turn into SIGINT) stop the party.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        job = TrainJob.from_json(args.job)
        run_party(args.rank, args.world_size, args.rendezvous, args.store, job)
    except VeiltrainError as exc:
        print(f"veiltrain {who}: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - process boundary: keep the trace in the log only
        traceback.print_exc()
        message = f"veiltrain {who}: unexpected {type(exc).__name__}: {exc}"
        print(message, file=sys.stderr, flush=True)
        return 3
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
    mpc.forbid_reveal()
    trainer = Trainer(Location(store, role=f"party-{rank}"), job, rank)
    cmodel = trainer.build()
    started = time.monotonic()
    with mpc.session(spec):
        trainer.run(cmodel)
    emit("done", seconds=round(time.monotonic() - started, 3))


if __name__ == "__main__":
    sys.exit(main())
