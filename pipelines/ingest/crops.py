"""The CPU half of a view: random resized crop + horizontal flip, to uint8 (S, S, 3).

Only this part needs the full image, so it runs where the bytes are decoded. The
crop boxes are drawn from the image *header* first, so that a JPEG is decoded at
the smallest DCT scale (1/2, 1/4, 1/8) that still gives every crop at least its
output resolution (`views_into`). Plain JPEGs decoded at full scale go through
torchvision's libjpeg-turbo decoder; every crop is resized by torch's antialiased
bilinear filter on uint8 (AVX2 on the CPU, Pillow-SIMD's algorithm) straight into
its row of the batch (`crop_batch`). Views are channels-last (S, S, 3), as images
are stored: the layout the filter writes fastest; the device half reads them as
(N, 3, S, S) channels_last tensors (`photometric.channels_first`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pipelines.ingest.decode import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    UndecodableImage,
    check_size,
    decode_plain_jpeg,
    load_rgb,
    open_image,
    plain_jpeg_size,
    read_bytes,
)
from pipelines.ingest.recipes import ViewRecipe, ViewSpec

_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


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
    central crop clamped to the ratio range (torchvision 0.29, transforms.py). The
    uniforms of all attempts, the offsets and the flip come from one `rng.random`
    call (a generator call costs more than the arithmetic); the offsets are
    floor(u * (n + 1)), uniform on 0..n like `randint`.
    """
    u = rng.random(2 * _ATTEMPTS + 3).tolist()
    area = width * height
    log_low, log_high = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    scale_low, scale_span = spec.scale[0], spec.scale[1] - spec.scale[0]
    box = None
    for attempt in range(_ATTEMPTS):
        target_area = area * (scale_low + scale_span * u[2 * attempt])
        aspect = math.exp(log_low + (log_high - log_low) * u[2 * attempt + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[-3] * (height - h + 1))
            left = int(u[-2] * (width - w + 1))
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
    return CropBox(*box, flip=u[-1] < spec.flip_p)


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


def as_pixels(image: np.ndarray | Image.Image) -> torch.Tensor:
    """An (H, W, 3) uint8 array or RGB PIL image as uint8 (3, H, W), in (H, W, 3) memory."""
    array = np.ascontiguousarray(image)
    if not array.flags.writeable:  # PIL's buffer: torch refuses to wrap read-only memory
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1)


# The antialiased bilinear resize that `F.interpolate(..., antialias=True)` runs, called
# with `out=`: interpolate has no `out`, and its Python checks cost more than a 32 px
# resize. On uint8 it is torch's AVX2 port of Pillow-SIMD's filter.
_resize_aa_into = torch.ops.aten._upsample_bilinear2d_aa.out


def resize_crop_into(
    pixels: torch.Tensor, box: CropBox, out: torch.Tensor, scale: float = 1.0
) -> None:
    """One view: `box` (full-size coordinates) of `pixels` (decoded at `scale`) -> `out`.

    `out` is a uint8 (S, S, 3) tensor (a row of a view batch), written in place.
    Bilinear with antialiasing on downscale: torchvision's RandomResizedCrop default.
    At a reduced decode scale the box edges snap to the nearest decoded pixel (at
    most half a pixel there; the crop still holds >= S decoded pixels). A flipped
    view mirrors the crop before the resize (the filter is symmetric: the same
    pixels up to fixed-point rounding, and a crop is smaller than its view).
    """
    left, top = box.left, box.top
    right, bottom = left + box.width, top + box.height
    if scale != 1.0:
        _, height, width = pixels.shape
        left, right = min(round(left * scale), width - 1), min(round(right * scale), width)
        top, bottom = min(round(top * scale), height - 1), min(round(bottom * scale), height)
        right, bottom = max(right, left + 1), max(bottom, top + 1)
    crop = pixels[None, :, top:bottom, left:right]
    if box.flip:
        crop = crop.flip(-1)
    target = out.permute(2, 0, 1)[None]  # (1, 3, S, S) in (S, S, 3) memory
    size = out.shape[0]
    if crop.shape[-2:] == (size, size):
        target.copy_(crop)
    else:
        _resize_aa_into(crop, [size, size], False, out=target)


def _check_image(image: np.ndarray | Image.Image) -> None:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"crop_views: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
            )
    elif image.mode != "RGB":
        raise ValueError(f"crop_views: PIL image must be RGB, got {image.mode}")


def view_buffers(recipe: ViewRecipe, rows: int) -> list[torch.Tensor]:
    """Empty uint8 (rows, S_i, S_i, 3) tensors, one per view of `recipe`."""
    return [
        torch.empty((rows, spec.size, spec.size, 3), dtype=torch.uint8) for spec in recipe.views
    ]


