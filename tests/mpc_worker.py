"""One compute party (or the TTP dealer) for tests/test_mpc.py, run as a fresh process.

    python tests/mpc_worker.py RANK WORLD_SIZE RENDEZVOUS TIMEOUT_S FOLDER [MODE]

MODE "products" (default): a party reads only its own shares (FOLDER/in_<rank>.npz: int64 arrays
`a` and `b`), computes a * b and a @ b.T on MPCTensors built from those shares and writes its
int64 output shares to FOLDER/out_<rank>.npz. MODE "randomness": a party writes the protocol keys
it holds and shares of triples, B2A bits and zero sharings drawn from them (what an attacker
holding this party's process would see). MODE "guard": a party applies one SGD step with the
gradient shares `a` to zero parameters and writes its parameter shares ("guard-blocks": the same
with the guard on sums of 4 gradients; "guard-scaled": lr 0.5 on gradients 256 x the true ones,
as the trainer's loss scaling gives them). MODE "signs": a party writes its shares of a < 0
(veiltrain's bit-sliced comparison and CrypTen's own) and of relu(a); "signs-stalled": the same,
but party 1 first sleeps past the timeout, so party 0 waits in an opening. MODE "chains": a party
writes its shares of exp(a) and inv_sqrt(b), veiltrain's and CrypTen's. MODE "trunc": a party
writes its shares of a >> 16 by the exact truncation and by CrypTen's share-wise one, and the
words it received doing the exact one. MODE "layers": a convolution, BatchNorm and ReLU forward
and backward, with every word received in an opening ("layers-exact": the forward's products
truncated exactly). MODE "stall": a party joins and then sends nothing for TIMEOUT_S + 5 s, so
that the dealer's wait times out. No party ever
decrypts: get_plain_text and reveal are made to raise. The dealer (RANK == WORLD_SIZE) only
serves Beaver triples. A veiltrain error is printed as "<ErrorType>: <message>" on stderr with
exit status 3.
"""

from __future__ import annotations

import sys
import time
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


KEYS: dict[int, bytes] = {}
"""The key of every protocol stream this process built, by stream id (the test's own hook)."""


def _record_keys() -> None:
    from veiltrain import protocol

    original = protocol.KeyStream.__init__

    def init(self: Any, key: bytes) -> None:
        KEYS[id(self)] = bytes(key)
        original(self, key)

    protocol.KeyStream.__init__ = init  # type: ignore[method-assign]


KEY_ORDER = ("ttp", "prev", "next", "local", "global")


def randomness(rank: int, folder: Path) -> None:
    """Dump this party's protocol keys and its shares of freshly dealt correlated randomness."""
    import crypten
    from crypten.mpc.primitives import ArithmeticSharedTensor
    from crypten.mpc.provider.ttp_provider import TTPClient

    provider = crypten.mpc.get_default_provider()
    a, b, c = provider.generate_additive_triple((4096,), (4096,), "mul")
    ba, bb, bc = provider.generate_binary_triple((4096,), (4096,))
    r_a, r_b = provider.B2A_rng((4096,))
    zero = ArithmeticSharedTensor.PRZS((4096,))
    streams = crypten.generators
    cpu = torch.device("cpu")
    named = [TTPClient.get().generator] + [streams[k][cpu] for k in KEY_ORDER[1:]]
    assert all(type(g).__name__ == "KeyStream" for g in named), named
    np.savez(
        folder / f"out_{rank}.npz",
        keys=np.frombuffer(b"".join(KEYS[id(g)] for g in named), dtype=np.uint8).reshape(-1, 32),
        a=a.share.numpy(),
        b=b.share.numpy(),
        c=c.share.numpy(),
        ba=ba.share.numpy(),
        bb=bb.share.numpy(),
        bc=bc.share.numpy(),
        r_arith=r_a.share.numpy(),
        r_bin=r_b.share.numpy(),
        zero=zero.share.numpy(),
    )


class _Params:
    def __init__(self, params: list[Any]) -> None:
        self._params = params

    def parameters(self) -> list[Any]:
        return self._params


def guard(
    rank: int, folder: Path, precision_bits: int, block: int | None = None, scale: int = 1
) -> None:
    """One SGD step (lr 1, or 0.5 on gradients `scale` x the true ones) from zero parameters
    with the gradient shares in `a`."""
    from veiltrain import mpc

    with np.load(folder / f"in_{rank}.npz", allow_pickle=False) as data:
        grad = mpc.from_shares(torch.from_numpy(data["a"]), precision_bits)
    param = mpc.from_shares(torch.zeros_like(grad.share), precision_bits)
    param.grad = grad
    lr = 1.0 if scale == 1 else 0.5
    mpc.sgd_step(_Params([param]), lr=lr, grad_threshold=100.0, block=block, scale=scale)
    np.savez(folder / f"out_{rank}.npz", param=mpc.share_of(param).numpy())


