"""Image bytes fuzzed into the decoder: whatever the bytes, a row becomes its views or is
skipped with a counted reason (never an exception that fails the block), in bounded time,
and a header claiming more pixels than the budget is refused before any pixel is allocated.

The entry point is the one the pipeline's decode tasks call, `crop_batch` (decode + crop
of a batch for a recipe), and `decode_rgb` (bytes -> (H, W, 3) uint8) beside it. The
inputs: random bytes behind the magic numbers of every format PIL opens, real JPEGs and
PNGs of the committed CIFAR-10 sample truncated or with bits flipped, and headers (PNG
IHDR, JPEG SOF) claiming enormous frames (decompression bombs).
"""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.ingest.crops import crop_batch
from pipelines.ingest.decode import REASONS, UndecodableImage, decode_rgb
from pipelines.ingest.recipes import simclr

SAMPLE_DIR = Path(__file__).resolve().parents[3] / "data" / "cifar10-sample"
RECIPE = simclr(32)
# A budget the fuzzed headers can exceed cheaply: a flipped bit in a PNG or JPEG header
# can claim any frame up to 65535^2 (JPEG) or 2^62 (PNG) pixels.
MAX_PIXELS = 1 << 20
SECONDS_PER_ROW = 2.0
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_SAMPLE = pq.read_table(SAMPLE_DIR / "test.parquet", columns=["image"]).slice(0, 16)
JPEGS: list[bytes] = _SAMPLE.column("image").to_pylist()


def _png(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, format="PNG")
    return buffer.getvalue()


PNGS = [_png(j) for j in JPEGS[:4]]
# The magic numbers of the formats PIL opens (and some it sniffs): random bytes behind each
# reach that format's parser instead of stopping at "no known header".
MAGICS = [
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xc0",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"II*\x00",
    b"MM\x00*",
    b"P6\n",
    b"P5\n",
    b"\x00\x00\x01\x00",
    b"8BPS",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",
    b"DDS ",
    b"icns",
    b"\x0a\x05\x01\x08",
    b"#?RADIANCE\n",
    b"qoif",
]


def png_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR (its CRC fixed) claims width x height pixels."""
    data = bytearray(PNGS[0])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) claims width x height pixels."""
    data = bytearray(JPEGS[0])
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@st.composite
def damaged(draw, images: list[bytes]) -> bytes:
    """A real image truncated, with bits flipped, or both."""
    data = bytearray(draw(st.sampled_from(images)))
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


HUGE = st.tuples(st.integers(1, 65535), st.integers(1, 65535)).filter(
    lambda wh: wh[0] * wh[1] > MAX_PIXELS
)
IMAGE_BYTES = st.one_of(
    st.binary(max_size=512),
    st.tuples(st.sampled_from(MAGICS), st.binary(max_size=512)).map(b"".join),
    damaged(JPEGS),
    damaged(PNGS),
    HUGE.map(lambda wh: png_claiming(*wh)),
    HUGE.map(lambda wh: jpeg_claiming(*wh)),
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@pytest.fixture(scope="module")
def peak_rss():
    """The process' peak memory before and after the module's fuzzing."""
    before = _peak_rss_mb()
    yield
    grew = _peak_rss_mb() - before
    assert grew < 512, f"the fuzzed decodes raised peak memory by {grew:.0f} MB"


def test_the_real_images_decode():
    cropped = crop_batch(
        JPEGS + PNGS, (np.random.default_rng(i) for i in range(20)), RECIPE, rows=20
    )
    assert cropped.kept == list(range(20)) and not cropped.skipped


@SETTINGS
@given(datas=st.lists(IMAGE_BYTES, min_size=1, max_size=4))
def test_any_bytes_become_views_or_a_counted_reason(datas, peak_rss):
    start = time.perf_counter()
    cropped = crop_batch(
        datas,
        (np.random.default_rng(i) for i in range(len(datas))),
        RECIPE,
        rows=len(datas),
        max_pixels=MAX_PIXELS,
    )
    assert time.perf_counter() - start < SECONDS_PER_ROW * len(datas)
    assert len(cropped.kept) + sum(cropped.skipped.values()) == len(datas)
    assert set(cropped.skipped) <= set(REASONS)
    for view in cropped.views:
        assert view.shape == (len(cropped.kept), 32, 32, 3) and view.dtype == np.uint8


@SETTINGS
@given(data=IMAGE_BYTES)
def test_decode_rgb_gives_pixels_within_budget_or_a_reason(data, peak_rss):
    start = time.perf_counter()
    try:
        image = decode_rgb(data, max_pixels=MAX_PIXELS)
    except UndecodableImage as error:
        assert error.reason in REASONS
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert 0 < image.shape[0] * image.shape[1] <= MAX_PIXELS
    assert time.perf_counter() - start < SECONDS_PER_ROW


@settings(max_examples=50, deadline=None, database=None)
@given(wh=st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)))
def test_a_header_claiming_too_many_pixels_is_refused_by_reason(wh):
    """PNG (up to 2^31-1 a side) and JPEG (up to 65535) bombs, at the default budget: the
    header is refused as `too_many_pixels` before a pixel is decoded (in milliseconds)."""
    width, height = wh
    bombs = [png_claiming(width, height)]
    if width <= 65535 and height <= 65535:
        bombs.append(jpeg_claiming(width, height))
    for bomb in bombs:
        if width * height <= 100_000_000:
            continue  # within the default budget: not a bomb (the fuzz above covers those)
        start = time.perf_counter()
        cropped = crop_batch([bomb], iter([np.random.default_rng(0)]), RECIPE, rows=1)
        assert cropped.skipped == {"too_many_pixels": 1}, (wh, cropped.skipped)
        assert time.perf_counter() - start < 0.5
