"""One small session object around CrypTen's process-wide state, plus model share loading."""

from __future__ import annotations

import datetime as dt
import functools
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from veiltrain import compat, fastpath, peerlink, protocol
from veiltrain.errors import ConfigError, InsecureSetupError, PartyError, VeiltrainError

compat.apply()

import crypten  # noqa: E402  (needs the compatibility patches first)
import crypten.nn  # noqa: E402
from crypten.mpc import MPCTensor  # noqa: E402

_ENV_KEYS = ("RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND")


@dataclass(frozen=True)
class PartySpec:
    """Where one process sits in the computation: rank n (= world size) is the dealer."""

    rank: int
    world_size: int
    rendezvous: str
    timeout_s: float = 120.0
    precision_bits: int = 16
    device: str = "cpu"

    @property
    def is_dealer(self) -> bool:
        """The trusted dealer (CrypTen's TTP) takes the rank after the last compute party."""
        return self.rank == self.world_size

    def validate(self) -> None:
        """Refuse set-ups that would give one process the data."""
        if self.world_size < 2:
            raise InsecureSetupError(
                f"world size {self.world_size}: with fewer than 2 compute parties a share IS "
                "the data; use --parties 2 or more"
            )
        if not 0 <= self.rank <= self.world_size:
            raise ConfigError(f"rank {self.rank} is outside 0..{self.world_size}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"party {self.rank}: --device {self.device} but no CUDA device here")


def _with_timeout(fn: Any, timeout: dt.timedelta) -> Any:
    """Give CrypTen's process-group calls a timeout (it passes none: gloo waits 30 minutes)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        return fn(*args, **kwargs)

    return wrapper


@contextmanager
def _patched_dist(timeout_s: float) -> Iterator[None]:
    dist = torch.distributed
    saved = dist.init_process_group, dist.new_group
    timeout = dt.timedelta(seconds=timeout_s)
    dist.init_process_group = _with_timeout(saved[0], timeout)
    dist.new_group = _with_timeout(saved[1], timeout)
    try:
        yield
    finally:
        dist.init_process_group, dist.new_group = saved


def _configure(spec: PartySpec) -> None:
    os.environ.update(
        RANK=str(spec.rank),
        WORLD_SIZE=str(spec.world_size),
        RENDEZVOUS=spec.rendezvous,
        DISTRIBUTED_BACKEND="gloo",
    )
    # TTP: Beaver triples come from the owner-side dealer, never from rank 0 (TFP's default).
    crypten.cfg.mpc.provider = "TTP"
    crypten.cfg.encoder.precision_bits = spec.precision_bits
    # Three Newton steps leave inv_sqrt 5 % off below 0.1 (BatchNorm on small variances).
    crypten.cfg.functions.sqrt_nr_iters = 6
    # Validation decrypts intermediate values to check them; fastpath also drops its hook.
    crypten.cfg.debug.validation_mode = False
    # All pairwise comparisons in one batched round instead of log2(k) sequential rounds: the
    # softmax max over a few classes and max pooling windows are small, and rounds dominate.
    crypten.cfg.functions.max_method = "pairwise"
    protocol.set_timeout(spec.timeout_s)  # the waits veiltrain posts itself (fastpath, dealer)
    fastpath.install()  # fewer tensor copies in comparisons; results unchanged (test_fastpath)


def tune_for(num_classes: int) -> None:
    """Pairwise max is quadratic in the reduced size: fall back to the tree for many classes."""
    if num_classes > 64:
        crypten.cfg.functions.max_method = "log_reduction"


@contextmanager
def session(spec: PartySpec) -> Iterator[None]:
    """Join the rendezvous as one party (or the dealer) and leave cleanly, with timeouts."""
    spec.validate()
    _configure(spec)
    _require_dealer()
    who = "the dealer" if spec.is_dealer else f"party {spec.rank}"
    try:
        with _patched_dist(spec.timeout_s):
            if spec.is_dealer:
                # Serves until party 0 says 'terminate'; keys and triples: veiltrain.protocol.
                crypten.mpc.provider.TTPServer()
                yield
                return
            crypten.init(device=spec.device if spec.device != "cpu" else None)
            try:
                _link_parties(spec)
                yield
            finally:
                peerlink.disconnect()
                crypten.uninit()
    except (RuntimeError, ValueError, OSError) as exc:
        if isinstance(exc, VeiltrainError):
            raise  # already names the problem; only CrypTen's and torch's errors are translated
        raise PartyError(
            f"{who}: the multi-party computation failed or timed out after "
            f"{spec.timeout_s:.0f} s ({type(exc).__name__}: {str(exc)[:300]}); check that every "
            f"party 0..{spec.world_size - 1} and the dealer started and reach {spec.rendezvous}"
        ) from exc


def _link_parties(spec: PartySpec) -> None:
    """Two parties on the CPU open masked values over their own link (veiltrain.peerlink)."""
    if spec.world_size == 2 and spec.device == "cpu":
        import crypten.communicator as comm

        peerlink.connect(spec.rank, spec.rendezvous, spec.timeout_s, comm.get().main_group)


_OPENING_MODULES = frozenset(
    {
        "crypten.mpc.primitives.beaver",
        "crypten.mpc.primitives.arithmetic",
        "crypten.mpc.primitives.binary",
    }
)
"""Where CrypTen opens masked values (x - a, y - b in Beaver products, x ^ r in B2A...)."""

_BATCH_OPENERS = frozenset({"crypten.mpc.primitives.beaver", "veiltrain.fastpath"})
"""Who may open masked values in a batch: Beaver products, CrypTen's and veiltrain.fastpath's."""


def _refuse(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PartyError(f"a compute party called {what}: only the owner may decrypt a value")

    return refuse


def _masked_only(what: str, fn: Any, callers: frozenset[str]) -> Any:
    """Let CrypTen's protocol modules open masked values; refuse every other caller."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller not in callers:
            raise PartyError(f"{caller or 'code'} called {what} in a compute party; refused")
        return fn(*args, **kwargs)

    guarded._veiltrain_guarded = True  # type: ignore[attr-defined]
    return guarded


def forbid_reveal() -> None:
    """Make decryption impossible in this process: a compute party must never see a value.

    `get_plain_text` raises on every tensor type. `reveal` and `reveal_batch` of the primitive
    types stay callable only from CrypTen's protocol modules, which open masked values (Beaver's
    x - a, y - b); called from anywhere else (veiltrain, a model, a user) they raise.
    """
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor

    for cls in (MPCTensor, ArithmeticSharedTensor, BinarySharedTensor):
        cls.get_plain_text = _refuse(f"{cls.__name__}.get_plain_text")
    MPCTensor.reveal = _refuse("MPCTensor.reveal")
    for cls in (ArithmeticSharedTensor, BinarySharedTensor):
        if getattr(cls.reveal, "_veiltrain_guarded", False):
            continue  # already guarded in this process
        # reveal_batch calls reveal from the primitive's own module, after its own check.
        cls.reveal = _masked_only(f"{cls.__name__}.reveal", cls.reveal, _OPENING_MODULES)
        batch = cls.__dict__["reveal_batch"].__func__
        cls.reveal_batch = staticmethod(
            _masked_only(f"{cls.__name__}.reveal_batch", batch, _BATCH_OPENERS)
        )


def _require_dealer() -> None:
    """Refuse to compute if triples would come from party 0 (CrypTen's default TFP provider)."""
    if not crypten.mpc.ttp_required():
        raise InsecureSetupError(
            f"CrypTen's triple provider is {crypten.cfg.mpc.provider!r}: party 0 would make the "
            "Beaver triples and could read every product; veiltrain requires the owner-side dealer"
        )


def to_crypten(model: torch.nn.Module, dummy_input: torch.Tensor) -> Any:
    """Convert a PyTorch module to a CrypTen graph whose parameter nodes are its state_dict keys."""
    with warnings.catch_warnings():
        # CrypTen wraps read-only ONNX buffers with torch.from_numpy; it never writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        cmodel = crypten.nn.from_pytorch(model, dummy_input)
    _untie_initializers(cmodel, model)
    return cmodel


def _untie_initializers(cmodel: Any, model: torch.nn.Module) -> None:
    """The ONNX exporter folds equal initializers into Identity nodes (BatchNorm's weight=1 and
    running_var=1); the in-place running-statistics update then overwrote the aliased weight.
    Give every state_dict entry its own Parameter node; buffers become untrainable."""
    graph = getattr(cmodel, "_graph", None)
    if graph is None:
        return
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name, tensor in {**params, **buffers}.items():
        node = cmodel._modules.get(name)
        if node is None:
            continue
        if not isinstance(node, crypten.nn.Parameter) or name in buffers:
            cmodel._modules[name] = crypten.nn.Parameter(
                tensor.detach().clone(), trainable=name in params
            )
            graph[name] = []


def parameter_nodes(cmodel: Any) -> dict[str, Any]:
    """The Parameter nodes of a converted graph, by state_dict key."""
    return {
        name: mod for name, mod in cmodel._modules.items() if isinstance(mod, crypten.nn.Parameter)
    }


def _node_value(node: Any) -> Any:
    return node._parameters.get("data", node._buffers.get("data"))


def load_shares(cmodel: Any, shares: Mapping[str, torch.Tensor], precision_bits: int) -> None:
    """Replace every (encrypted) parameter of `cmodel` with this party's share of it."""
    nodes = parameter_nodes(cmodel)
    missing = sorted(set(nodes) - set(shares))
    if missing:
        raise ConfigError(f"parameter shares missing for {missing}; re-run encrypt_model")
    for name, node in nodes.items():
        value = MPCTensor.from_shares(shares[name].to(torch.int64), precision=precision_bits)
        if "data" in node._parameters:
            value.requires_grad = True
            node.set_parameter("data", value)
        else:
            node.set_buffer("data", value)


def export_shares(cmodel: Any) -> dict[str, torch.Tensor]:
    """This party's int64 share of every parameter and buffer, by state_dict key."""
    return {
        name: _host_copy(_node_value(node).share).contiguous()
        for name, node in parameter_nodes(cmodel).items()
    }


def from_shares(share: torch.Tensor, precision_bits: int) -> Any:
    """Wrap this party's int64 share of a tensor as an MPCTensor (no communication)."""
    return MPCTensor.from_shares(share.to(torch.int64), precision=precision_bits)


def share_of(value: Any) -> torch.Tensor:
    """This party's int64 share of an MPCTensor: what a party may store, never a plaintext."""
    return _host_copy(value.share)  # stored from the CPU


def _host_copy(share: Any) -> torch.Tensor:
    """A CPU copy of a share; CrypTen wraps a CUDA share in a CUDALongTensor (no `detach`)."""
    from crypten.cuda import CUDALongTensor

    raw = share.tensor() if isinstance(share, CUDALongTensor) else share
    return raw.detach().to("cpu", copy=True)  # type: ignore[no-any-return]


# Above this many parameters the guard tests block sums instead of every gradient (ResNet18:
# 11M parameters, 22M comparisons, about 40 s a step on 2 cores, against 11k block sums).
ELEMENTWISE_GUARD_MAX = 1 << 20
GUARD_BLOCK = 1024


def sgd_step(
    cmodel: Any, lr: float, grad_threshold: float = 100.0, block: int | None = None, scale: int = 1
) -> None:
    """SGD update with CrypTen's overflow guard (zero gradients above the threshold) done for
    all parameters in one batched comparison rather than one comparison round per tensor.

    The gradients are `scale` x the true ones (losses.GRAD_SCALE): the guard's threshold is
    scaled alike, and the scale is divided out before the lr's product (`_unscaled`).

    `block` > 1 guards sums of `block` consecutive gradients against `block` x the threshold
    and zeroes a whole block that fails: a wrap-around is about 2^32 in value, far past any
    legitimate block sum, at 1/block of the comparisons. Default: per element for up to
    ELEMENTWISE_GUARD_MAX parameters, else GUARD_BLOCK.
    """
    params = [p for p in cmodel.parameters() if p.grad is not None]
    if not params:
        return
    with crypten.no_grad(), torch.no_grad():
        flat = crypten.cat([p.grad.flatten() for p in params])
        if block is None:
            block = 1 if flat.numel() <= ELEMENTWISE_GUARD_MAX else GUARD_BLOCK
        flat = _unscaled(_guarded(flat, grad_threshold * scale, block), scale)
        start = 0
        for p in params:
            size = p.grad.numel()
            p.sub_(flat[start : start + size].reshape(p.shape).mul(lr))
            start += size


def _unscaled(grads: Any, scale: int) -> Any:
    """The gradients divided by `scale` (a truncation of values about 1 in size, which wraps
    about 2^-48 of the time) before the lr's product. Folding 1/scale into that product's
    truncation would save it, but truncate products scale x larger: share-wise, ResNet18's 11M
    updates would wrap about once in 10^4 steps, each leaving a weight 2^24 off, past the guard."""
    return grads if scale == 1 else grads.div(scale)


def _guarded(flat: Any, threshold: float, block: int) -> Any:
    """The gradients with every one (or every block of `block`) outside +-threshold zeroed."""
    # A rare wrap-around in share arithmetic yields a huge value; dropping it keeps training
    # stable (CrypTen issue #347). A wrap is about 2^32 in value, far past any legitimate block
    # sum, so above ELEMENTWISE_GUARD_MAX parameters blocks are guarded by their sums.
    if block == 1:
        return flat.mul(_inside(flat, threshold))
    count = flat.numel()
    blocks = _padded(flat, block).reshape(-1, block)
    keep = _inside(blocks.sum(dim=1), threshold * block)
    # One keep bit a block, broadcast in the Beaver product: the triple's factor for the bits and
    # their opening are one word a block, not one a gradient (ResNet18: 11k words, not 11M).
    return blocks.mul(keep.unsqueeze(1)).reshape(-1)[:count]


def _inside(values: Any, bound: float) -> Any:
    """1 where a value lies strictly inside +-bound, else 0 (0/1 at scale 1)."""
    # Both bounds in one batched comparison: inside, both bits are 1; beyond either bound exactly
    # one is, so their sum minus 1 is the mask with no extra multiplication round. (A square
    # test passes values whose square wraps to small.)
    bits = crypten.cat([values.neg(), values]).lt(bound)
    return bits[: values.numel()] + bits[values.numel() :] - 1


def _padded(flat: Any, block: int) -> Any:
    """flat with shares of 0 appended up to a multiple of `block` (local, no message)."""
    pad = -flat.numel() % block
    return crypten.cat([flat, flat[:1].mul(0).expand(pad)]) if pad else flat
