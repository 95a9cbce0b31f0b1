"""One compute party (or the TTP dealer) for tests/test_mpc.py, run as a fresh process.

    python tests/mpc_worker.py RANK WORLD_SIZE RENDEZVOUS TIMEOUT_S FOLDER

A party reads only its own shares (FOLDER/in_<rank>.npz: int64 arrays `a` and `b`), computes
a * b and a @ b.T on MPCTensors built from those shares and writes its int64 output shares to
FOLDER/out_<rank>.npz. It never decrypts: get_plain_text and reveal are made to raise. The dealer
(RANK == WORLD_SIZE) only serves Beaver triples. A veiltrain error is printed as
"<ErrorType>: <message>" on stderr with exit status 3.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

EXIT_VEILTRAIN_ERROR = 3


def _forbid(name: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError(f"a compute party called MPCTensor.{name}: it must never decrypt")

    return refuse


def compute(rank: int, folder: Path, precision_bits: int) -> None:
    """This party's share of a * b and a @ b.T, from its shares of a and b."""
    from veiltrain import mpc

    with np.load(folder / f"in_{rank}.npz", allow_pickle=False) as data:
        a_share = torch.from_numpy(data["a"])
        b_share = torch.from_numpy(data["b"])
    a = mpc.from_shares(a_share, precision_bits)
    b = mpc.from_shares(b_share, precision_bits)
    product = a * b
    matmul = a.matmul(b.transpose(0, 1))
    out = {
        "mul": mpc.share_of(product).numpy(),
        "matmul": mpc.share_of(matmul).numpy(),
    }
    for value in out.values():
        assert value.dtype == np.int64
    np.savez(folder / f"out_{rank}.npz", **out)


def main(argv: list[str]) -> int:
    rank, world_size = int(argv[0]), int(argv[1])
    rendezvous, timeout_s, folder = argv[2], float(argv[3]), Path(argv[4])
    torch.set_num_threads(1)

    from veiltrain import mpc  # applies the CrypTen compatibility patches first
    from veiltrain.errors import VeiltrainError

    MPCTensor = mpc.MPCTensor

    MPCTensor.get_plain_text = _forbid("get_plain_text")
    MPCTensor.reveal = _forbid("reveal")

    spec = mpc.PartySpec(rank, world_size, rendezvous, timeout_s=timeout_s)
    try:
        with mpc.session(spec):
            if not spec.is_dealer:
                compute(rank, folder, spec.precision_bits)
    except VeiltrainError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_VEILTRAIN_ERROR
    print("dealer-done" if spec.is_dealer else f"party-{rank}-done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
