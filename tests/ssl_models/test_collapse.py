"""The seed's point, measured: without an anti-collapse mechanism a Siamese energy goes flat.

Three methods train on the committed CIFAR-10 sample under one budget (same encoder, heads,
augmentations, optimiser, steps and seed): ``siamese`` (a plain squared-distance energy, no
anti-collapse), ``vicreg`` (regulariser) and ``simclr`` (negatives). The diagnostics of
``ssl_models.diagnostics`` are then measured on held-out test images.

Measured (train-mode batch statistics on 512 held-out images, 300 steps of SGD):

                    effective rank   representation rank   embedding std   energy gap (relative)
    siamese  before      42.6              50.6                0.093         4.54   (0.33)
             after        6.6               8.9                0.011         0.0002 (0.12)
    vicreg   after       15.2              28.4                0.120         0.30   (0.71)
    simclr   after       29.4              42.6                0.122         0.67   (0.66)

The Siamese energy goes flat: its gap falls by four orders of magnitude and its embeddings
shrink onto the projector's constant output (normalised std 0.011 against 1/sqrt(64) =
0.125). RankMe reads about 7 rather than 1 after this budget: on uncentred embeddings it
reaches 1 only once the residual spread is well under 1% of the constant, and here it is
still a few percent. The thresholds below sit well inside the measured figures.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ssl_models.backbones import Backbone
from ssl_models.diagnostics import derange, effective_rank, embedding_std, energy_gap
from ssl_models.methods import Batch, Method, build_method

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
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


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
        loss = method(Batch([two_view_augment(batch, g), two_view_augment(batch, g)])).loss
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


HEALTHY_STD = 1 / math.sqrt(PROJ_DIM)


def test_siamese_energy_goes_flat(measured):
    before, after = measured["siamese"]["before"], measured["siamese"]["after"]
    assert after["energy_gap"] < 1e-2 * before["energy_gap"]  # measured 4e-5 of it
    assert after["relative_gap"] < 0.3  # measured 0.12


def test_siamese_embeddings_collapse(measured):
    before, after = measured["siamese"]["before"], measured["siamese"]["after"]
    assert after["embedding_std"] < 0.25 * HEALTHY_STD  # measured 0.09 of it
    assert after["effective_rank"] < 0.3 * before["effective_rank"]  # 42.6 -> 6.6
    assert after["effective_rank"] < 12
    assert after["representation_rank"] < 15  # measured 8.9


@pytest.mark.parametrize("name", ["vicreg", "simclr"])
def test_anti_collapse_keeps_rank_and_gap_up(measured, name):
    before, after = measured[name]["before"], measured[name]["after"]
    assert after["embedding_std"] > 0.75 * HEALTHY_STD  # measured 0.96-0.98 of it
    assert after["energy_gap"] > 1.5 * before["energy_gap"]  # the gap grows: x3.6-x4.9
    assert after["relative_gap"] > 0.5  # measured 0.66-0.71
    assert after["effective_rank"] > 10  # measured 15.2 (vicreg), 29.4 (simclr)
    assert after["representation_rank"] > 20  # measured 28.4, 42.6


@pytest.mark.parametrize("name", ["vicreg", "simclr"])
def test_same_budget_separates_collapse_from_learning(measured, name):
    siamese, other = measured["siamese"]["after"], measured[name]["after"]
    assert siamese["representation_rank"] < 0.5 * other["representation_rank"]
    assert siamese["embedding_std"] < 0.25 * other["embedding_std"]
    assert siamese["relative_gap"] < 0.5 * other["relative_gap"]
