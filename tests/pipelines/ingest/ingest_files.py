"""Generated odd image files for the ingest tests (helpers, not fixtures)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def random_rgb(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def bad_files() -> dict[str, bytes]:
    """name -> bytes of files that must be skipped, with the reason as the name's stem."""
    good = encode(random_rgb(64))
    return {
        "truncated.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "not_an_image.jpg": b"<html>404 not found</html>\n",
        "too_many_pixels.png": png_bomb(),
    }
