"""A grid of augmented views to look at: one row per image, one column per view."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.ingest.crops import crop_batch
from pipelines.ingest.masks import MultiBlockMask, RandomPatchMask
from pipelines.ingest.photometric import channels_first, photometric
from pipelines.ingest.recipes import ViewRecipe


def views_grid(
    images: list[bytes], recipe: ViewRecipe, *, seed: int = 0, cell: int = 96, pad: int = 2
) -> Image.Image:
    """Both halves of `recipe` on each image, de-normalised back to pixels."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    cropped = crop_batch(images, itertools.repeat(rng), recipe, rows=len(images))
    if cropped.skipped:
        raise ValueError(f"views_grid: images that do not decode: {dict(cropped.skipped)}")
    columns = []
    for view, spec in zip(cropped.views, recipe.views, strict=True):
        out = photometric(channels_first(torch.from_numpy(view)), spec, generator)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        pixels = ((out * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        columns.append(pixels.permute(0, 2, 3, 1).numpy())
    step = cell + pad
    grid = Image.new("RGB", (len(recipe.views) * step, len(images) * step), "white")
    for row in range(len(images)):
        for v, column in enumerate(columns):
            tile = Image.fromarray(column[row]).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (v * step, row * step))
    return grid


def save_views_grid(path: str | Path, images: list[bytes], recipe: ViewRecipe, **kwargs) -> Path:
    """Write `views_grid(...)` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    views_grid(images, recipe, **kwargs).save(path, format="PNG")
    return path


def masks_grid(
    images: list[bytes],
    recipe: ViewRecipe,
    patch_size: int,
    *,
    seed: int = 0,
    cell: int = 96,
    pad: int = 2,
) -> Image.Image:
    """The first view of `recipe` on each image (one row each) beside its masks: MAE's
    random mask (hidden patches grey), I-JEPA's multi-block context (patches outside it
    grey) and its target blocks (one colour each, over the dimmed view)."""
    size = recipe.views[0].size
    grid = size // patch_size
    random_mask, multiblock = RandomPatchMask(grid=grid), MultiBlockMask(grid=grid)
    rng = np.random.default_rng(seed)
    cropped = crop_batch(images, itertools.repeat(rng), recipe, rows=len(images))
    if cropped.skipped:
        raise ValueError(f"masks_grid: images that do not decode: {dict(cropped.skipped)}")
    colours = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48)], np.uint8)

    def upsample(patch_values: np.ndarray) -> np.ndarray:
        """(T, ...) per patch -> (size, size, ...) per pixel."""
        square = patch_values.reshape(grid, grid, *patch_values.shape[1:])
        return square.repeat(patch_size, axis=0).repeat(patch_size, axis=1)

    step = cell + pad
    picture = Image.new("RGB", (4 * step, len(images) * step), "white")
    for row, view in enumerate(cropped.views[0]):
        hidden = upsample(random_mask(rng)["mask"])[..., None]
        drawn = multiblock(rng)
        outside = upsample(drawn["mask"])[..., None]
        tint = np.zeros((grid * grid, 3), np.uint8)
        in_target = np.zeros(grid * grid, bool)
        for block, colour in zip(drawn["targets"], itertools.cycle(colours), strict=False):
            tint[block], in_target[block] = colour, True
        blend = view // 2 + upsample(tint) // 2
        tinted = np.where(upsample(in_target)[..., None], blend, view // 3)
        grey = np.full_like(view, 128)
        tiles = [view, np.where(hidden, grey, view), np.where(outside, grey, view), tinted]
        for column, tile in enumerate(tiles):
            tile = Image.fromarray(tile.astype(np.uint8)).resize(
                (cell, cell), Image.Resampling.NEAREST
            )
            picture.paste(tile, (column * step, row * step))
    return picture


def save_masks_grid(
    path: str | Path, images: list[bytes], recipe: ViewRecipe, patch_size: int, **kwargs
) -> Path:
    """Write `masks_grid(...)` as a PNG; returns the path. docs/img/masks_grid.png:
    `python -m pipelines.ingest.preview docs/img/masks_grid.png`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    masks_grid(images, recipe, patch_size, **kwargs).save(path, format="PNG")
    return path


if __name__ == "__main__":  # the committed picture: 6 sample images, 32 px, 4 px patches
    import sys

    import pyarrow.parquet as pq

    from pipelines.ingest.recipes import recipe_from_dict

    sample = Path(__file__).resolve().parents[2] / "data" / "cifar10-sample" / "train.parquet"
    jpegs = pq.read_table(sample, columns=["image"]).column("image").to_pylist()[:6]
    crop_only = recipe_from_dict("mae", 32, {"flip_p": 0.0})
    print(save_masks_grid(sys.argv[1], jpegs, crop_only, 4, seed=0))
