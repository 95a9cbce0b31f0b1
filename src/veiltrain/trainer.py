"""One party's training loop on its shares: verify the store, agree with the others, train.

Runs inside a party process only: it imports CrypTen (through veiltrain.mpc) at the top.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from collections.abc import Mapping
from typing import Any

import crypten.communicator as comm
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from veiltrain import checkpoints, data, losses, lossterms, models, mpc, schedule, truncation
from veiltrain.contract import PARAMS, SPEC, ModelSpec, TrainJob, read_manifest, read_model
from veiltrain.errors import IntegrityError
from veiltrain.party_data import PartyData, is_shard
from veiltrain.store import Location, check_objects, download_verified


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout: progress for the launcher (counts only, never a value)."""
    print(json.dumps({"event": event, **fields}), flush=True)


class Trainer:
    """One party's training loop over its shares: construct (cheap), verify, build, run."""

    data: PartyData
    spec: ModelSpec
    steps_per_epoch: int

    def __init__(self, loc: Location, job: TrainJob, rank: int) -> None:
        self.loc, self.job, self.rank = loc, job, rank
        self.ident = checkpoints.Identity(job.run_id, job.settings_hash)
        self.attempt = 0  # agreed with the other parties when training starts
        self.resumed_attempt: int | None = None

    def verify(self) -> None:
        """Check the store against its manifest (every object by SHA-256) and open the shares."""
        manifest = read_manifest(self.loc)
        if manifest.run_id != self.job.run_id or manifest.party != self.rank:
            raise IntegrityError(
                f"{self.loc.url}: holds run {manifest.run_id!r} party {manifest.party}, "
                f"but this is run {self.job.run_id!r} party {self.rank}; check the store URLs"
            )
        objects = manifest.table()
        # The manifest, not a listing, names the shards: stray objects are never read.
        shards = {n: m for n, m in sorted(objects.items()) if is_shard(n)}
        check_objects(self.loc, {n: m for n, m in objects.items() if n not in shards})
        paths, fs = self._verified_shards(shards)
        self.data = PartyData(self.loc, paths, fs)
        self.spec = read_model(self.loc, SPEC, ModelSpec)
        self.steps_per_epoch = schedule.steps_per_epoch(self.data.count, self.job.batch_size)

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
        # A fresh key: the party's skeleton says nothing about the owner's weights.
        model = models.build(self.spec.factory, self.spec.kwargs)
        model.train()
        return mpc.to_crypten(model, torch.zeros((1, *self.data.sample_shape)))

    def run(self, cmodel: Any) -> None:
        """Load shares, agree on a resume point with the other parties, train, checkpoint."""
        mpc.tune_for(self.data.num_classes)
        self.attempt = self._agree_attempt()
        start = self._agree_resume()
        shares = self._initial_shares(start)
        cmodel.encrypt()
        mpc.load_shares(cmodel, shares, self.job.precision_bits)
        if self.job.device != "cpu":
            cmodel.to(self.job.device)  # shares, buffers and graph constants alike
        cmodel.train()
        emit("start", epoch=start + 1, epochs=self.job.epochs, steps_per_epoch=self.steps_per_epoch)
        for epoch in range(start + 1, self.job.epochs + 1):
            curve = self._epoch(cmodel, epoch)
            self._checkpoint(cmodel, epoch, curve)

    def _epoch(self, cmodel: Any, epoch: int) -> list[torch.Tensor]:
        order = data.batch_order(self.data.count, epoch, self.job.order_seed)
        lr = self.job.lr_at(epoch)  # lower from an epoch the owner's watchdog rolled back
        curve = []
        for step in range(self.steps_per_epoch):
            idx = order[step * self.job.batch_size : (step + 1) * self.job.batch_size]
            x, y = self.data.batch(idx)
            xe, ye = (
                mpc.from_shares(t.to(self.job.device), self.job.precision_bits) for t in (x, y)
            )
            with truncation.exact_products(self.job.truncation == "exact"):
                out = cmodel(xe)
            terms, grad = losses.value_and_grad(self.job.loss, out, ye, losses.GRAD_SCALE)
            cmodel.zero_grad()
            out.backward(grad)
            mpc.sgd_step(cmodel, lr, scale=losses.GRAD_SCALE)
            curve.append(self._stored(terms))
            emit(
                "step",
                epoch=epoch,
                step=step + 1,
                global_step=(epoch - 1) * self.steps_per_epoch + step + 1,
            )
        return curve

    def _stored(self, terms: Any) -> torch.Tensor:
        """This step's loss terms for the owner, padded to the full batch's width with random
        words (the owner ignores them; zeros would make the party's store less than uniform)."""
        share = mpc.share_of(terms)
        pad = lossterms.width(self.job.loss, self.job.batch_size) - len(share)
        noise = np.frombuffer(secrets.token_bytes(8 * pad), dtype=np.int64).copy()
        return torch.cat([share, torch.from_numpy(noise)])

    def _checkpoint(self, cmodel: Any, epoch: int, curve: list[torch.Tensor]) -> None:
        blobs = {
            "params.safetensors": save_safetensors(mpc.export_shares(cmodel)),
            "losses.safetensors": save_safetensors({"loss_terms": torch.stack(curve)}),
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
            return load_safetensors(self.loc.read_bytes(PARAMS))
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


def _main_group() -> Any:
    return comm.get().main_group
