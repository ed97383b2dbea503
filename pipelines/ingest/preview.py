"""A grid of augmented views to look at: one row per image, one column per view."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.ingest.crops import crop_batch
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
