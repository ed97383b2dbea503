"""A real, tiny backbone for fast method and training-step tests (no Ray, no torchvision)."""

from __future__ import annotations

from torch import nn

from ssl_models.backbones import Backbone


def tiny_backbone() -> Backbone:
    """A real Backbone around a two-conv net; global pooling lets views differ in size."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Backbone("tiny_cnn", net, feature_dim=16)