def signs(rank: int, folder: Path, precision_bits: int) -> None:
    """Shares of a < 0 from veiltrain's comparison and from CrypTen's, and of relu(a)."""
    from veiltrain import fastpath, mpc

    with np.load(folder / f"in_{rank}.npz", allow_pickle=False) as data:
        value = mpc.from_shares(torch.from_numpy(data["a"]), precision_bits)
    assert mpc.MPCTensor._ltz is fastpath._ltz, "the party runs without veiltrain's comparison"
    np.savez(
        folder / f"out_{rank}.npz",
        ltz=mpc.share_of(value._ltz()).numpy(),
        stock_ltz=mpc.share_of(fastpath._ORIGINAL["ltz"](value)).numpy(),
        relu=mpc.share_of(value.relu()).numpy(),
    )


def relu(rank: int, folder: Path, precision_bits: int) -> None:
    """relu(a) and its gradient for g through autograd: veiltrain's dealt select, then CrypTen's
    own; with everything this party received in the select's openings."""
    from crypten.gradients import AutogradReLU

    from veiltrain import chains, fastpath, mpc

    opened: list[np.ndarray] = []
    original = chains.open_masked

    def recorded(masked: list[chains.Masked], *, binary: Any) -> list[torch.Tensor]:
        result = original(masked, binary=binary)
        opened.extend(o.reshape(-1).numpy().copy() for o in result)
        return result

    def run() -> tuple[np.ndarray, np.ndarray]:
        with np.load(folder / f"in_{rank}.npz", allow_pickle=False) as data:
            a, g = (mpc.from_shares(torch.from_numpy(data[k]), precision_bits) for k in "ag")
        a.requires_grad = True
        out = a.relu()
        out.backward(g)
        return mpc.share_of(out).numpy(), mpc.share_of(a.grad).numpy()

    assert AutogradReLU.forward is fastpath._relu_forward, "the party runs without the select"
    chains.open_masked = recorded
    try:
        out, grad = run()
    finally:
        chains.open_masked = original
    words = opened[:]  # e (packed bits), x - a, then g - a'
    AutogradReLU.forward = staticmethod(fastpath._ORIGINAL["relu_forward"])
    AutogradReLU.backward = staticmethod(fastpath._ORIGINAL["relu_backward"])
    stock_out, stock_grad = run()
    np.savez(
        folder / f"out_{rank}.npz",
        out=out,
        grad=grad,
        stock_out=stock_out,
        stock_grad=stock_grad,
        bits=words[0],
        masked=np.concatenate(words[1:]),
    )


def chains(rank: int, folder: Path, precision_bits: int) -> None:
    """Shares of exp(a) and inv_sqrt(b) from veiltrain's chains and from CrypTen's functions."""
    from crypten.cryptensor import CrypTensor

    from veiltrain import mpc

    with np.load(folder / f"in_{rank}.npz", allow_pickle=False) as data:
        a, b = (mpc.from_shares(torch.from_numpy(data[k]), precision_bits) for k in ("a", "b"))
    np.savez(
        folder / f"out_{rank}.npz",
        exp=mpc.share_of(a.exp()).numpy(),
        stock_exp=mpc.share_of(CrypTensor.exp(a)).numpy(),
        inv_sqrt=mpc.share_of(b.inv_sqrt()).numpy(),
        stock_inv_sqrt=mpc.share_of(CrypTensor.inv_sqrt(b)).numpy(),
    )


