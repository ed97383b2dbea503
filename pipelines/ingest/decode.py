"""Bytes -> RGB pixels, or a short reason why not.

Every odd file a real corpus holds either becomes an (H, W, 3) uint8 RGB array or
raises `UndecodableImage` with a stable one-word `reason`, so that the pipeline can
drop the row and count it instead of failing the block.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

try:
    # torchvision's libjpeg-turbo decoder, as the op its `decode_jpeg` wraps: the wrapper's
    # checks and its deprecation warning (torchvision 0.29 deprecates its codecs for
    # TorchCodec's) cost a large share of a 32 px decode (docs/INGEST.md).
    from torchvision.io import ImageReadMode

    _decode_jpeg_op = torch.ops.image.decode_jpeg
    _RGB = ImageReadMode.RGB.value
except (ImportError, AttributeError, RuntimeError):  # no image codecs: PIL decodes
    _decode_jpeg_op = None

# 100 Mpx (10k x 10k) is far beyond any pretraining image; larger
# headers are decompression bombs (a 40-byte PNG can claim 10^10 pixels).
DEFAULT_MAX_PIXELS = 100_000_000

# Short, stable tokens: they become metric names and keys of `skipped_by_reason`.
REASONS = (
    "missing",  # the path does not exist or could not be read
    "empty",  # zero bytes
    "not_an_image",  # no known image header (text, html error page, ...)
    "too_many_pixels",  # header claims more than max_pixels: decompression bomb
    "truncated",  # the header parses but the pixel data ends early or is corrupt
    "unsupported",  # a real image in a mode or codec we cannot turn into RGB
)


class UndecodableImage(Exception):
    """Raised when bytes cannot become an RGB image; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


ImageInput = bytes | bytearray | memoryview | str | os.PathLike | None


def read_bytes(data: ImageInput) -> bytes:
    """The file's bytes; a path is read, None (a read that failed upstream) is `missing`."""
    if data is None:
        raise UndecodableImage("missing", "no bytes (the file could not be read)")
    if isinstance(data, str | os.PathLike):
        try:
            return Path(data).read_bytes()
        except OSError as err:
            raise UndecodableImage("missing", f"{os.fspath(data)}: {err.strerror}") from None
    return bytes(data)


def open_image(data: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only (no pixel decoding) and check the pixel budget.

    `data` is the file's bytes, or a local path. The returned image is lazy: call
    `draft` and `convert`/`load` on it, or hand it to `decode_pil`.
    """
    raw = read_bytes(data)
    if not raw:
        raise UndecodableImage("empty")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x its own limit raises) on bombs; we apply our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as err:
        raise UndecodableImage("too_many_pixels", str(err)) from None
    except UnidentifiedImageError:
        raise UndecodableImage("not_an_image", f"{len(raw)} bytes, no known header") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UndecodableImage("truncated", str(err)) from None
    check_size(*image.size, max_pixels=max_pixels)
    return image


def check_size(width: int, height: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse an empty frame or one above the pixel budget (a decompression bomb)."""
    if width <= 0 or height <= 0:
        raise UndecodableImage("truncated", f"size {width}x{height}")
    if width * height > max_pixels:
        raise UndecodableImage("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")


# Frame headers of the JPEGs libjpeg-turbo decodes through torchvision: baseline,
# extended and progressive Huffman. Lossless, arithmetic or hierarchical ones go to PIL.
_FAST_SOF = frozenset((0xC0, 0xC1, 0xC2))
_OTHER_SOF = frozenset((0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def plain_jpeg_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) of an 8-bit, 3-component JPEG, read from its frame header.

    None for anything else (other formats, CMYK or grayscale JPEGs, odd frames,
    a header that does not parse): those take the PIL path, which names what is
    wrong with a bad file. Far cheaper than PIL's `Image.open` (docs/INGEST.md).
    """
    if raw[:2] != b"\xff\xd8":
        return None
    i, end = 2, len(raw)
    while i + 4 <= end:
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            i += 2
            continue
        if marker in _FAST_SOF:
            if i + 10 > end:
                return None
            precision, components = raw[i + 4], raw[i + 9]
            height = int.from_bytes(raw[i + 5 : i + 7], "big")
            width = int.from_bytes(raw[i + 7 : i + 9], "big")
            if precision != 8 or components != 3:
                return None
            return width, height
        if marker in _OTHER_SOF or marker in (0xD9, 0xDA):  # other frame, EOI, SOS
            return None
        i += 2 + int.from_bytes(raw[i + 2 : i + 4], "big")
    return None


def decode_plain_jpeg(raw: bytes) -> torch.Tensor:
    """A JPEG that `plain_jpeg_size` accepts -> uint8 (3, H, W), in (H, W, 3) memory.

    torchvision's libjpeg-turbo decoder: faster than PIL on small images, where
    PIL's per-image set-up dominates (docs/INGEST.md). Raises `UndecodableImage` ("truncated", or
    "unsupported" where torchvision has no decoder).
    """
    if _decode_jpeg_op is None:
        raise UndecodableImage("unsupported", "torchvision's decode_jpeg is not available")
    try:
        # No EXIF rotation, as the PIL path. PIL is the fallback the day the op goes.
        return _decode_jpeg_op(torch.frombuffer(bytearray(raw), dtype=torch.uint8), _RGB, False)
    except RuntimeError as err:
        raise UndecodableImage("truncated", str(err).splitlines()[-1]) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Every mode to RGB: CMYK/YCbCr/L/1 convert; alpha composites on white; 16-bit scales."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: PIL's convert("L") clips instead of scaling.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if mode == "F":
        gray = np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise UndecodableImage("unsupported", f"mode {mode}: {err}") from None


def _draft_size(size: tuple[int, int], target_min_side: int) -> tuple[int, int]:
    """The smallest size PIL's `draft` may reduce to that keeps min side >= target."""
    width, height = size
    scale = target_min_side / min(width, height)
    return max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale)))


def load_rgb(image: Image.Image, *, target_min_side: int | None = None) -> Image.Image:
    """Decode the pixels of an image from `open_image` and convert it to RGB.

    With `target_min_side`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
    DCT scaling, via PIL `Image.draft`) as long as its shorter side stays >=
    `target_min_side`; other formats are decoded at full size.
    """
    if target_min_side is not None and image.format == "JPEG":
        if min(image.size) >= 2 * target_min_side:
            # draft only works in the JPEG's own colour space family; CMYK stays CMYK.
            draft_mode = "RGB" if image.mode in ("RGB", "YCbCr") else image.mode
            image.draft(draft_mode, _draft_size(image.size, target_min_side))
    try:
        image.load()
    except Image.DecompressionBombError as err:
        raise UndecodableImage("too_many_pixels", str(err)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise UndecodableImage("truncated", str(err)) from None
    return _to_rgb(image)


def decode_pil(
    data: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_min_side: int | None = None,
) -> Image.Image:
    """`open_image` + `load_rgb`: bytes (or a local path) to an RGB PIL image."""
    image = open_image(data, max_pixels=max_pixels)
    return load_rgb(image, target_min_side=target_min_side)


def decode_rgb(
    data: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_min_side: int | None = None,
) -> np.ndarray:
    """Decode image bytes (or a local path) to an (H, W, 3) uint8 RGB array.

    Raises `UndecodableImage` with `.reason` in `REASONS`. See `load_rgb` for
    `target_min_side` (reduced-DCT JPEG decoding).
    """
    image = decode_pil(data, max_pixels=max_pixels, target_min_side=target_min_side)
    return np.asarray(image, dtype=np.uint8)
