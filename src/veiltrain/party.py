"""A compute party (or the dealer) in its own process: train on shares, reveal nothing."""

from __future__ import annotations

import argparse
import json
import math
import secrets
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from veiltrain import checkpoints, data, models, sharing
from veiltrain.contract import TrainJob
from veiltrain.errors import ConfigError, IntegrityError, VeiltrainError
from veiltrain.ffrecord import FileReader
from veiltrain.owner import read_manifest
from veiltrain.store import Location, check_objects, download_verified


class PartyData:
    """Streams this party's share of one batch of records: full FFRecord or seed-expanded."""

    def __init__(self, loc: Location, shards: Sequence[str], fs: Any) -> None:
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
            self._reader = FileReader(list(shards), check_data=True, fs=fs)
            if self._reader.n != self.count:
                raise IntegrityError(
                    f"{loc.url}/dataset: {self._reader.n} records, info says {self.count}"
                )
        else:
            self._seed = sharing.SeedShare.from_json(self.info["seed_share"])

    @classmethod
    def in_store(cls, loc: Location, names: Iterable[str]) -> PartyData:
        """Read the shards among `names` where they are, unverified (owner-side checks, tests)."""
        return cls(loc, [loc.path(n) for n in sorted(names) if _is_shard(n)], loc.fs)

    def batch(self, indices: np.ndarray[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """This party's int64 shares of features (B, *shape) and one-hot labels (B, classes)."""
        rows = np.empty((len(indices), self.record_words), dtype=np.int64)
        if self._reader is not None:
            wanted = indices.tolist()
            for i, raw in enumerate(self._reader.read(wanted)):
                # numpy would broadcast a one-word record into the whole row: check the length.
                if raw.nbytes != self.record_words * 8:
                    url, record = self._reader.locate(wanted[i])
                    raise IntegrityError(
                        f"{url}: record {record} (sample {wanted[i]}) is {raw.nbytes} bytes, but "
                        f"dataset/info.json says {self.record_words} int64 words "
                        f"({self.record_words * 8} bytes); this party's store is corrupt or "
                        "mixes datasets: upload the shares again"
                    )
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
        objects = manifest["objects"]
        # The manifest, not a listing, names the shards: stray objects are never read.
        shards = {n: m for n, m in sorted(objects.items()) if _is_shard(n)}
        check_objects(loc, {n: m for n, m in objects.items() if n not in shards})
        paths, fs = self._verified_shards(shards)
        self.data = PartyData(loc, paths, fs)
        self.spec = loc.read_json("model/spec.json")
        self.steps_per_epoch = math.ceil(self.data.count / job.batch_size)
        self.ident = checkpoints.Identity(job.run_id, job.settings_hash)
        self.attempt = 0  # agreed with the other parties when training starts
        self.resumed_attempt: int | None = None

    def _verified_shards(self, shards: Mapping[str, Any]) -> tuple[list[str], Any]:
        """Record shards checked against the manifest's SHA-256 in one streamed read each.

        A local store is hashed in place; a remote one is copied to a private temporary folder
        while hashing, and records are read from the verified copy.
        """
        if isinstance(self.loc.fs, LocalFileSystem):
            check_objects(self.loc, shards, deep=True)
            return [self.loc.path(n) for n in shards], self.loc.fs
        self._spool = tempfile.TemporaryDirectory(prefix="veiltrain-shards-")
        paths = [download_verified(self.loc, n, m, self._spool.name) for n, m in shards.items()]
        return paths, LocalFileSystem()

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
        self.attempt = self._agree_attempt()
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
            "attempt": self.attempt,
        }
        checkpoints.write(self.loc, epoch, blobs, fields)
        emit("checkpoint", epoch=epoch)

    def _agree_attempt(self) -> int:
        """One attempt id for this joint run: party 0 draws it, every party records it."""
        attempt = torch.tensor([checkpoints.new_attempt()], dtype=torch.int64)
        torch.distributed.broadcast(attempt, src=0, group=_main_group())
        return int(attempt.item())

    def _agree_resume(self) -> int:
        """Newest epoch whose checkpoints every party holds from one attempt and that verify.

        Epoch numbers and attempt ids are public; the candidates are exchanged as int64 rows.
        """
        mine = checkpoints.candidates(self.loc, self.ident, self.job.epochs)
        tables = _all_gather_table(mine, self.job.epochs)
        for epoch in checkpoints.common(tables):
            ok = torch.tensor([int(checkpoints.verified(self.loc, epoch, self.ident))])
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN, group=_main_group())
            if ok.item():
                self.resumed_attempt = tables[0][epoch]
                return epoch
        return 0

    def _initial_shares(self, epoch: int) -> dict[str, torch.Tensor]:
        if epoch == 0:  # hashed against the manifest on start
            return load_safetensors(self.loc.read_bytes("model/params.safetensors"))
        blob = checkpoints.read(
            self.loc, epoch, "params.safetensors", self.ident, self.resumed_attempt
        )
        return load_safetensors(blob)