def truncations(rank: int, folder: Path, precision_bits: int) -> None:
    """Shares of a >> precision_bits (raw words) by the exact truncation and by CrypTen's
    share-wise one; with the words this party received: c opened and, for party 0, the dealer's
    answer."""
    from veiltrain import chains, mpc, peerlink, ringmath, truncation

    received: list[np.ndarray] = []
    original_exchange, original_post = chains.exchange, peerlink.DealerClient.post

    def exchanged(mine: torch.Tensor) -> torch.Tensor:
        theirs = original_exchange(mine)
        received.append(theirs.numpy().copy())
        return theirs

    def posted(self: Any, request: bytes, into: torch.Tensor) -> Any:
        arrived = original_post(self, request, into)

        def wait() -> None:
            arrived()
            received.append(into.reshape(-1).numpy().copy())

        return wait

    with np.load(folder / f"in_{rank}.npz", allow_pickle=False) as data:
        share = torch.from_numpy(data["a"])
    mpc.from_shares(share, precision_bits)  # the session's first use sets CrypTen up
    chains.exchange, peerlink.DealerClient.post = exchanged, posted  # type: ignore[method-assign]
    try:
        exact = truncation.trunc_exact(share, precision_bits, rank)
    finally:
        chains.exchange, peerlink.DealerClient.post = original_exchange, original_post
    local = ringmath.trunc_div_(share.clone(), 1 << precision_bits)
    np.savez(
        folder / f"out_{rank}.npz",
        exact=exact.numpy(),
        local=local.numpy(),
        received=np.concatenate(received),
    )


def pooling(rank: int, folder: Path, precision_bits: int) -> None:
    """2x2 max pooling of a (values, one-hots, input gradient) by tournament and by CrypTen."""
    from crypten.cryptensor import CrypTensor

    from veiltrain import mpc

    with np.load(folder / f"in_{rank}.npz", allow_pickle=False) as data:
        a, g = (mpc.from_shares(torch.from_numpy(data[k]), precision_bits) for k in ("a", "g"))
    out, hot = a.max_pool2d(2, return_indices=True)
    stock_out, stock_hot = CrypTensor.max_pool2d(a, 2, return_indices=True)
    grad = g._max_pool2d_backward(
        hot, 2, padding=(0, 0), stride=(2, 2), dilation=(1, 1), output_size=a.size()
    )
    np.savez(
        folder / f"out_{rank}.npz",
        **{k: mpc.share_of(v).numpy() for k, v in [("out", out), ("hot", hot), ("grad", grad)]},
        stock_out=mpc.share_of(stock_out).numpy(),
        stock_hot=mpc.share_of(stock_hot).numpy(),
    )


def kernel_grad(rank: int, folder: Path, precision_bits: int) -> None:
    """A 3x3 convolution's kernel gradient from g and the input x: one Beaver product of the
    two (the dealer cuts the mask's patches) and a matmul with the patches of x's shares."""
    from veiltrain import fastpath, mpc

    with np.load(folder / f"in_{rank}.npz", allow_pickle=False) as data:
        x, g = (mpc.from_shares(torch.from_numpy(data[k]), precision_bits) for k in ("x", "g"))
    settings: dict[str, Any] = {"padding": (1, 1), "stride": (2, 2), "dilation": (1, 1)}
    out = {
        "triple": fastpath._kernel_grad(x, g, (4, 3, 3, 3), **settings),
        "patches": fastpath._kernel_grad_patches(x, g, (4, 3, 3, 3), **settings),
    }
    np.savez(folder / f"out_{rank}.npz", **{k: mpc.share_of(v).numpy() for k, v in out.items()})


def openings(rank: int, folder: Path, precision_bits: int) -> None:
    """Everything this party learns from the other in two-party openings, while it computes
    relu(a), a * a and exp(a / 10): the opened words (its own masked words are its own)."""
    from veiltrain import chains, mpc, peerlink

    seen: dict[str, list[np.ndarray]] = {"words": [], "binary": [], "bits": [], "private": []}
    original, exchange = chains.open_masked, chains.exchange
    opening = [False]

    def recorded(masked: list[chains.Masked], *, binary: bool) -> list[torch.Tensor]:
        opening[0] = True
        try:
            opened = original(masked, binary=binary)
        finally:
            opening[0] = False
        # B2A opens one tensor of single bits; every other opening is of whole words.
        kind = ("bits" if len(masked) == 1 else "binary") if binary else "words"
        seen[kind] += [o.reshape(-1).numpy().copy() for o in opened]
        return opened

    def exchanged(mine: torch.Tensor) -> torch.Tensor:
        theirs = exchange(mine)
        if not opening[0]:  # an AND of private inputs: the other party's input, masked
            seen["private"].append(theirs.reshape(-1).numpy().copy())
        return theirs

    chains.open_masked, chains.exchange = recorded, exchanged
    try:
        with np.load(folder / f"in_{rank}.npz", allow_pickle=False) as data:
            a = mpc.from_shares(torch.from_numpy(data["a"]), precision_bits)
        a.relu(), a * a, (a * 0.1).exp()
    finally:
        chains.open_masked, chains.exchange = original, exchange
    linked = np.array(peerlink.current() is not None)  # the openings went over the parties' link
    np.savez(
        folder / f"out_{rank}.npz", linked=linked, **{k: np.concatenate(v) for k, v in seen.items()}
    )


