"""veiltrain's CUDA paths on a real GPU: skipped without one (CI); the GPU check runs them first.

`bench/device_check.sh` runs this file on the device machine before the step benchmark. Here,
without CUDA, every test is reported as skipped, never as passed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from veiltrain import launch, owner, report, ringmath
from veiltrain.config import load_config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (bench/device_check.sh runs it)"
)


def _words(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=gen)


def test_gpu_convolutions_of_shares_are_the_cpus_int64_words() -> None:
    """At ResNet18's widest layer (4608 terms an output), where CrypTen's own 22-bit limbs are
    inexact: the limb path on the GPU equals torch's int64 convolution on the CPU."""
    from crypten.cuda import CUDALongTensor

    gen = torch.Generator().manual_seed(18)
    x, w = _words(2, 512, 4, 4, gen=gen), _words(16, 512, 3, 3, gen=gen)
    out = ringmath.conv2d(CUDALongTensor(x.cuda()), CUDALongTensor(w.cuda()), padding=1)
    assert isinstance(out, CUDALongTensor)
    assert torch.equal(out.tensor().cpu(), torch.conv2d(x, w, padding=1))
    g = _words(*out.shape, gen=gen)
    back = ringmath.conv_transpose2d(CUDALongTensor(g.cuda()), CUDALongTensor(w.cuda()), padding=1)
    assert torch.equal(back.tensor().cpu(), torch.conv_transpose2d(g, w, padding=1))


@pytest.mark.slow
@pytest.mark.parametrize(("model", "bound"), [("small-cnn", 0.01), ("resnet18", 5.0)])
def test_two_parties_train_on_the_gpu_and_the_loss_decrypts(
    tmp_path: Path, model: str, bound: float
) -> None:
    """Two parties and the dealer train on cuda; the decrypted loss tracks plaintext. ResNet18's
    bound is loose: on 8x8 digits its training moves on its own (the same run on the CPU: 0.6),
    and what it guards against was 2.8e9 (wrong shares)."""
    cfg = load_config(
        model=model,
        device="cuda",
        lr=0.02,  # ResNet18 at the default 0.2 diverges, past BatchNorm's range on shares
        max_samples=160,
        batch_size=32,
        test_fraction=0.2,
        epochs=1,
        timeout_s=180,
        out=str(tmp_path / "run"),
    ).resolved()
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    owner.upload(cfg)
    launch.run_local(cfg.stores(), owner.train_job(cfg), lambda event: None)
    result = report.build_report(cfg, {})
    assert len(result["losses"]) == 4
    assert result["max_loss_gap"] < bound
