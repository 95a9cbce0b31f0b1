"""Owner-side stages before training: encode and split data and model, then upload per party."""

from __future__ import annotations

import io
import math
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from veiltrain import data, models, recordkernels, runstate, sharing, truncation, warmstart
from veiltrain.config import RunConfig
from veiltrain.contract import (
    INFO,
    MANIFEST,
    PARAMS,
    PRIVATE_INITIAL,
    PRIVATE_MODEL_SPEC,
    PRIVATE_ORDER,
    PRIVATE_SCALER,
    PRIVATE_TEST,
    SPEC,
    STAGED_REQUIRED,
    DatasetFacts,
    Manifest,
    ModelFacts,
    TrainJob,
    UploadCounts,
    owner_location,
    party_location,
    read_manifest,
    staging,
    write_manifest,
)
from veiltrain.errors import ConfigError, IntegrityError
from veiltrain.ffrecord import FileWriter
from veiltrain.store import HashingReader, Location, check_objects, read_npz, sha256_bytes

_SHARD_BYTES = 64 << 20
_CHUNK_BYTES = 2 << 20  # records encoded, split and written at a time (2 MiB: 138 MiB/s, 8: 125)


# ------------------------------------------------------------------------------- data set


def encrypt_dataset(cfg: RunConfig) -> DatasetFacts:
    """Split the training set into per-party shares, once per run; test split stays private.

    A rerun with the same run id reuses the run's encryption (same record order, batch order and
    settings tag) and refuses changed training options or a changed data source.
    """
    owner = owner_location(cfg)
    previous = runstate.load(owner)
    if previous is not None:
        runstate.check_settings(previous, cfg)
    ds = data.load(cfg.dataset, cfg.test_fraction, cfg.seed, cfg.max_samples)
    if previous is not None:  # a rerun checks the data before it reuses anything
        _check_same_data(cfg, previous, ds)
        if _staged(cfg):
            return DatasetFacts.model_validate(previous.dataset)
    _check_warm_start(cfg, ds)
    key = previous.key if previous is not None else runstate.new_key()
    order = _record_order(owner, ds.train_count, reuse=previous is not None)
    info, fingerprint = _encrypt(cfg, ds, order, key)
    runstate.save(owner, _run_state(cfg, previous, key, fingerprint, info))
    return info  # the run record is written last: it means the encryption is complete


def _check_warm_start(cfg: RunConfig, ds: data.Dataset) -> None:
    """Refuse an impossible warm start before anything is encrypted."""
    if cfg.warm_start:
        source = warmstart.locate(cfg)
        spec = model_spec(cfg, list(ds.sample_shape), ds.num_classes)[1]
        warmstart.check_model(cfg, source, spec)


def _encrypt(
    cfg: RunConfig, ds: data.Dataset, order: np.ndarray[Any, Any], key: bytes
) -> tuple[DatasetFacts, str]:
    """Stage the shares; the keyed fingerprint and the private files are made meanwhile."""
    scaler = _scaler(cfg, ds)  # first: the fit keeps both cores busy itself
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="veiltrain-owner") as pool:
        fingerprint = pool.submit(runstate.fingerprint, key, ds)  # BLAKE3 runs outside the GIL
        private = pool.submit(_save_private, cfg, ds, scaler, order)
        info = _stage_dataset(cfg, ds, order, scaler)
        private.result()
        return info, fingerprint.result()


def _run_state(
    cfg: RunConfig,
    previous: runstate.RunState | None,
    key: bytes,
    fingerprint: str,
    info: DatasetFacts,
) -> runstate.RunState:
    return runstate.RunState(
        run_id=cfg.run_id,
        key=key,
        fingerprint=fingerprint,
        settings=runstate.settings_of(cfg),
        # The batch order is public to parties; it comes from its own random seed so that it
        # says nothing about --seed (which also fixes the secret initial weights).
        order_seed=previous.order_seed if previous is not None else secrets.randbits(62),
        dataset=info.model_dump(mode="json"),
    )


def _check_same_data(cfg: RunConfig, previous: runstate.RunState, ds: data.Dataset) -> None:
    if not runstate.same_data(previous, ds):
        raise ConfigError(
            f"--dataset {cfg.dataset}: the data changed since run {cfg.run_id} was encrypted; "
            "its checkpoints were trained on the old data: start a new run (a new --run-id)"
        )


def _staged(cfg: RunConfig) -> bool:
    return all(staging(cfg, p).exists(INFO) for p in range(cfg.parties))


