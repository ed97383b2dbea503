"""The CPU half: torchvision's RandomResizedCrop distribution, flips, shapes, draft decode."""

from __future__ import annotations

import numpy as np
import torch
from ingest_files import encode, random_rgb
from torchvision.transforms import RandomResizedCrop

from pipelines.ingest.crops import crop_views, decode_side_for, sample_crops, views_from_bytes
from pipelines.ingest.decode import decode_rgb
from pipelines.ingest.recipes import ViewSpec, multicrop, simclr


def test_crop_box_distribution_matches_torchvision():
    spec = ViewSpec(size=32)
    rng = np.random.default_rng(0)
    ours = np.array(
        [
            [b.width * b.height / (200 * 150), b.width / b.height]
            for b in (sample_crops(200, 150, simclr(32), rng)[0] for _ in range(4000))
        ]
    )
    torch.manual_seed(0)
    image = torch.zeros(3, 150, 200)
    theirs = []
    for _ in range(4000):
        _, _, h, w = RandomResizedCrop.get_params(image, list(spec.scale), list(spec.ratio))
        theirs.append([w * h / (200 * 150), w / h])
    theirs = np.array(theirs)
    for column in range(2):
        for q in (0.1, 0.5, 0.9):
            assert abs(np.quantile(ours[:, column], q) - np.quantile(theirs[:, column], q)) < 0.03


def test_crop_views_shapes_flip_and_determinism():
    image = decode_rgb(encode(random_rgb(80), "PNG"))
    recipe = multicrop(48, 16, n_local=3)
    first = crop_views(image, recipe, np.random.default_rng(7))
    again = crop_views(image, recipe, np.random.default_rng(7))
    assert [v.shape for v in first] == [(3, 48, 48)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == np.uint8 for v in first)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # A full-image crop of a left-right ramp shows the flip.
    ramp = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, 0).repeat(3, 2)
    spec = ViewSpec(size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    from pipelines.ingest.recipes import ViewRecipe

    (flipped,) = crop_views(ramp, ViewRecipe("t", (spec,)), np.random.default_rng(0))
    assert flipped[0, 0, 0] > flipped[0, 0, -1]


def test_bytes_path_uses_draft_only_when_crops_allow():
    recipe = simclr(32)
    rng = np.random.default_rng(0)
    boxes = sample_crops(512, 512, recipe, rng)
    side = decode_side_for(512, 512, boxes, recipe)
    smallest = min(min(b.width, b.height) for b in boxes)
    assert side is not None and side * smallest / 512 >= 32 * 0.99
    views = views_from_bytes(encode(random_rgb(512)), recipe, np.random.default_rng(1))
    assert [v.shape for v in views] == [(3, 32, 32)] * 2
    big = simclr(512)
    assert decode_side_for(512, 512, sample_crops(512, 512, big, rng), big) is None
