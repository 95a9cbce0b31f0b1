"""CrypTen 0.4.1 on current torch: import, conversion and one encrypted training step.

These run in one process with a one-party CrypTen (world size 1), where decrypting with
get_plain_text is fine: the point is to compare the encrypted graph with PyTorch.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from crypten_world import one_party
from veiltrain import compat, mpc, sharing
from veiltrain.errors import ConfigError
from veiltrain.models import BasicBlock, ResNet18, SmallCNN

_ENV_KEYS = ("RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND")
PRECISION_BITS = 16
FORWARD_TOLERANCE = 0.05
LEARNING_RATE = 0.1


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def crypten_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One CrypTen process (world size 1) for this module, torn down at its end."""
    # mpc.session() uses six Newton steps for inv_sqrt (BatchNorm), as the parties do.
    with one_party(tmp_path_factory.mktemp("crypten"), {"functions.sqrt_nr_iters": 6}) as crypten:
        yield crypten


# --------------------------------------------------------------------------- small models


class TinyResNet(nn.Module):
    """3x16x16 -> conv/BN/ReLU -> max pool -> 2 residual blocks -> avg pool -> GAP -> linear."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.maxpool = nn.MaxPool2d(2)
        self.block1 = BasicBlock(4, 4, 1)
        self.block2 = BasicBlock(4, 6, 2)
        self.avgpool = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.maxpool(torch.relu(self.bn(self.stem(x))))
        h = self.avgpool(self.block2(self.block1(h)))
        return self.fc(self.gap(h).flatten(1))


def _tiny_resnet() -> nn.Module:
    return TinyResNet()


def _small_cnn() -> nn.Module:
    return SmallCNN(in_channels=1, num_classes=4, width=4, image_size=8)


def _resnet18() -> nn.Module:
    return ResNet18(in_channels=3, num_classes=3, width=2, image_size=16)


# (factory, input shape, has BatchNorm)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
    "small-cnn": (_small_cnn, (6, 1, 8, 8), False),
    "tiny-resnet": (_tiny_resnet, (8, 3, 16, 16), True),
    "resnet18-w2": (_resnet18, (8, 3, 16, 16), True),
}


def _inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Inputs whose batch statistics are far from BatchNorm's initial running (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 2.0 + 1.0


def _floating_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _plain(value: Any) -> torch.Tensor:
    return value.get_plain_text() if hasattr(value, "get_plain_text") else value


def _node_values(cmodel: Any) -> dict[str, torch.Tensor]:
    """Decrypted value of every Parameter node (fine here: one party holds everything)."""
    return {
        name: _plain(mpc._node_value(node)).detach().clone()
        for name, node in mpc.parameter_nodes(cmodel).items()
    }


# --------------------------------------------------------------------------- import


def test_import_veiltrain_makes_crypten_importable_in_a_fresh_process() -> None:
    code = (
        "import sys, veiltrain\n"
        "assert 'torch' not in sys.modules  # the hook costs nothing until CrypTen is imported\n"
        "import crypten, crypten.nn, torch\n"
        "g = crypten.nn.from_pytorch(torch.nn.Linear(3, 2), torch.zeros(1, 3))\n"
        "params = [k for k, m in g._modules.items() if isinstance(m, crypten.nn.Parameter)]\n"
        "print(type(g).__name__, sorted(params))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Graph ['bias', 'weight']" in done.stdout


def _clean_env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_onnx_registration_module_resolves_after_import() -> None:
    registration = importlib.import_module("torch.onnx._internal.registration")
    assert hasattr(registration, "registry")


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", ["small-cnn", "tiny-resnet"])
def test_to_crypten_has_one_parameter_node_per_state_dict_entry(
    crypten_single: Any, name: str
) -> None:
    factory, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    expected = _floating_state(model)
    cmodel = mpc.to_crypten(model, torch.zeros((1, *shape[1:])))
    nodes = mpc.parameter_nodes(cmodel)

    assert sorted(nodes) == sorted(expected)
    trainable = dict(model.named_parameters())
    pointers = set()
    for key, node in nodes.items():
        value = mpc._node_value(node)
        assert torch.equal(value, expected[key]), key
        # Parameters train; BatchNorm running statistics are untrainable buffers.
        assert ("data" in node._parameters) == (key in trainable), key
        pointers.add(value.data_ptr())
    assert len(pointers) == len(nodes), "two Parameter nodes share one tensor"
    # No state_dict entry is left as an Identity alias of another initializer.
    for key in expected:
        assert isinstance(cmodel._modules[key], crypten_single.nn.Parameter), key
        assert cmodel._graph[key] == [], key


def test_raw_conversion_needs_the_identity_op(crypten_single: Any) -> None:
    """The exporter folds BatchNorm's running_var=1 into weight=1 as an ONNX Identity node."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    raw = crypten_single.nn.from_pytorch(model, torch.zeros(1, 1, 5, 5))
    kinds = {type(m).__name__ for m in raw._modules.values()}
    assert "Identity" in kinds
    untied = mpc.to_crypten(model, torch.zeros(1, 1, 5, 5))
    assert "Identity" not in {type(m).__name__ for m in untied._modules.values()}


