"""The CPU half: torchvision's RandomResizedCrop distribution, flips, shapes, draft decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from ingest_files import encode, random_rgb
from torchvision.transforms import RandomResizedCrop

from pipelines.ingest.crops import (
    crop_batch,
    crop_views,
    decode_side_for,
    sample_crops,
    views_from_bytes,
)
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
    assert [v.shape for v in first] == [(48, 48, 3)] * 2 + [(16, 16, 3)] * 3
    assert all(v.dtype == np.uint8 for v in first)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # A full-image crop of a left-right ramp shows the flip.
    ramp = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, 0).repeat(3, 2)
    spec = ViewSpec(size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    from pipelines.ingest.recipes import ViewRecipe

    (flipped,) = crop_views(ramp, ViewRecipe("t", (spec,)), np.random.default_rng(0))
    assert flipped[0, 0, 0] > flipped[0, -1, 0]


def test_bytes_path_uses_draft_only_when_crops_allow():
    recipe = simclr(32)
    rng = np.random.default_rng(0)
    boxes = sample_crops(512, 512, recipe, rng)
    side = decode_side_for(512, 512, boxes, recipe)
    smallest = min(min(b.width, b.height) for b in boxes)
    assert side is not None and side * smallest / 512 >= 32 * 0.99
    views = views_from_bytes(encode(random_rgb(512)), recipe, np.random.default_rng(1))
    assert [v.shape for v in views] == [(32, 32, 3)] * 2
    big = simclr(512)
    assert decode_side_for(512, 512, sample_crops(512, 512, big, rng), big) is None


def test_crops_equal_torchvision_resized_crop_and_flip():
    """Each view is torchvision's resized_crop (antialiased bilinear) of its box, mirrored
    when the box says so (up to the filter's fixed-point rounding: +-1 level)."""
    image = decode_rgb(encode(random_rgb(96), "PNG"))
    recipe = multicrop(64, 24, n_local=6)
    rng = np.random.default_rng(11)
    boxes = sample_crops(96, 96, recipe, np.random.default_rng(11))
    views = crop_views(image, recipe, rng)
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)
    assert {b.flip for b in boxes} == {True, False}
    for box, view, spec in zip(boxes, views, recipe.views, strict=True):
        theirs = TF.resized_crop(
            pixels, box.top, box.left, box.height, box.width, [spec.size] * 2, antialias=True
        )
        if box.flip:
            theirs = TF.horizontal_flip(theirs)
        diff = (torch.from_numpy(view).permute(2, 0, 1).int() - theirs.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.05


def test_crop_batch_skips_bad_rows_without_gaps():
    """Bad rows are counted by reason and leave no gap; good rows equal their single-image
    views; the mask seam gets each kept row's generator after its crops."""
    recipe = simclr(24)
    good = [encode(random_rgb(40 + 8 * i)) for i in range(3)]
    datas = [good[0], b"", good[1], b"not an image at all", good[2]]
    cropped = crop_batch(
        datas,
        (np.random.default_rng(i) for i in range(len(datas))),
        recipe,
        rows=len(datas),
        mask_generator=lambda rng: {"mask": rng.random((2, 2)) < 0.5},
    )
    assert cropped.kept == [0, 2, 4]
    assert cropped.skipped == {"empty": 1, "not_an_image": 1}
    assert [v.shape for v in cropped.views] == [(3, 24, 24, 3)] * 2
    assert cropped.masks["mask"].shape == (3, 2, 2)
    for row, index in enumerate(cropped.kept):
        single = views_from_bytes(datas[index], recipe, np.random.default_rng(index))
        for view, batch in zip(single, cropped.views, strict=True):
            np.testing.assert_array_equal(batch[row], view)
    with pytest.raises(ValueError, match="more than rows=2"):
        crop_batch(good, (np.random.default_rng(0) for _ in good), recipe, rows=2)
