"""The CPU half of a view: random resized crop + horizontal flip, to uint8 (3, S, S).

Only this part needs the full image, so it runs where the bytes are decoded. The
crop boxes are drawn from the image *header* first, so that a JPEG is decoded at
the smallest DCT scale (1/2, 1/4, 1/8) that still gives every crop at least its
output resolution (`views_from_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.ingest.decode import DEFAULT_MAX_PIXELS, ImageInput, load_rgb, open_image
from pipelines.ingest.recipes import ViewRecipe, ViewSpec


@dataclass(frozen=True)
class CropBox:
    """A crop in pixel coordinates of the full-size image, and whether to mirror it."""

    left: int
    top: int
    width: int
    height: int
    flip: bool


def sample_crop(width: int, height: int, spec: ViewSpec, rng: np.random.Generator) -> CropBox:
    """torchvision `RandomResizedCrop.get_params`, drawn from `rng`, then the flip coin.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio), 10 attempts, then the
    central crop clamped to the ratio range (torchvision 0.29, transforms.py).
    """
    area = width * height
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (left, top, w, h)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < spec.ratio[0]:
            w, h = width, int(round(width / spec.ratio[0]))
        elif in_ratio > spec.ratio[1]:
            w, h = int(round(height * spec.ratio[1])), height
        else:
            w, h = width, height
        box = ((width - w) // 2, (height - h) // 2, w, h)
    flip = bool(rng.random() < spec.flip_p)
    return CropBox(*box, flip=flip)


def sample_crops(
    width: int, height: int, recipe: ViewRecipe, rng: np.random.Generator
) -> list[CropBox]:
    """One crop per view of `recipe`, in view order."""
    return [sample_crop(width, height, spec, rng) for spec in recipe.views]


def decode_side_for(
    width: int, height: int, boxes: list[CropBox], recipe: ViewRecipe
) -> int | None:
    """The smallest decoded short side that keeps every crop >= its output size.

    None when no reduction by 2 or more is possible (decode at full size).
    """
    reduction = min(
        min(box.width, box.height) / spec.size
        for box, spec in zip(boxes, recipe.views, strict=True)
    )
    if reduction < 2:
        return None
    return math.ceil(min(width, height) / reduction)


def _resize_crop(image: Image.Image, box: CropBox, size: int, scale: float) -> np.ndarray:
    pil_box = (
        box.left * scale,
        box.top * scale,
        (box.left + box.width) * scale,
        (box.top + box.height) * scale,
    )
    # Bilinear with antialiasing on downscale: torchvision's RandomResizedCrop default.
    resized = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=pil_box))
    if box.flip:
        resized = resized[:, ::-1]
    return resized.transpose(2, 0, 1)


def crop_views(
    image: np.ndarray | Image.Image, recipe: ViewRecipe, rng: np.random.Generator
) -> list[np.ndarray]:
    """The CPU half of each view of `recipe`: a list of uint8 (3, S_i, S_i) arrays.

    `image` is (H, W, 3) uint8 RGB (as `decode_rgb` returns) or an RGB PIL image.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"crop_views: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
            )
        image = Image.fromarray(image, "RGB")
    width, height = image.size
    boxes = sample_crops(width, height, recipe, rng)
    return [
        _resize_crop(image, box, spec.size, 1.0)
        for box, spec in zip(boxes, recipe.views, strict=True)
    ]


def views_from_bytes(
    data: ImageInput,
    recipe: ViewRecipe,
    rng: np.random.Generator,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[np.ndarray]:
    """Decode + crop in one pass: boxes from the header, then a reduced-DCT decode.

    Same distribution as `crop_views(decode_rgb(data), ...)`; raises `UndecodableImage`.
    """
    header = open_image(data, max_pixels=max_pixels)
    width, height = header.size
    boxes = sample_crops(width, height, recipe, rng)
    image = load_rgb(header, target_min_side=decode_side_for(width, height, boxes, recipe))
    scale = image.size[0] / width
    return [
        _resize_crop(image, box, spec.size, scale)
        for box, spec in zip(boxes, recipe.views, strict=True)
    ]
