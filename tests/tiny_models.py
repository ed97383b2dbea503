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


def tiny_vit(image_size: int = 16, dim: int = 32, layers: int = 1, heads: int = 2) -> Backbone:
    """A real ViT backbone (the project's sin-cos positions), 4 px patches: a 4x4 grid at 16 px."""
    from ssl_models.backbones import ViTSize, _vit

    size = ViTSize(hidden_dim=dim, num_layers=layers, num_heads=heads, mlp_dim=2 * dim)
    model, feature_dim = _vit(size, image_size, small_image_stem=True)
    return Backbone("tiny_vit", model, feature_dim)


def smooth_images(n: int, side: int = 16, seed: int = 0):
    """(n, 3, side, side) images with structure (a colour and a low-frequency wave each), so
    that visible patches say something about hidden ones."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(0, 2 * math.pi, side)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = torch.randint(1, 3, (n, 3, 2), generator=g).float()
    phase = 2 * math.pi * torch.rand(n, 3, 1, 1, generator=g)
    waves = torch.sin(freq[..., :1, None] * xx + freq[..., 1:, None] * yy + phase)
    colour = torch.randn(n, 3, 1, 1, generator=g)
    return colour + waves + 0.05 * torch.randn(n, 3, side, side, generator=g)


def masks_from(generator, n: int, seed: int = 0) -> dict:
    """A batch of ``n`` rows of a mask generator's columns, as torch tensors."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    rows = [generator(rng) for _ in range(n)]
    return {name: torch.from_numpy(np.stack([row[name] for row in rows])) for name in rows[0]}
