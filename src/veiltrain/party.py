"""A compute party (or the dealer) in its own process: read the launch message, train, exit.

python -m veiltrain.party --rank R --world-size N   (launch message as JSON on stdin)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback

import torch

from veiltrain import mpc
from veiltrain.contract import TrainJob
from veiltrain.errors import ConfigError, VeiltrainError
from veiltrain.store import Location
from veiltrain.trainer import Trainer, emit

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
    trainer.verify()
    cmodel = trainer.build()
    started = time.monotonic()
    with mpc.session(spec):
        trainer.run(cmodel)
    emit("done", seconds=round(time.monotonic() - started, 3))


if __name__ == "__main__":
    sys.exit(main())
