"""I-JEPA's multi-block masks: fixed-size columns, block scales and shapes, targets out of
the context, seeded per row like the views, chosen by the config, a picture to look at."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipelines.config import load_config
from pipelines.ingest.crops import crop_batch
from pipelines.ingest.dataset import row_rng
from pipelines.ingest.masks import MultiBlockMask, block_size, build_mask_generator
from pipelines.ingest.preview import save_masks_grid
from pipelines.ingest.recipes import ijepa

MINIMAL = ["data.train.path=data/cifar10-sample/train.parquet", "schedule.steps=10"]


@pytest.mark.parametrize(("grid", "target_count", "context_count"), [(8, 9, 14), (14, 30, 61)])
def test_counts_are_fixed_per_grid(grid, target_count, context_count):
    generator = MultiBlockMask(grid=grid)
    assert (generator.target_count, generator.context_count) == (target_count, context_count)
    for row in range(40):
        drawn = generator(row_rng(0, 0, f"row{row}"))
        assert drawn["mask"].shape == (grid * grid,) and drawn["mask"].dtype == np.bool_
        assert (~drawn["mask"]).sum() == context_count
        assert drawn["targets"].shape == (4, target_count) and drawn["targets"].dtype == np.int64


def test_targets_are_blocks_of_the_published_scale_outside_the_context():
    generator = MultiBlockMask(grid=14)
    rng = np.random.default_rng(0)
    for _ in range(50):
        drawn = generator(rng)
        for block in drawn["targets"]:
            rows, cols = np.divmod(block, 14)
            # The first target_count patches of a block of 5 or more rows and columns.
            height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert 5 <= width <= 8 and 5 <= height <= 8
            assert len(set(block.tolist())) == len(block)
            assert drawn["mask"][block].all()  # a target is never in the context


def test_block_sizes_follow_ijepa():
    # facebookresearch/ijepa multiblock.py _sample_block_size at the range's ends, 14x14.
    assert block_size(14, (0.15, 0.2), (0.75, 1.5), 0.0) == (5, 6)  # int(196*.15)=29
    assert block_size(14, (0.15, 0.2), (0.75, 1.5), 1.0) == (8, 5)  # 39 at aspect 1.5
    assert block_size(14, (0.85, 1.0), (1.0, 1.0), 1.0) == (13, 13)  # kept inside the grid


def test_seeded_per_row_like_the_views_and_pickles():
    generator = build_mask_generator("multiblock", 32, 4, 0.75)
    assert generator == MultiBlockMask(grid=8) and generator.columns == ("mask", "targets")
    copy = pickle.loads(pickle.dumps(generator))
    draws = {
        (key, epoch): generator(row_rng(3, epoch, key))["targets"].tobytes()
        for key in ("a#0", "b#0")
        for epoch in (0, 1)
    }
    assert len(set(draws.values())) == 4
    again = copy(row_rng(3, 1, "b#0"))
    np.testing.assert_array_equal(again["targets"], generator(row_rng(3, 1, "b#0"))["targets"])


def test_crop_batch_stacks_the_columns(sample_table):
    images = sample_table.column("image").to_pylist()[:4]
    rngs = [row_rng(0, 0, str(i)) for i in range(4)]
    cropped = crop_batch(images, rngs, ijepa(32), rows=4, mask_generator=MultiBlockMask(grid=8))
    assert cropped.masks["mask"].shape == (4, 64) and cropped.masks["targets"].shape == (4, 4, 9)


def test_config_builds_it():
    mask = load_config(None, [*MINIMAL, "data.mask.name=multiblock"]).data.mask
    assert mask.build(32) == MultiBlockMask(grid=8)


def test_masks_grid_png(tmp_path, sample_table):
    images = sample_table.column("image").to_pylist()[:3]
    path = save_masks_grid(tmp_path / "masks.png", images, ijepa(32), 4, cell=32)
    from PIL import Image

    assert Image.open(path).size == (4 * 34, 3 * 34)


def test_columns_reach_the_torch_batches(ray_session, sample_dir):
    import torch

    from pipelines.ingest.dataset import view_dataset
    from pipelines.ingest.sources import ImageSource

    source = ImageSource(str(sample_dir / "train.parquet"), label_column="label")
    ds = view_dataset(source, ijepa(32), seed=0, mask_generator=MultiBlockMask(grid=8))
    batch = next(iter(ds.iter_torch_batches(batch_size=32, drop_last=True)))
    assert batch["mask"].shape == (32, 64) and batch["mask"].dtype == torch.bool
    assert batch["targets"].shape == (32, 4, 9) and batch["targets"].dtype == torch.int64
    assert ((~batch["mask"]).sum(dim=1) == 14).all()