# --------------------------------------------------------------------------- training step


@dataclass
class Step:
    """What one encrypted training step left behind, next to PyTorch's own step."""

    model: nn.Module  # PyTorch after one training-mode forward and backward (no update)
    cmodel: Any  # the encrypted graph after forward, backward and update_parameters
    out: torch.Tensor  # decrypted encrypted output
    loss: torch.Tensor  # decrypted encrypted loss
    reference: torch.Tensor  # PyTorch's training-mode output
    before: dict[str, torch.Tensor]  # decrypted Parameter nodes before the step
    grads: dict[str, torch.Tensor]  # decrypted gradients of the trainable nodes


def _train_step(crypten_mod: Any, name: str) -> Step:
    """Convert, encrypt, run one forward/backward/update step, and the same forward in PyTorch."""
    factory, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    x = _inputs(shape, seed=1)
    cmodel = mpc.to_crypten(model, torch.zeros((1, *shape[1:])))
    cmodel.encrypt()
    cmodel.train()
    before = _node_values(cmodel)

    out = cmodel(crypten_mod.cryptensor(x))
    # A linear loss with fixed weights: its gradients are directly comparable with PyTorch's.
    # (A summed, not averaged, loss keeps per-element gradients well above the fixed-point
    # resolution 2^-16; tiny gradients lose their relative precision in any CrypTen model.)
    weights = torch.randn(out.size(), generator=torch.Generator().manual_seed(2))
    loss = out.mul(weights).sum()
    cmodel.zero_grad()
    loss.backward()
    grads = {
        key: _plain(node.data.grad)
        for key, node in mpc.parameter_nodes(cmodel).items()
        if "data" in node._parameters and node.data.grad is not None
    }
    cmodel.update_parameters(LEARNING_RATE)

    model.train()
    reference = model(x)
    model.zero_grad()
    (reference * weights).sum().backward()
    return Step(
        model=model,
        cmodel=cmodel,
        out=out.get_plain_text(),
        loss=loss.get_plain_text(),
        reference=reference.detach(),
        before=before,
        grads=grads,
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_encrypted_training_step_matches_pytorch(crypten_single: Any, name: str) -> None:
    _, shape, has_bn = MODELS[name]
    step = _train_step(crypten_single, name)

    # Forward: the encrypted graph in training mode gives PyTorch's training-mode output.
    assert torch.isfinite(step.loss).all()
    assert (step.out - step.reference).abs().max().item() < FORWARD_TOLERANCE
    if has_bn:
        # ...which checks batch statistics for real: eval mode (running stats) differs a lot.
        step.model.eval()
        with torch.no_grad():
            eval_out = step.model(_inputs(shape, seed=1))
        assert (eval_out - step.reference).abs().max().item() > 4 * FORWARD_TOLERANCE

    # Backward + update: every trainable parameter got PyTorch's gradient and moved by it.
    after = _node_values(step.cmodel)
    torch_params = dict(step.model.named_parameters())
    missing = sorted(k for k in torch_params if k not in step.grads)
    assert not missing, f"no gradient reached {missing}"
    for key, param in torch_params.items():
        assert param.grad is not None
        scale = param.grad.abs().max().item()
        assert (step.grads[key] - param.grad).abs().max().item() <= 0.05 * scale + 2e-3, key
        moved = step.before[key] - after[key]
        assert moved.abs().max().item() > 0, f"{key} did not change"
        tolerance = LEARNING_RATE * (0.05 * scale + 2e-3) + 1e-4
        assert (moved - LEARNING_RATE * param.grad).abs().max().item() <= tolerance, key


@pytest.mark.parametrize("name", ["tiny-resnet", "resnet18-w2"])
def test_batchnorm_running_statistics_update_and_stay_untied(
    crypten_single: Any, name: str
) -> None:
    step = _train_step(crypten_single, name)
    after = _node_values(step.cmodel)
    nodes = mpc.parameter_nodes(step.cmodel)
    torch_state = step.model.state_dict()  # buffers after PyTorch's one training-mode forward
    bns = [k.removesuffix(".running_var") for k in torch_state if k.endswith(".running_var")]
    assert bns

    for bn in bns:
        mean, var = f"{bn}.running_mean", f"{bn}.running_var"
        weight, bias = f"{bn}.weight", f"{bn}.bias"
        # The running statistics moved from (0, 1) toward the batch statistics, like PyTorch's.
        assert (after[mean] - step.before[mean]).abs().max().item() > 1e-3, mean
        assert (after[var] - step.before[var]).abs().max().item() > 1e-3, var
        assert (after[mean] - torch_state[mean]).abs().max().item() < 1e-2, mean
        assert (after[var] - torch_state[var]).abs().max().item() < 1e-2, var
        # They are untrainable buffers of their own, not aliases of weight or bias.
        for stat in (mean, var):
            assert "data" not in nodes[stat]._parameters, stat
            assert nodes[stat] is not nodes[weight], stat
            assert nodes[stat] is not nodes[bias], stat
            assert mpc._node_value(nodes[stat]) is not mpc._node_value(nodes[weight]), stat
            assert mpc._node_value(nodes[stat]) is not mpc._node_value(nodes[bias]), stat
        # The weight moved by its own gradient only: the running-variance update missed it.
        assert weight in step.grads, f"no gradient reached {weight}"
        expected_weight = step.before[weight] - LEARNING_RATE * step.grads[weight]
        assert (after[weight] - expected_weight).abs().max().item() < 1e-3, weight
        assert not torch.allclose(after[weight], after[var], atol=1e-3), weight


# --------------------------------------------------------------------------- share I/O


def test_export_and_load_shares_round_trip(crypten_single: Any) -> None:
    factory, shape, _ = MODELS["tiny-resnet"]
    torch.manual_seed(0)
    model = factory()
    state = _floating_state(model)
    cmodel = mpc.to_crypten(model, torch.zeros((1, *shape[1:])))
    cmodel.encrypt()

    shares = mpc.export_shares(cmodel)
    assert sorted(shares) == sorted(state)
    for key, share in shares.items():
        assert share.dtype == torch.int64
        # One party: its share is the whole fixed-point encoding (CrypTen truncates, not rounds).
        encoded = torch.from_numpy(sharing.encode(state[key], PRECISION_BITS))
        assert (share - encoded).abs().max().item() <= 1, key

    gen = torch.Generator().manual_seed(3)
    new_values = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
    new_shares = {
        k: torch.from_numpy(sharing.encode(v, PRECISION_BITS)) for k, v in new_values.items()
    }
    mpc.load_shares(cmodel, new_shares, PRECISION_BITS)
    loaded = _node_values(cmodel)
    trainable = dict(model.named_parameters())
    for key, value in new_values.items():
        assert (loaded[key] - value).abs().max().item() <= 2.0**-PRECISION_BITS, key
        node_value = mpc._node_value(mpc.parameter_nodes(cmodel)[key])
        assert bool(node_value.requires_grad) == (key in trainable), key

    incomplete = dict(new_shares)
    dropped = next(k for k in incomplete if k.endswith("running_var"))
    del incomplete[dropped]
    with pytest.raises(ConfigError, match=dropped):
        mpc.load_shares(cmodel, incomplete, PRECISION_BITS)


def test_from_shares_and_share_of_round_trip(crypten_single: Any) -> None:
    values = np.array([[0.5, -1.25], [3.0, 0.0]])
    encoded = sharing.encode(values, PRECISION_BITS)
    tensor = mpc.from_shares(torch.from_numpy(encoded), PRECISION_BITS)
    share = mpc.share_of(tensor)
    assert share.dtype == torch.int64
    assert np.array_equal(share.numpy(), encoded)
    share.add_(1)  # a copy: changing it leaves the tensor alone
    assert np.array_equal(mpc.share_of(tensor).numpy(), encoded)


# --------------------------------------------------------------------------- idempotence


def test_apply_twice_is_harmless(crypten_single: Any) -> None:
    import crypten.nn.module as cmodule
    import crypten.nn.onnx_converter as converter

    registration = sys.modules["torch.onnx._internal.registration"]
    identity = converter.ONNX_TO_CRYPTEN["Identity"]
    bn_forward = cmodule.BatchNormalization.forward

    compat.apply()
    compat.apply()
    # Force every patch to run again, as a second import after a reload would.
    compat._APPLIED = False
    try:
        compat.apply()
        compat._alias_onnx_registration()
        compat._export_with_torchscript(converter)
        compat._add_identity(converter, cmodule)
        compat._batchnorm_single_output(cmodule)
    finally:
        compat.apply()
    assert compat._APPLIED

    assert sys.modules["torch.onnx._internal.registration"] is registration
    assert converter.ONNX_TO_CRYPTEN["Identity"] is identity
    # The BatchNorm wrapper is not wrapped again (a double wrap would index a tensor's row 0).
    assert cmodule.BatchNormalization.forward is bn_forward
    assert getattr(bn_forward, "_veiltrain_patched", False)

    # Conversion and a training-mode forward still work and still match PyTorch.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    x = _inputs((4, 3, 4, 4), seed=4)
    cmodel = mpc.to_crypten(model, x[:1])
    cmodel.encrypt()
    cmodel.train()
    out = cmodel(crypten_single.cryptensor(x)).get_plain_text()
    model.train()
    assert out.shape == (4, 2)
    assert (out - model(x)).abs().max().item() < FORWARD_TOLERANCE


def test_module_fixture_keeps_a_single_party(crypten_single: Any) -> None:
    comm = crypten_single.communicator.get()
    assert comm.get_world_size() == 1
    assert comm.get_rank() == 0
