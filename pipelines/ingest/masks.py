"""Masks for masked and predictive methods, drawn in the data pipeline beside the views.

A mask generator is the ``mask_generator`` of ``view_dataset`` (the ``MaskGenerator``
seam of ``pipelines.ingest.crops``): called once per decoded row with that row's
generator, after its crops, so a mask is seeded like the views, by (seed, epoch, key),
and the views are the same with or without it. It returns that row's columns
(``columns`` names them); the loop hands them to the method as ``Batch.extras``.
Generators are small frozen dataclasses: Ray pickles them into the decode tasks.

``MASKS`` maps the config's ``data.mask.name`` to a generator class, built from the
patch grid's side and the mask ratio (``build_mask_generator``).
"""

from __future__ import annotations

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


MASKS: dict[str, type[RandomPatchMask]] = {"random": RandomPatchMask}


def build_mask_generator(
    name: str, image_size: int, patch_size: int, ratio: float
) -> RandomPatchMask:
    """The generator ``name`` for images of ``image_size`` px cut into ``patch_size`` px
    patches, hiding ``ratio`` of them."""
    if name not in MASKS:
        raise ValueError(f"unknown mask {name!r}; accepted: {', '.join(sorted(MASKS))}")
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide the image size {image_size}")
    return MASKS[name](grid=image_size // patch_size, ratio=ratio)
