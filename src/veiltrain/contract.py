"""What the owner and the parties agree on: the job a party is given (public values only)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from veiltrain.errors import ConfigError


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
    """HMAC of the run's training settings under an owner-private key: comparable, not
    invertible (veiltrain.runstate)."""
    device: str = "cpu"
    timeout_s: float = 300.0

    def to_json(self) -> str:
        """Serialise for the launch message on stdin or a flow parameter."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        """Parse, refusing unknown or missing fields."""
        try:
            return cls(**json.loads(text))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"train job is malformed: {exc}") from exc
