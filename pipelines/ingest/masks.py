"""Masks for masked and predictive methods, drawn in the data pipeline beside the views.

A mask generator is the ``mask_generator`` of ``view_dataset`` (the ``MaskGenerator``
seam of ``pipelines.ingest.crops``): called once per decoded row with that row's
generator, after its crops, so a mask is seeded like the views, by (seed, epoch, key),
and the views are the same with or without it. It returns that row's columns
(``columns`` names them); the loop hands them to the method as ``Batch.extras``.
Generators are small frozen dataclasses: Ray pickles them into the decode tasks.

``MASKS`` maps the config's ``data.mask.name`` to a generator class, built from the
patch grid's side and the mask ratio (``build_mask_generator``): ``random`` (MAE) and
``multiblock`` (I-JEPA, whose block scales replace the ratio).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class RandomPatchMask:
    """MAE's random masking (He et al. 2022; facebookresearch/mae ``models_mae.py``,
    ``random_masking``): each row hides a uniformly random subset of its patches.

    ``grid``: patches per image side (image size // patch size), T = grid**2 patches in
    row-major order (``Backbone.tokens``'s order); exactly round(ratio * T) are hidden
    (MAE keeps int(T * (1 - ratio)): the same count whenever ratio * T is whole, as for
    the default 0.75 on 8x8 or 14x14 grids). Column ``mask``: bool (T,), True = hidden.
    """

    grid: int
    ratio: float = 0.75
    columns: ClassVar[tuple[str, ...]] = ("mask",)

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"random mask: grid={self.grid!r} must be >= 1")
        if not 0 < self.ratio < 1:
            raise ValueError(f"random mask: ratio={self.ratio!r} must be in (0, 1)")
        if not 0 < self.hidden < self.num_patches:
            raise ValueError(
                f"random mask: ratio {self.ratio} of {self.num_patches} patches hides "
                f"{self.hidden}; it must hide at least one and leave one visible"
            )

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def hidden(self) -> int:
        return round(self.ratio * self.num_patches)

    def __call__(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """{"mask": bool (T,)} with exactly ``hidden`` True entries, drawn from ``rng``."""
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.permutation(self.num_patches)[: self.hidden]] = True
        return {"mask": mask}


def block_size(
    grid: int, scale: tuple[float, float], aspect: tuple[float, float], u: float
) -> tuple[int, int]:
    """(height, width) in patches of a block drawn with uniform ``u``: I-JEPA's
    ``_sample_block_size`` (facebookresearch/ijepa ``src/masks/multiblock.py``), where one
    uniform sets both the scale and the aspect ratio; the block is kept inside the grid
    with a margin (height and width < grid), as there."""
    keep = int(grid * grid * (scale[0] + u * (scale[1] - scale[0])))
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    height = min(int(round(math.sqrt(keep * ratio))), grid - 1)
    width = min(int(round(math.sqrt(keep / ratio))), grid - 1)
    return max(height, 1), max(width, 1)


@dataclass(frozen=True)
class MultiBlockMask:
    """I-JEPA's multi-block masks (Assran et al. 2023, sec. 3; facebookresearch/ijepa
    ``src/masks/multiblock.py`` ``MaskCollator``, defaults of ``configs/in1k_vith14_ep300.yaml``):
    ``targets`` blocks of scale ``target_scale`` and aspect ratio ``target_aspect``, and
    one context block of scale ``context_scale`` (square), with every target block
    removed from it (``allow_overlap: false``).

    Columns, fixed-size so that rows drawn independently batch together:

    - ``mask``: bool (T,), True = not in the context: the context encoder sees exactly
      ``context_count`` patches (``visible_patches(mask)``, grid order);
    - ``targets``: int64 (targets, ``target_count``), each target block's patches.

    I-JEPA draws one block size per batch and trims every row to the batch's minimum
    count. Here each row is drawn alone from its own generator (seeded by (seed, epoch,
    key) like the views), so the counts are fixed per grid instead:
    ``target_count`` is the smallest block the scale and aspect ranges can give (each
    block keeps its first ``target_count`` patches in grid order, I-JEPA's trimming rule);
    ``context_count`` is the count that ``1 - context_quantile`` of draws reach (estimated
    once per grid from fixed-seed draws). A row whose context falls short is drawn again
    (I-JEPA also redraws masks that keep too few patches); a longer context keeps a
    uniformly random ``context_count`` of its patches, so no part of the image is
    favoured. I-JEPA's batch minimum is about the 1% quantile for its batches of 128 and
    more; the 5% default keeps somewhat more context (14 of 64 patches instead of about 11
    on the 8x8 grid of 32 px images in 4 px patches; 61 of 196 instead of about 52 on
    the 14x14 grid of 224 px images in 16 px patches).
    """

    grid: int
    targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_quantile: float = 0.05
    columns: ClassVar[tuple[str, ...]] = ("mask", "targets")
    max_redraws: ClassVar[int] = 100

    def __post_init__(self) -> None:
        if self.grid < 3:
            raise ValueError(f"multiblock mask: grid={self.grid!r} must be >= 3")
        if self.targets < 1:
            raise ValueError(f"multiblock mask: targets={self.targets!r} must be >= 1")
        for name in ("target_scale", "target_aspect", "context_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high or (name != "target_aspect" and high > 1):
                raise ValueError(f"multiblock mask: {name}={(low, high)!r} is not a valid range")
        if not 0 <= self.context_quantile < 1:
            raise ValueError(
                f"multiblock mask: context_quantile={self.context_quantile!r} must be in [0, 1)"
            )
        if self.context_count < 1:
            raise ValueError(
                f"multiblock mask: {self.targets} target blocks leave no context on a "
                f"{self.grid}x{self.grid} grid"
            )

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def target_count(self) -> int:
        """Patches per target block: the smallest block the ranges can give."""
        return _smallest_block(self.grid, self.target_scale, self.target_aspect)

    @property
    def context_count(self) -> int:
        """Patches the context encoder sees (see the class docstring)."""
        return _context_count(self)

    def _block(self, rng: np.random.Generator, scale, aspect) -> np.ndarray:
        """Row-major indices of one block at a uniformly random place."""
        h, w = block_size(self.grid, scale, aspect, rng.random())
        top = rng.integers(0, self.grid - h)  # I-JEPA: torch.randint(0, height - h)
        left = rng.integers(0, self.grid - w)
        rows, cols = np.meshgrid(np.arange(top, top + h), np.arange(left, left + w), indexing="ij")
        return (rows * self.grid + cols).ravel()

    def _draw(self, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
        """One draw: the target blocks (whole) and the context (its block less the targets)."""
        blocks = [
            self._block(rng, self.target_scale, self.target_aspect) for _ in range(self.targets)
        ]
        in_context = np.zeros(self.num_patches, dtype=bool)
        in_context[self._block(rng, self.context_scale, (1.0, 1.0))] = True
        for block in blocks:
            in_context[block] = False
        return blocks, in_context

    def __call__(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """{"mask": bool (T,), "targets": int64 (targets, target_count)}, drawn from ``rng``."""
        count = self.context_count
        for _ in range(self.max_redraws):
            blocks, in_context = self._draw(rng)
            if in_context.sum() >= count:
                break
        else:  # each draw falls short with probability ~context_quantile: ~0.05**100
            raise RuntimeError(
                f"multiblock mask: no context of {count} patches in {self.max_redraws} draws"
            )
        context = rng.permutation(np.flatnonzero(in_context))[:count]
        mask = np.ones(self.num_patches, dtype=bool)
        mask[context] = False
        targets = np.stack([block[: self.target_count] for block in blocks])
        return {"mask": mask, "targets": targets.astype(np.int64)}


@functools.lru_cache(maxsize=64)
def _smallest_block(grid: int, scale: tuple[float, float], aspect: tuple[float, float]) -> int:
    return min(
        h * w for h, w in (block_size(grid, scale, aspect, u) for u in np.linspace(0, 1, 1001))
    )


@functools.lru_cache(maxsize=64)
def _context_count(generator: MultiBlockMask, draws: int = 2048) -> int:
    """The context count that ``1 - context_quantile`` of draws reach, from fixed-seed
    draws: every process computes the same."""
    rng = np.random.default_rng(0)
    counts = [int(generator._draw(rng)[1].sum()) for _ in range(draws)]
    return int(np.floor(np.quantile(counts, generator.context_quantile)))


PatchMask = RandomPatchMask | MultiBlockMask

MASKS: dict[str, type[PatchMask]] = {"random": RandomPatchMask, "multiblock": MultiBlockMask}


def build_mask_generator(name: str, image_size: int, patch_size: int, ratio: float) -> PatchMask:
    """The generator ``name`` for images of ``image_size`` px cut into ``patch_size`` px
    patches; ``random`` hides ``ratio`` of them, ``multiblock`` has its own block scales
    (I-JEPA's) and no ratio."""
    if name not in MASKS:
        raise ValueError(f"unknown mask {name!r}; accepted: {', '.join(sorted(MASKS))}")
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide the image size {image_size}")
    grid = image_size // patch_size
    if name == "multiblock":
        return MultiBlockMask(grid=grid)
    return MASKS[name](grid=grid, ratio=ratio)
