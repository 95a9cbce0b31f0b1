"""Patches that make CrypTen 0.4.1 import, convert and train on current torch; applied on import."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import sys
import warnings
from typing import Any

_APPLIED = False


def _alias_onnx_registration() -> None:
    """torch >= 2.9 moved the ONNX symbolic registry that CrypTen imports at module load."""
    old = "torch.onnx._internal.registration"
    if old in sys.modules or importlib.util.find_spec(old) is not None:
        return
    sys.modules[old] = importlib.import_module(
        "torch.onnx._internal.torchscript_exporter.registration"
    )


def _export_with_torchscript(converter: Any) -> None:
    """torch >= 2.9 exports through dynamo by default; CrypTen needs the TorchScript exporter."""
    import torch

    # Older torch has no `dynamo` switch and exports with TorchScript anyway.
    takes_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    extra: dict[str, Any] = {"dynamo": False} if takes_dynamo else {}

    def export(f: Any, pytorch_model: Any, dummy_input: Any) -> Any:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated but still the one CrypTen can read.
            warnings.simplefilter("ignore", DeprecationWarning)
            _torchscript_export(f, pytorch_model, dummy_input)
        return f

    def _torchscript_export(f: Any, pytorch_model: Any, dummy_input: Any) -> None:
        torch.onnx.export(
            pytorch_model,
            dummy_input,
            f,
            do_constant_folding=False,
            export_params=True,
            input_names=["input"],
            output_names=["output"],
            operator_export_type=torch.onnx.OperatorExportTypes.ONNX,
            opset_version=converter._OPSET_VERSION,
            **extra,
        )

    converter._export_pytorch_model = export


def _add_identity(converter: Any, module: Any) -> None:
    """Newer exporters emit ONNX Identity nodes (e.g. tied weights); CrypTen has no such op."""

    class Identity(module.Module):  # type: ignore[misc]
        """Passes its single input through unchanged."""

        def forward(self, x: Any) -> Any:
            return x

        @staticmethod
        def from_onnx(attributes: Any = None) -> Identity:
            return Identity()

    converter.ONNX_TO_CRYPTEN.setdefault("Identity", Identity)


def _batchnorm_single_output(module: Any) -> None:
    """Training-mode BatchNormalization returns a 5-tuple but the graph wires only output 0."""
    original = module.BatchNormalization.forward
    if getattr(original, "_veiltrain_patched", False):
        return

    def forward(self: Any, x: Any) -> Any:
        out = original(self, x)
        # Running statistics are updated in place by the autograd function; only Y is consumed.
        return out[0] if isinstance(out, tuple) else out

    forward._veiltrain_patched = True  # type: ignore[attr-defined]
    module.BatchNormalization.forward = forward


def _global_pool_keeps_gradients(module: Any) -> None:
    """GlobalAveragePool starts from `shallow_copy()`, which cuts the autograd graph: nothing
    below an adaptive average pool (a ResNet's whole body) would ever train."""

    def forward(self: Any, x: Any) -> Any:
        result = x
        for dim in range(2, x.dim()):
            result = result.sum(dim, keepdim=True)
        return result.div(x.nelement() / float(x.size(0) * x.size(1)))

    module.GlobalAveragePool.forward = forward


class _CryptenImportHook(importlib.abc.MetaPathFinder):
    """Patches CrypTen the moment anything imports it, so `import veiltrain` is enough."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "crypten":
            return None
        sys.meta_path.remove(self)  # one-shot: let the normal finders locate CrypTen
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        _alias_onnx_registration()  # must exist before CrypTen's own import runs
        run_module = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run_module(module)
            apply()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Patch CrypTen now if it is loaded, else when it is first imported (cheap: no imports)."""
    if "crypten" in sys.modules:
        apply()
    elif not any(isinstance(f, _CryptenImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _CryptenImportHook())


def apply() -> None:
    """Apply every patch once; safe to call repeatedly."""
    global _APPLIED  # noqa: PLW0603 - a process-wide, idempotent patch flag
    if _APPLIED:
        return
    _alias_onnx_registration()
    converter = importlib.import_module("crypten.nn.onnx_converter")
    module = importlib.import_module("crypten.nn.module")
    _export_with_torchscript(converter)
    _add_identity(converter, module)
    _batchnorm_single_output(module)
    _global_pool_keeps_gradients(module)
    # Not a compatibility fix but a security one, applied on the same path so that no CrypTen
    # imported after veiltrain ever draws protocol randomness from a torch generator.
    from veiltrain import protocol

    protocol.install()
    _APPLIED = True
