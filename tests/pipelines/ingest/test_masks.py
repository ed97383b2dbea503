"""Patch masks: exact counts, seeded like the views through `view_dataset`, chosen by the config."""

from __future__ import annotations

import pickle
from itertools import repeat
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import ConfigError, load_config
from pipelines.ingest.crops import crop_batch
from pipelines.ingest.dataset import row_rng, view_dataset
from pipelines.ingest.masks import MASKS, RandomPatchMask, build_mask_generator
from pipelines.ingest.recipes import simclr
from pipelines.ingest.sources import ImageSource

MINIMAL = ["data.train.path=data/cifar10-sample/train.parquet", "schedule.steps=10"]


@pytest.mark.parametrize(
    ("grid", "ratio", "hidden"), [(8, 0.75, 48), (14, 0.75, 147), (14, 0.6, 118), (4, 0.5, 8)]
)
def test_random_mask_hides_exactly_round_ratio_times_the_patches(grid, ratio, hidden):
    generator = RandomPatchMask(grid=grid, ratio=ratio)
    for row in range(50):
        (mask,) = generator(row_rng(0, 0, f"row{row}")).values()
        assert mask.shape == (grid * grid,) and mask.dtype == np.bool_
        assert mask.sum() == hidden


def test_random_mask_is_uniform_over_the_patches():
    generator = RandomPatchMask(grid=4, ratio=0.25)
    rng = np.random.default_rng(0)
    frequency = np.mean([generator(rng)["mask"] for _ in range(4000)], axis=0)
    # Each of the 16 patches is hidden with probability 4/16 (binomial sd ~0.007).
    np.testing.assert_allclose(frequency, 0.25, atol=0.03)


def test_rows_and_epochs_get_different_masks_same_seed_the_same():
    generator = RandomPatchMask(grid=8)
    masks = {
        (key, epoch): generator(row_rng(7, epoch, key))["mask"].tobytes()
        for key in ("a#0", "a#1", "b#0")
        for epoch in (0, 1)
    }
    assert len(set(masks.values())) == len(masks)
    assert generator(row_rng(7, 1, "a#1"))["mask"].tobytes() == masks[("a#1", 1)]


def test_generator_pickles_for_ray_tasks():
    generator = build_mask_generator("random", 32, 4, 0.75)
    copy = pickle.loads(pickle.dumps(generator))
    assert copy == generator == RandomPatchMask(grid=8, ratio=0.75)
    assert copy.columns == ("mask",)
    np.testing.assert_array_equal(
        copy(np.random.default_rng(1))["mask"], generator(np.random.default_rng(1))["mask"]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "blocks"}, "unknown mask 'blocks'; accepted: multiblock, random"),
        ({"patch_size": 5}, "patch size 5 does not divide the image size 32"),
        ({"ratio": 1.0}, r"ratio=1.0 must be in \(0, 1\)"),
        ({"ratio": 0.001}, "hides 0; it must hide at least one and leave one visible"),
    ],
)
def test_build_refuses_impossible_masks(kwargs, message):
    arguments = {"name": "random", "image_size": 32, "patch_size": 4, "ratio": 0.75} | kwargs
    with pytest.raises(ValueError, match=message):
        build_mask_generator(**arguments)


def test_crop_batch_adds_the_mask_after_the_views_and_keeps_columns_when_empty(sample_table):
    images = sample_table.column("image").to_pylist()[:8]
    generator = RandomPatchMask(grid=4)
    rngs = [row_rng(0, 0, str(i)) for i in range(8)]
    plain = crop_batch(images, [row_rng(0, 0, str(i)) for i in range(8)], simclr(16), rows=8)
    masked = crop_batch(images, rngs, simclr(16), rows=8, mask_generator=generator)
    for a, b in zip(plain.views, masked.views, strict=True):
        np.testing.assert_array_equal(a, b)  # drawn after the crops: views unchanged
    assert masked.masks["mask"].shape == (8, 16) and plain.masks == {}
    # A batch whose rows all fail still carries the column (one schema for every block).
    empty = crop_batch(
        [b"not an image"], repeat(rngs[0]), simclr(16), rows=1, mask_generator=generator
    )
    assert empty.kept == [] and empty.masks["mask"].shape == (0, 16)
    assert empty.masks["mask"].dtype == np.bool_


# --- through view_dataset on the committed sample ----------------------------------


def masks_by_key(ds) -> dict[tuple[str, int], np.ndarray]:
    """`mask` by (row key, epoch)."""
    out = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, key in enumerate(batch["key"]):
            out[(str(key), int(batch["epoch"][i]))] = batch["mask"][i]
    return out


@pytest.fixture(scope="module")
def sample_source(sample_dir: Path) -> ImageSource:
    return ImageSource(str(sample_dir / "train.parquet"), label_column="label")


def test_view_dataset_masks_reproducible_per_seed_epoch_row(ray_session, corpus):
    # The sample's first 96 images with undecodable files among them: a skipped row
    # takes no mask, so masks stay aligned with their rows.
    source = ImageSource(str(corpus["parquet"]), image_column="img")
    kwargs = dict(seed=3, keep_key=True, mask_generator=RandomPatchMask(grid=8), counter="t-masks")
    first = masks_by_key(view_dataset(source, simclr(32), epochs=2, **kwargs))
    again = masks_by_key(view_dataset(source, simclr(32), epochs=1, **kwargs))
    n_good = corpus["n_good"]
    assert len(first) == 2 * n_good and len(again) == n_good
    assert all(mask.shape == (64,) and mask.sum() == 48 for mask in first.values())
    for key, mask in again.items():  # epoch 0 of a shorter run: the same draws
        np.testing.assert_array_equal(mask, first[key])
    # Every (row, epoch) its own mask: C(64, 48) ~ 5e14 masks, no collision expected.
    assert len({mask.tobytes() for mask in first.values()}) == len(first)


def test_mask_column_reaches_the_torch_batches(ray_session, sample_source):
    ds = view_dataset(
        sample_source, simclr(32), seed=0, mask_generator=RandomPatchMask(grid=8, ratio=0.5)
    )
    batch = next(iter(ds.iter_torch_batches(batch_size=64, drop_last=True)))
    assert batch["mask"].shape == (64, 64) and batch["mask"].dtype == torch.bool
    assert (batch["mask"].sum(dim=1) == 32).all()


# --- chosen by the config -----------------------------------------------------------


def test_config_chooses_the_mask_and_defaults_to_none():
    assert load_config(None, MINIMAL).data.mask is None
    mask = load_config(None, [*MINIMAL, "data.mask.name=random"]).data.mask
    assert (mask.name, mask.ratio, mask.patch_size) == ("random", 0.75, 4)
    assert mask.build(32) == RandomPatchMask(grid=8, ratio=0.75)
    assert set(MASKS) == {"random", "multiblock"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.mask.name=blocks"],
            "data.mask.name: unknown mask 'blocks'; accepted: multiblock, random",
        ),
        (["data.mask.ratio=1.0"], "data.mask.ratio: Input should be less than 1"),
        (["data.mask.ratio=0"], "data.mask.ratio: Input should be greater than 0"),
        (["data.mask.patch_size=5"], "data: mask.patch_size (5) must divide recipe.size (32)"),
        (
            ["data.mask.patch_size=8", "data.recipe.size=36"],
            "data: mask.patch_size (8) must divide recipe.size (36)",
        ),
        (["data.mask.ratio=0.001"], "data: mask: random mask: ratio 0.001 of 64 patches hides 0"),
    ],
)
def test_config_refuses_bad_masks_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*MINIMAL, *overrides])
    assert message in str(info.value)
