"""The benchmark's models: veiltrain's built-ins, a small ResNet-style CNN, a linear classifier."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from veiltrain.models import BasicBlock, ResNet18, SmallCNN


def resnet_style(in_channels: int = 3, num_classes: int = 10, width: int = 8) -> nn.Module:
    """A strided stem and two residual blocks with BatchNorm: ResNet's ops at a CPU-MPC size.

    The stem strides by 2 because every ReLU is a comparison circuit whose cost grows with the
    activations (about 4 s per million values here): 32x32 at full resolution would dominate.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        BasicBlock(width, width, 1),
        BasicBlock(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def linear(in_features: int, num_classes: int = 10) -> nn.Module:
    """A linear classifier on the flattened input: the cheapest step, so that the data-size
    scaling runs whole epochs over large records in seconds."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


# The model reference veiltrain's parties import (bench/ is put on their PYTHONPATH).
REFERENCES = {
    "small-cnn": "small-cnn",
    "resnet-style": "bench_models:resnet_style",
    "resnet18": "resnet18",
    "linear": "bench_models:linear",
}


def kwargs_for(name: str, sample_shape: tuple[int, ...], classes: int) -> dict[str, Any]:
    """The factory arguments veiltrain's owner would fill in for this data."""
    if name == "resnet-style":
        return {"in_channels": sample_shape[0], "num_classes": classes}
    if name == "linear":
        return {"in_features": math.prod(sample_shape), "num_classes": classes}
    return {"in_channels": sample_shape[0], "num_classes": classes, "image_size": sample_shape[-1]}


def build(name: str, sample_shape: tuple[int, ...], classes: int, seed: int = 0) -> nn.Module:
    """The same network (and initial weights for one seed) that veiltrain builds for `name`."""
    factories = {
        "small-cnn": SmallCNN,
        "resnet-style": resnet_style,
        "resnet18": ResNet18,
        "linear": linear,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factories[name](**kwargs_for(name, sample_shape, classes))