def _record_order(owner: Location, count: int, reuse: bool) -> np.ndarray[Any, Any]:
    """The owner-private order of records: a CSPRNG permutation, never derived from --seed.

    Parties see records in this order; with the source's order (an image folder sorted by
    class) or a --seed shuffle they could tell the label from a record's position.
    """
    if reuse and owner.exists(PRIVATE_ORDER):
        order = read_npz(owner, PRIVATE_ORDER)["order"]
        if len(order) == count:
            return order
    keys = np.frombuffer(secrets.token_bytes(8 * count), dtype=np.uint64)
    return np.argsort(keys, kind="stable")  # stored with the private files, beside staging


def _scaler(cfg: RunConfig, ds: data.Dataset) -> data.Standardizer:
    if cfg.standardize:
        # Every source row a training row (a given test split): their order cannot change the
        # statistics, so the source is read as it lies, without gathering.
        every_row = ds.train_count == len(ds.x_source)
        return data.Standardizer.fit(ds.x_source, index=None if every_row else ds.train_rows)
    return data.Standardizer.identity(ds.sample_shape)


def _stage_dataset(
    cfg: RunConfig, ds: data.Dataset, order: np.ndarray[Any, Any], scaler: data.Standardizer
) -> DatasetFacts:
    """Encode, split and stage the records in `order` chunk by chunk. The owner holds the loaded
    data set plus two chunks and writes each share byte once: no second copy of the training set
    (`training_split` rebuilds it from the source, checked against the keyed fingerprint)."""
    info = _dataset_info(ds, math.prod(ds.sample_shape) + ds.num_classes)
    for party in range(cfg.parties):
        _clear(staging(cfg, party), "dataset")  # a rerun must not upload stale shards
    splitter = sharing.StreamSplitter(cfg.parties)
    rows = max(1, _CHUNK_BYTES // (8 * info.record_words))

    def share0(idx: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        records = encode_records(
            ds.x_source,
            ds.y_train[idx],
            scaler,
            ds.num_classes,
            cfg.precision_bits,
            rows=ds.train_rows[idx],
        )
        return splitter.share0(records, in_place=True)

    # Encoded (the C loop, outside the GIL) and masked here, written by the writer thread: with
    # numpy's slower passes the mask went to the writer, which now only writes.
    masked = (share0(idx) for idx in _chunks(order, rows))
    with _ShardSink(staging(cfg, 0).child("dataset"), info.count, info.record_words) as shards:
        _write_overlapped(shards.write, masked)
        shards.close()
    _write_infos(cfg, info, splitter.seed_shares)
    return info


def _write_overlapped(
    finish: Callable[[np.ndarray[Any, Any]], None], chunks: Iterator[np.ndarray[Any, Any]]
) -> None:
    """Each chunk is written (`finish`, in order) in one writer thread while the next one is
    made: at most two chunks are held at a time."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="veiltrain-shards") as writer:
        pending: Future[None] | None = None
        for chunk in chunks:
            if pending is not None:
                pending.result()  # the writer's error surfaces here, in order
            pending = writer.submit(finish, chunk)
        if pending is not None:
            pending.result()


def encode_records(
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    scaler: data.Standardizer,
    classes: int,
    precision_bits: int,
    *,
    rows: np.ndarray[Any, Any] | None = None,
) -> np.ndarray[Any, Any]:
    """One fixed-point row per sample of x (or of x[rows]): standardised features, then the
    one-hot label y.

    The same words as sharing.encode of the standardised features joined to data.one_hot(y),
    with the passes fused (tests/test_owner.py compares them): dividing by scale * 2^-bits is
    dividing by scale and then scaling by 2^bits exactly, in one rounding; the range is checked
    before rounding (sharing.check_scaled's bound). The C loop reads the rows where they lie
    (0.35 ms for 2 MiB of records against numpy's gather and passes, 0.7); values it refuses go
    through numpy's passes, whose check names them.
    """
    quantum = np.ldexp(scaler.scale.reshape(-1), -precision_bits)
    if recordkernels.takes(x):
        picked = np.arange(len(x)) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
        limit = sharing.MAX_ENCODED_ABS - 0.5
        out, bad = recordkernels.encode_records(
            x, picked, y, mean=scaler.mean, quantum=quantum, limit=limit, classes=classes,
            one=1 << precision_bits,
        )  # fmt: skip
        if not bad:
            return out
    picked_x = x if rows is None else x[rows]
    return _encode_by_numpy(picked_x, y, scaler, classes, precision_bits)


def _encode_by_numpy(
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    scaler: data.Standardizer,
    classes: int,
    precision_bits: int,
) -> np.ndarray[Any, Any]:
    """encode_records' passes in numpy; rint writes the words straight into the rows."""
    rows, features = len(x), scaler.mean.size
    values = np.subtract(x.reshape(rows, -1), scaler.mean.reshape(-1), dtype=np.float64)
    np.divide(values, np.ldexp(scaler.scale.reshape(-1), -precision_bits), out=values)
    sharing.check_scaled(values, precision_bits)
    out = np.empty((rows, features + classes), dtype=np.int64)
    np.rint(values, out=out[:, :features], casting="unsafe")
    out[:, features:] = 0
    out[np.arange(rows), features + y] = 1 << precision_bits
    return out


def training_split(cfg: RunConfig) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The standardised training split in record order, as float32 (the plaintext shadow's
    input), rebuilt from --dataset: refused if the source changed since it was encrypted."""
    owner = owner_location(cfg)
    state = runstate.require(owner, cfg.run_id)
    ds = data.load(cfg.dataset, cfg.test_fraction, cfg.seed, cfg.max_samples)
    if not runstate.same_data(state, ds):
        raise IntegrityError(
            f"--dataset {cfg.dataset}: changed since run {cfg.run_id} was encrypted; the "
            "plaintext comparison needs the same data: restore it, or start a new --run-id"
        )
    order = read_npz(owner, PRIVATE_ORDER)["order"]
    stats = read_npz(owner, PRIVATE_SCALER)
    x = data.Standardizer(stats["mean"], stats["scale"]).apply(ds.train_features(order))
    return x.astype(np.float32), ds.y_train[order]


def _chunks(order: np.ndarray[Any, Any], rows: int) -> Iterator[np.ndarray[Any, Any]]:
    for first in range(0, len(order), rows):
        yield order[first : first + rows]


def _write_infos(cfg: RunConfig, info: DatasetFacts, seed_shares: list[sharing.SeedShare]) -> None:
    public = info.model_dump(mode="json")
    staging(cfg, 0).write_json(INFO, {**public, "format": "ffrecord"})
    for party, seed_share in enumerate(seed_shares, start=1):
        staging(cfg, party).write_json(
            INFO, {**public, "format": "keystream", "seed_share": seed_share.to_json()}
        )


def _clear(loc: Location, prefix: str) -> None:
    for name in loc.list(prefix):
        loc.remove(name)


def _dataset_info(ds: data.Dataset, record_words: int) -> DatasetFacts:
    # Shapes and counts are visible to parties by design (see the threat model).
    return DatasetFacts(
        count=ds.train_count,
        record_words=record_words,
        sample_shape=ds.sample_shape,
        num_classes=ds.num_classes,
    )


class _ShardSink:
    """Rows appended in order to FFRecord shards of about _SHARD_BYTES each, one open at a time.

    A second thread flushes each block to disk while the next one is written (one flush in
    flight; it covers everything written before it), so that writing and flushing overlap
    instead of adding up (fdatasync was over half of the writer thread's time).
    """

    def __init__(self, loc: Location, count: int, words: int) -> None:
        self.loc, self.count, self.written = loc, count, 0
        self.per_shard = max(1, _SHARD_BYTES // (words * 8))
        self.writer: FileWriter | None = None
        self.flushing: Future[None] | None = None
        loc.fs.makedirs(loc.root, exist_ok=True)  # FileWriter, like the reference, needs it
        self.flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="veiltrain-flush")

    def __enter__(self) -> _ShardSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flusher.shutdown(wait=True)  # before a failed writer's file is closed under it

    def write(self, rows: np.ndarray[Any, Any]) -> None:
        """Append int64 rows; a shard is published when its last row is in."""
        rows = np.ascontiguousarray(rows, dtype="<i8")
        while len(rows):
            writer = self.writer = self.writer or self._open()
            take = writer.n - writer.count
            writer.write_rows(rows[:take])
            rows, self.written = rows[take:], self.written + len(rows[:take])
            if writer.count < writer.n:
                self._flush(writer)
                continue
            self._settle()
            writer.close()  # its fsync has only the blocks written since the last flush
            self.writer = None

    def _flush(self, writer: FileWriter) -> None:
        """Start a flush unless one is still running (a finished one's error surfaces here)."""
        if self.flushing is None or self.flushing.done():
            self._settle()
            self.flushing = self.flusher.submit(writer.sync_data)

    def _settle(self) -> None:
        flushing, self.flushing = self.flushing, None
        if flushing is not None:
            flushing.result()

    def _open(self) -> FileWriter:
        index, rows = self.written // self.per_shard, min(self.per_shard, self.count - self.written)
        return FileWriter(self.loc.path(f"shard-{index:05d}.ffr"), rows, fs=self.loc.fs)

    def close(self) -> None:
        """Refuse a short write: every shard must have received all its rows."""
        if self.written != self.count or self.writer is not None:
            raise IntegrityError(f"{self.loc.url}: {self.written} of {self.count} records staged")


def _write_shards(loc: Location, share: np.ndarray[Any, Any]) -> None:
    """Finished rows straight into shards (the benchmark's raw write uses this too)."""
    with _ShardSink(loc, len(share), share.shape[1]) as sink:
        sink.write(share)
        sink.close()


def _save_private(
    cfg: RunConfig, ds: data.Dataset, scaler: data.Standardizer, order: np.ndarray[Any, Any]
) -> None:
    owner = owner_location(cfg)
    owner.write_bytes(PRIVATE_ORDER, _npz(order=order))
    owner.write_bytes(PRIVATE_TEST, _npz(x=scaler.apply(ds.x_test), y=ds.y_test))
    owner.write_bytes(PRIVATE_SCALER, _npz(mean=scaler.mean, scale=scaler.scale))


def _npz(**arrays: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds
    return buf.getvalue()


# ---------------------------------------------------------------------------------- model


def model_kwargs(cfg: RunConfig, sample_shape: list[int], num_classes: int) -> dict[str, Any]:
    """Built-in models get their input and output sizes from the data unless given."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.model in models.BUILTIN:
        kwargs.setdefault("in_channels", sample_shape[0])
        kwargs.setdefault("num_classes", num_classes)
        kwargs.setdefault("image_size", sample_shape[-1])
    return kwargs


def model_spec(
    cfg: RunConfig, sample_shape: list[int], num_classes: int, init: bytes | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and its spec, checked against the data; its weights come from `init` (the
    run's model-init key for the weights that get shared, else a fresh key: a checked shape)."""
    kwargs = model_kwargs(cfg, sample_shape, num_classes)
    model = models.build(cfg.model, kwargs, init)
    _check_forward(model, tuple(sample_shape), num_classes, cfg.model)
    spec = {
        "factory": cfg.model,
        "kwargs": kwargs,
        "sample_shape": sample_shape,
        "num_classes": num_classes,
        "parameters": {k: list(v.shape) for k, v in _float_state(model).items()},
    }
    return model, spec


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What is shared: floating-point parameters and buffers (integer buffers keep their init)."""
    return {k: v.detach().double() for k, v in model.state_dict().items() if v.is_floating_point()}


def encrypt_model(cfg: RunConfig) -> ModelFacts:
    """Share the initial parameters per party as safetensors; the factory is named, not pickled.

    Shapes come from the run record that encrypt_dataset wrote: the data is not loaded again.
    With --warm-start the initial parameters are the previous run's trained shares, re-randomised
    (veiltrain.warmstart): never decrypted, and no fresh weights from --seed.
    """
    owner = owner_location(cfg)
    state = runstate.require(owner, cfg.run_id)
    runstate.check_settings(state, cfg)
    shape, classes = list(state.dataset["sample_shape"]), int(state.dataset["num_classes"])
    model, spec = model_spec(cfg, shape, classes, state.model_init_key(cfg.seed))
    if cfg.warm_start:
        initial, per_party = warmstart.start(cfg, spec)
    else:
        params = _float_state(model)
        initial = {k: v.float().contiguous() for k, v in params.items()}
        per_party = _split_parameters(params, cfg)
    # The report's plaintext shadow starts from this: the same model the shares start from.
    owner.write_bytes(PRIVATE_INITIAL, save_safetensors(initial))
    owner.write_json(PRIVATE_MODEL_SPEC, spec)
    for party, tensors in enumerate(per_party):
        staging(cfg, party).write_bytes(PARAMS, save_safetensors(tensors))
        staging(cfg, party).write_json(SPEC, spec)
    return ModelFacts(parameters=len(initial), values=sum(v.numel() for v in initial.values()))


def _split_parameters(
    params: dict[str, torch.Tensor], cfg: RunConfig
) -> list[dict[str, torch.Tensor]]:
    per_party: list[dict[str, torch.Tensor]] = [{} for _ in range(cfg.parties)]
    for name, tensor in params.items():
        shares = sharing.split_full(sharing.encode(tensor.numpy(), cfg.precision_bits), cfg.parties)
        for party, share in enumerate(shares):
            per_party[party][name] = torch.from_numpy(share).contiguous()
    return per_party


def _check_forward(
    model: torch.nn.Module, shape: tuple[int, ...], classes: int, reference: str
) -> None:
    """Fail on the owner, before any upload, if the model does not fit the data."""
    x = torch.zeros((2, *shape))
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except RuntimeError as exc:
        raise ConfigError(
            f"--model {reference}: a forward pass on samples of shape {shape} failed: "
            f"{str(exc)[:300]}; adjust --model-kwargs"
        ) from exc
    if tuple(out.shape) != (2, classes):
        raise ConfigError(
            f"--model {reference}: output shape {tuple(out.shape[1:])} but the data has "
            f"{classes} classes; adjust --model-kwargs"
        )


def train_job(cfg: RunConfig) -> TrainJob:
    """The public part of a run's settings that the parties receive (from the run record)."""
    state = runstate.require(owner_location(cfg), cfg.run_id)
    runstate.check_settings(state, cfg)
    return TrainJob(
        run_id=cfg.run_id,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        loss=cfg.loss,
        precision_bits=cfg.precision_bits,
        order_seed=state.order_seed,
        settings_hash=state.tag,
        device=cfg.device,
        timeout_s=cfg.timeout_s,
        truncation=truncation.choose(cfg, int(state.dataset["count"]))[0],
    )


# --------------------------------------------------------------------------------- upload


def upload(cfg: RunConfig) -> UploadCounts:
    """Copy each party's staged artifacts to its store; the manifest goes last. Idempotent."""
    return sum((_upload_party(cfg, party) for party in range(cfg.parties)), UploadCounts())


def _upload_party(cfg: RunConfig, party: int) -> UploadCounts:
    src, dst = staging(cfg, party), party_location(cfg, party)
    names = _staged_names(src, party)
    previous = _previous_objects(dst)
    objects: dict[str, dict[str, Any]] = {}
    uploaded: dict[str, dict[str, Any]] = {}
    skipped = 0
    for name in names:
        if name in previous and _unchanged(src, dst, name, previous[name]):
            objects[name] = previous[name]
            skipped += 1
            continue
        if not uploaded and previous:
            dst.remove(MANIFEST)  # never leave an old manifest describing objects being replaced
        objects[name] = uploaded[name] = _copy_hashed(src, dst, name)
    check_objects(dst, uploaded, deep=True)  # read back what the store now holds
    manifest = _manifest(cfg, party, objects)
    if uploaded or previous.get("__manifest__") != sha256_bytes(manifest.canonical()):
        write_manifest(dst, manifest)
    copied = sum(meta["size"] for meta in uploaded.values())
    return UploadCounts(uploaded=len(uploaded), skipped=skipped, bytes=copied)


def _staged_names(src: Location, party: int) -> list[str]:
    """What is staged for a party, refusing an upload of nothing or of half a run."""
    names = src.list()
    missing = [n for n in STAGED_REQUIRED if n not in names]
    if missing:
        raise ConfigError(
            f"upload: nothing complete is staged for party {party} at {src.url} (missing "
            f"{', '.join(missing)}); run encrypt_dataset and encrypt_model first"
        )
    return names


def _copy_hashed(src: Location, dst: Location, name: str) -> dict[str, Any]:
    """Copy one staged object, hashing it on the way: each staged byte is read once."""
    with src.open_read(name) as stream:
        reader = HashingReader(stream)
        dst.put_stream(name, reader)
    return {"sha256": reader.hexdigest(), "size": reader.size}


def _unchanged(src: Location, dst: Location, name: str, meta: dict[str, Any]) -> bool:
    """Staged and stored copies both still match the previous manifest (size first: cheap).

    Hash, not just size: a same-size corruption in the store must be repaired, not skipped.
    """
    size, digest = meta.get("size"), meta.get("sha256")
    return (
        src.size(name) == size
        and dst.exists(name)
        and dst.size(name) == size
        and src.sha256(name) == digest
        and dst.sha256(name) == digest
    )


def _previous_objects(dst: Location) -> dict[str, Any]:
    if not dst.exists(MANIFEST):
        return {}
    try:
        old = read_manifest(dst)
    except IntegrityError:
        return {}  # a damaged manifest is simply rewritten after a full upload
    return {**old.table(), "__manifest__": sha256_bytes(old.canonical())}


def _manifest(cfg: RunConfig, party: int, objects: dict[str, Any]) -> Manifest:
    return Manifest.model_validate(
        {
            "run_id": cfg.run_id,
            "party": party,
            "parties": cfg.parties,
            "precision_bits": cfg.precision_bits,
            "created": datetime.now(UTC).isoformat(),
            "objects": objects,
        }
    )
