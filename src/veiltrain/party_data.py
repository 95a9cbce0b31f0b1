"""A party's reader of its own data shares: FFRecord records or a seed-expanded keystream."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from veiltrain import sharing
from veiltrain.contract import INFO, DatasetInfo, read_model
from veiltrain.errors import IntegrityError
from veiltrain.ffrecord import FileReader
from veiltrain.store import Location


def is_shard(name: str) -> bool:
    """Whether a manifest entry is one of the data set's record shards."""
    return name.startswith("dataset/") and name.endswith(".ffr")


class PartyData:
    """Streams this party's share of one batch of records: full FFRecord or seed-expanded."""

    def __init__(self, loc: Location, shards: Sequence[str], fs: Any) -> None:
        info = read_model(loc, INFO, DatasetInfo)
        self.info = info
        self.count, self.record_words = info.count, info.record_words
        self.sample_shape, self.num_classes = info.sample_shape, info.num_classes
        self._reader: FileReader | None = None
        self._seed: sharing.SeedShare | None = None
        if info.format == "ffrecord":
            self._reader = FileReader(list(shards), check_data=True, fs=fs)
            if self._reader.n != self.count:
                raise IntegrityError(
                    f"{loc.url}/dataset: {self._reader.n} records, info says {self.count}"
                )
        else:
            self._seed = sharing.SeedShare.from_json(info.seed_share)

    @classmethod
    def in_store(cls, loc: Location, names: Iterable[str]) -> PartyData:
        """Read the shards among `names` where they are, unverified (owner-side checks, tests)."""
        return cls(loc, [loc.path(n) for n in sorted(names) if is_shard(n)], loc.fs)

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