def _all_gather_table(mine: dict[int, int], max_epoch: int) -> list[dict[int, int]]:
    """Every party's epoch -> attempt table (row e holds [e, attempt] or zeros)."""
    rows = torch.zeros((max_epoch + 1, 2), dtype=torch.int64)
    for epoch, attempt in mine.items():
        rows[epoch] = torch.tensor([epoch, attempt])
    group = _main_group()
    gathered = [torch.zeros_like(rows) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(gathered, rows, group=group)
    return [{int(e): int(a) for e, a in table.tolist() if e > 0} for table in gathered]


def _is_shard(name: str) -> bool:
    return name.startswith("dataset/") and name.endswith(".ffr")


def _main_group() -> Any:
    import crypten.communicator as comm

    return comm.get().main_group


def _loss(name: str) -> Any:
    import crypten.nn

    return crypten.nn.MSELoss() if name == "mse" else crypten.nn.CrossEntropyLoss()


_LAUNCH_KEYS = {"job", "store", "rendezvous"}
_MAX_LAUNCH_CHARS = 1 << 20


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Rank and world size only: the rest comes on stdin (any user can read /proc/*/cmdline)."""
    p = argparse.ArgumentParser(
        prog="python -m veiltrain.party",
        description=__doc__,
        epilog='stdin: one JSON object {"job": TrainJob, "store": URL, "rendezvous": URL}',
    )
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True, help="number of compute parties")
    return p.parse_args(argv)


def _launch_message(text: str) -> tuple[TrainJob, str, str]:
    """The job, store URL and rendezvous from the launcher's JSON object on stdin."""
    if len(text) > _MAX_LAUNCH_CHARS:
        raise ConfigError(f"launch message on stdin is over {_MAX_LAUNCH_CHARS} characters")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"launch message on stdin is not JSON ({exc})") from exc
    if not isinstance(message, dict) or set(message) != _LAUNCH_KEYS:
        keys = sorted(message) if isinstance(message, dict) else type(message).__name__
        raise ConfigError(f"launch message on stdin needs keys {sorted(_LAUNCH_KEYS)}; got {keys}")
    store, rendezvous = message["store"], message["rendezvous"]
    if not isinstance(store, str) or not isinstance(rendezvous, str):
        raise ConfigError("launch message on stdin: 'store' and 'rendezvous' must be strings")
    return TrainJob.from_json(json.dumps(message["job"])), store, rendezvous


def main(argv: list[str] | None = None) -> int:
    """Entry point of one party process; exit 0 on success, 2 on a reported error, 3 otherwise."""
    args = _parse(argv)
    who = "dealer" if args.rank == args.world_size else f"party {args.rank}"
    # Started from a background shell job, SIGINT arrives ignored; restore it so that Ctrl-C and
    # SIGTERM (which some supervisors turn into SIGINT) stop the party.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        job, store, rendezvous = _launch_message(sys.stdin.read(_MAX_LAUNCH_CHARS + 1))
        emit("started")  # the launcher learns every process early, the dealer included
        run_party(args.rank, args.world_size, rendezvous, store, job)
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