def layers(rank: int, folder: Path, precision_bits: int, exact: bool = False) -> None:
    """A convolution, BatchNorm and ReLU, forward and backward through CrypTen's autograd: the
    output and gradients, and every word this party received in an opening, by opening. With
    `exact`, the forward's products are truncated exactly, as a job asking for it trains."""
    from veiltrain import chains, mpc, truncation

    opened: list[np.ndarray] = []
    original = chains.open_masked

    def recorded(masked: list[chains.Masked], *, binary: Any) -> list[torch.Tensor]:
        result = original(masked, binary=binary)
        # Whole words x - a only (the select opens its packed bits beside its x - a).
        modes = (binary,) * len(result) if isinstance(binary, bool) else binary
        words = (o for o, xor in zip(result, modes, strict=True) if not xor)
        opened.extend(o.reshape(-1).numpy().copy() for o in words)
        return result

    with np.load(folder / f"in_{rank}.npz", allow_pickle=False) as data:
        x, kernel, weight, bias, g = (
            mpc.from_shares(torch.from_numpy(data[k]), precision_bits)
            for k in ("x", "kernel", "weight", "bias", "g")
        )
    for parameter in (kernel, weight, bias):
        parameter.requires_grad = True
    chains.open_masked = recorded
    try:
        with truncation.exact_products(exact):
            out = x.conv2d(kernel, padding=1).batchnorm(weight, bias, training=True).relu()
        out.backward(g)
    finally:
        chains.open_masked = original
    results = {"out": out, "kernel_grad": kernel.grad, "weight_grad": weight.grad}
    np.savez(
        folder / f"out_{rank}.npz",
        **{k: mpc.share_of(v).numpy() for k, v in results.items()},
        **{f"opened_{i}": words for i, words in enumerate(opened)},
    )


def main(argv: list[str]) -> int:
    rank, world_size = int(argv[0]), int(argv[1])
    rendezvous, timeout_s, folder = argv[2], float(argv[3]), Path(argv[4])
    mode = argv[5] if len(argv) > 5 else "products"
    torch.set_num_threads(1)

    from veiltrain import mpc  # applies the CrypTen compatibility patches first
    from veiltrain.errors import VeiltrainError

    if mode == "randomness":
        _record_keys()

    MPCTensor = mpc.MPCTensor

    MPCTensor.get_plain_text = _forbid("get_plain_text")
    MPCTensor.reveal = _forbid("reveal")

    spec = mpc.PartySpec(rank, world_size, rendezvous, timeout_s=timeout_s)
    try:
        with mpc.session(spec):
            if not spec.is_dealer:
                _party_work(mode, rank, folder, spec.precision_bits, timeout_s)
    except VeiltrainError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_VEILTRAIN_ERROR
    print("dealer-done" if spec.is_dealer else f"party-{rank}-done", flush=True)
    return 0


def _party_work(mode: str, rank: int, folder: Path, precision_bits: int, timeout_s: float) -> None:
    if mode == "products":
        compute(rank, folder, precision_bits)
    elif mode == "randomness":
        randomness(rank, folder)
    elif mode == "guard":
        guard(rank, folder, precision_bits)
    elif mode == "guard-blocks":
        guard(rank, folder, precision_bits, block=4)
    elif mode == "guard-scaled":
        guard(rank, folder, precision_bits, scale=256)
    elif mode == "signs":
        signs(rank, folder, precision_bits)
    elif mode == "chains":
        chains(rank, folder, precision_bits)
    elif mode == "relu":
        relu(rank, folder, precision_bits)
    elif mode == "pooling":
        pooling(rank, folder, precision_bits)
    elif mode == "trunc":
        truncations(rank, folder, precision_bits)
    elif mode == "kernel-grad":
        kernel_grad(rank, folder, precision_bits)
    elif mode == "openings":
        openings(rank, folder, precision_bits)
    elif mode == "layers":
        layers(rank, folder, precision_bits)
    elif mode == "layers-exact":
        layers(rank, folder, precision_bits, exact=True)
    elif mode == "signs-stalled":
        if rank == 1:
            time.sleep(timeout_s + 5)
        signs(rank, folder, precision_bits)
    elif mode == "stall":
        time.sleep(timeout_s + 5)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
