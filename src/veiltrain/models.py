"""Model factories by name: built-in ones and `package.module:factory` references, never pickles."""

from __future__ import annotations

import importlib
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from veiltrain.errors import ConfigError, VeiltrainError
from veiltrain.sharing import MaskStream

_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class SmallCNN(nn.Module):
    """A conv net cheap enough for MPC: average pooling (linear) instead of max pooling."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32, image_size: int = 8
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(width * (image_size // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x)))
        out: torch.Tensor = self.fc(h.flatten(1))
        return out


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and a residual addition."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (2-2-2-2 basic blocks); `width` scales channels for small inputs or budgets."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, width: int = 64, image_size: int = 32
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        # Max pooling only where the input is large enough to afford it.
        self.pool: nn.Module = nn.MaxPool2d(2) if image_size >= 32 else nn.Identity()
        layers: list[nn.Module] = []
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            layers += [
                BasicBlock(cin, width * mult, stride),
                BasicBlock(width * mult, width * mult, 1),
            ]
            cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.layers(self.pool(self.stem(x))))
        return out


BUILTIN: dict[str, Callable[..., nn.Module]] = {"small-cnn": SmallCNN, "resnet18": ResNet18}


# torch's CPU generator (MT19937) state as torch.get_rng_state() lays it out: an 8-byte initial
# seed, `left` and `seeded` (int32 each), an 8-byte `next`, 624 state words stored as uint64,
# then the normal-sampling caches (zero in a fresh generator). tests/test_secrecy.py checks this
# layout against torch's own.
_MT_WORDS = 624
_MT_STATE_OFFSET = 24
_STATE_BYTES = 5056


def _keyed_state(key: bytes) -> torch.Tensor:
    """A CPU generator state whose 624 MT19937 words come from ChaCha20 under `key`.

    torch.manual_seed keeps 32 bits, so weights drawn under it are one of 2^32 candidates that a
    party knowing the factory and a seed could enumerate. No torch seeding is used at all: the
    whole state is built here, `left` = 1 so that the first draw twists the new words, and the
    initial-seed field 0, so torch.initial_seed() names no seed the weights came from.
    """
    state = np.zeros(_STATE_BYTES, dtype=np.uint8)
    state[8:16] = np.array([1, 1], dtype="<i4").view(np.uint8)  # left, seeded
    words = MaskStream(key).words(0, _MT_WORDS // 2).view(np.uint32).astype("<u8")
    state[_MT_STATE_OFFSET : _MT_STATE_OFFSET + 8 * _MT_WORDS] = words.view(np.uint8)
    return torch.from_numpy(state)


def resolve(reference: str) -> Callable[..., nn.Module]:
    """The factory a reference names: a built-in name or `package.module:factory`."""
    if reference in BUILTIN:
        return BUILTIN[reference]
    if not _REFERENCE.match(reference):
        raise ConfigError(
            f"--model {reference!r}: use one of {sorted(BUILTIN)} or 'package.module:factory'"
        )
    module_name, attr = reference.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"--model {reference!r}: cannot import {attr!r} from {module_name!r} ({exc}); "
            "check that the module is importable (on PYTHONPATH) on every party"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a user's module may fail in any way on import
        raise ConfigError(
            f"--model {reference!r}: importing {module_name!r} raised "
            f"{_one_line(exc)}; fix that module"
        ) from exc
    if not callable(factory):
        raise ConfigError(f"--model {reference!r}: {attr!r} is not callable")
    return factory  # type: ignore[no-any-return]


def build(reference: str, kwargs: Mapping[str, Any], key: bytes | None = None) -> nn.Module:
    """Call the factory with torch's generator filled from a 256-bit key: the run's model-init
    key for the owner's secret initial weights; a fresh random key (None) where the weights are
    replaced by shares or a checkpoint, so that nothing about them is predictable either."""
    factory = resolve(reference)
    try:
        # Forked, so the caller's global generator is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(_keyed_state(secrets.token_bytes(32) if key is None else key))
            model = factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"--model-kwargs {dict(kwargs)} do not fit {reference!r}: {exc}") from exc
    except VeiltrainError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's factory may fail in any way
        raise ConfigError(
            f"--model {reference!r}: the factory raised {_one_line(exc)} when called with "
            f"--model-kwargs {dict(kwargs)}; fix the factory or its arguments"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {reference!r} returned {type(model).__name__}, not nn.Module")
    return model


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, cut short: enough to name a failure without a traceback."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.Softmax,
    nn.LogSoftmax,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Dropout,
    nn.Flatten,
    nn.Identity,
)
"""torch.nn layers that CrypTen 0.4.1 (with veiltrain.compat) converts and trains correctly.