def crop_views(
    image: np.ndarray | Image.Image, recipe: ViewRecipe, rng: np.random.Generator
) -> list[np.ndarray]:
    """The CPU half of each view of `recipe`: a list of uint8 (S_i, S_i, 3) arrays.

    `image` is (H, W, 3) uint8 RGB (as `decode_rgb` returns) or an RGB PIL image.
    """
    _check_image(image)
    pixels = as_pixels(image)
    _, height, width = pixels.shape
    boxes = sample_crops(width, height, recipe, rng)
    outs = view_buffers(recipe, 1)
    for box, out in zip(boxes, outs, strict=True):
        resize_crop_into(pixels, box, out[0])
    return [out[0].numpy() for out in outs]


def views_into(
    data: ImageInput,
    recipe: ViewRecipe,
    rng: np.random.Generator,
    outs: list[torch.Tensor],
    row: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """Decode + crop in one pass, into row `row` of each view batch in `outs`.

    Crop boxes come from the header first, then the cheapest decode: a plain JPEG's
    size comes from its frame header; when every crop allows a reduction by >= 2,
    PIL decodes at 1/2, 1/4 or 1/8 DCT scale (`draft`), else torchvision decodes it
    at full size. Other formats, odd JPEGs and JPEGs that torchvision refuses go
    through PIL, which gives a bad file its reason. Same distribution as
    `crop_views(decode_rgb(data), ...)`; raises `UndecodableImage` (rows untouched).
    """
    raw = read_bytes(data)
    header = None
    size = plain_jpeg_size(raw)
    if size is None:
        header = open_image(raw, max_pixels=max_pixels)
        size = header.size
    else:
        check_size(*size, max_pixels=max_pixels)
    width, height = size
    boxes = sample_crops(width, height, recipe, rng)
    side = decode_side_for(width, height, boxes, recipe)
    pixels = None
    if header is None and side is None:
        try:
            pixels = decode_plain_jpeg(raw)
        except UndecodableImage:
            pass  # PIL decides: it accepts JPEGs with recoverable warnings
    if pixels is None:
        header = header or open_image(raw, max_pixels=max_pixels)
        pixels = as_pixels(load_rgb(header, target_min_side=side))
    scale = pixels.shape[2] / width
    for box, out in zip(boxes, outs, strict=True):
        resize_crop_into(pixels, box, out[row], scale)


def views_from_bytes(
    data: ImageInput,
    recipe: ViewRecipe,
    rng: np.random.Generator,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[np.ndarray]:
    """`views_into` for one image: a list of uint8 (S_i, S_i, 3) arrays."""
    outs = view_buffers(recipe, 1)
    views_into(data, recipe, rng, outs, 0, max_pixels=max_pixels)
    return [out[0].numpy() for out in outs]


# Seam for masked / predictive methods (pipelines.ingest.masks): called once per decoded
# row with that row's generator, after the crops; returns extra per-row arrays (e.g.
# {"mask": bool (T,)}) that become columns of the batch.
MaskGenerator = Callable[[np.random.Generator], dict[str, np.ndarray]]


@dataclass
class CroppedBatch:
    """`crop_batch`'s result: views of the rows that decoded, and why the others did not."""

    views: list[np.ndarray]  # per view of the recipe: uint8 (kept, S_i, S_i, 3)
    kept: list[int]  # indices of the input rows that decoded, in order
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # mask_generator's columns


def crop_batch(
    datas: Iterable[ImageInput],
    rngs: Iterable[np.random.Generator],
    recipe: ViewRecipe,
    *,
    rows: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mask_generator: MaskGenerator | None = None,
) -> CroppedBatch:
    """The CPU half of a batch of `rows` images, each view written straight into its batch.

    One uint8 (rows, S, S, 3) tensor per view is allocated up front and every decoded
    row is resized into its next free row (no per-image arrays, no stacking copy; the
    (S, S, 3) layout is the one the resize filter writes fastest). A row that fails
    is counted by reason in `skipped` and leaves no gap. `rngs` gives each row its
    generator (drawn from lazily, in step with `datas`; it may be endless, e.g.
    `itertools.repeat(rng)` for one generator shared in row order).
    """
    outs = view_buffers(recipe, rows)
    kept: list[int] = []
    skipped: Counter[str] = Counter()
    masks: dict[str, list[np.ndarray]] = {}
    for i, (data, rng) in enumerate(zip(datas, rngs, strict=False)):  # rngs may be endless
        if i >= rows:
            raise ValueError(f"crop_batch: more than rows={rows} images")
        try:
            views_into(data, recipe, rng, outs, len(kept), max_pixels=max_pixels)
        except UndecodableImage as err:
            skipped[err.reason] += 1
            continue
        if mask_generator is not None:
            for name, array in mask_generator(rng).items():
                masks.setdefault(name, []).append(array)
        kept.append(i)
    columns = {name: np.stack(arrays) for name, arrays in masks.items()}
    if mask_generator is not None and not kept:
        # Every block must carry the same columns: an empty one takes their shapes and
        # dtypes from a throwaway draw.
        columns = {
            name: np.zeros((0, *array.shape), array.dtype)
            for name, array in mask_generator(np.random.default_rng(0)).items()
        }
    return CroppedBatch(
        views=[out[: len(kept)].numpy() for out in outs],
        kept=kept,
        skipped=skipped,
        masks=columns,
    )