Each was converted, run forward and backward on shares and compared with torch (NOTES.md, issue
9; tests/test_bad_input.py converts each). Left out on purpose: layers CrypTen cannot convert
(Tanh, LeakyReLU, ELU, PReLU, Softplus, LayerNorm, GroupNorm, InstanceNorm, ConvTranspose,
Upsample, recurrent layers, Embedding), layers that convert but fail when run (Conv3d,
Dropout1d/2d/3d, padding layers) and, worse, ones that run with wrong results (AvgPool1d and
MaxPool1d change the shape).
"""
_CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


_PRODUCT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def forward_products(model: nn.Module, sample_shape: tuple[int, ...], batch_size: int) -> int:
    """Values one forward pass of `batch_size` samples truncates after products of shares, from
    shapes alone: every linear and convolution output, and BatchNorm's two products per value
    (the centred value squared, and times weight / sqrt(var)). Products in a model's own
    forward() (a torch.matmul) are not seen: an estimate."""
    counts: list[int] = []

    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        counts.append(out.numel() * (2 if isinstance(module, _NORM_LAYERS) else 1))

    layers = _PRODUCT_LAYERS + _NORM_LAYERS
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layers)]
    model.eval()  # BatchNorm in training mode refuses a single value per channel
    try:
        with torch.no_grad():
            model(torch.zeros((2, *sample_shape)))  # two samples: outputs scale with the batch
    finally:
        for handle in handles:
            handle.remove()
    return sum(counts) * batch_size // 2


def supported_layer_names() -> str:
    """The supported torch.nn layers, for messages."""
    return ", ".join(t.__name__ for t in SUPPORTED_LAYERS)


def check_layers(model: nn.Module, reference: str) -> None:
    """Refuse torch.nn layers CrypTen cannot run; a user's own module classes are judged by
    the conversion (check_convertible), since what they compute is in their forward()."""
    bad = [
        f"layer {name or 'the model itself'!r} ({type(module).__name__})"
        for name, module in model.named_modules()
        if _is_torch_layer(module) and not isinstance(module, SUPPORTED_LAYERS + _CONTAINERS)
    ]
    if bad:
        raise ConfigError(
            f"--model {reference!r}: CrypTen cannot train {', '.join(bad)}. Layers it can: "
            f"{supported_layer_names()} (in Sequential, ModuleList, ModuleDict or your own "
            "modules); replace the others"
        )


def _is_torch_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.")


def check_convertible(model: nn.Module, sample_shape: tuple[int, ...], reference: str) -> None:
    """Convert the model as every party will (ONNX, then CrypTen); refuse it if that fails.

    This catches what the layer list cannot see: operations in a forward() (torch.tanh, a
    padding, an indexing) that CrypTen has no counterpart for. It imports CrypTen (about 1 s).
    """
    from veiltrain import mpc  # CrypTen, patched; only the owner's preflight needs it here

    model.train()  # as the parties convert it
    try:
        mpc.to_crypten(model, torch.zeros((1, *sample_shape)))
    except Exception as exc:  # noqa: BLE001 - the exporter and converter raise many types
        raise ConfigError(
            f"--model {reference!r}: CrypTen cannot convert this model ({_one_line(exc)}). "
            f"Layers it can train: {supported_layer_names()}; in forward() use operations "
            "that map to them (e.g. torch.relu, flatten, +, matrix products)"
        ) from exc
