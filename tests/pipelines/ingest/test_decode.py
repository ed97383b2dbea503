"""Every odd file becomes RGB or a stable reason; each case is a real generated file."""

from __future__ import annotations

import numpy as np
import pytest
from ingest_files import bad_files, encode, png_bomb, random_rgb
from PIL import Image

from pipelines.ingest.decode import REASONS, UndecodableImage, decode_rgb


def decode_file(tmp_path, name: str, data: bytes, **kwargs) -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(data)
    return decode_rgb(path.read_bytes(), **kwargs)


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_file_gives_its_reason(tmp_path, name):
    with pytest.raises(UndecodableImage) as err:
        decode_file(tmp_path, name, bad_files()[name])
    assert err.value.reason == name.split(".")[0]
    assert err.value.reason in REASONS


def test_missing_path_and_null_bytes(tmp_path):
    for data in (tmp_path / "nope.jpg", str(tmp_path / "nope.jpg"), None):
        with pytest.raises(UndecodableImage) as err:
            decode_rgb(data)
        assert err.value.reason == "missing"


def test_pixel_budget_is_a_parameter(tmp_path):
    with pytest.raises(UndecodableImage, match="too_many_pixels"):
        decode_file(tmp_path, "a.jpg", encode(random_rgb(64)), max_pixels=63 * 64)
    assert decode_file(tmp_path, "b.jpg", encode(random_rgb(64)), max_pixels=64 * 64).shape == (
        64,
        64,
        3,
    )
    assert len(png_bomb()) < 100  # the bomb really is tiny


def test_rgb_jpeg_and_webp(tmp_path):
    image = random_rgb(48)
    out = decode_file(tmp_path, "a.png", encode(image, "PNG"))
    assert out.dtype == np.uint8 and out.shape == (48, 48, 3)
    np.testing.assert_array_equal(out, np.asarray(image))
    assert decode_file(tmp_path, "a.webp", encode(image, "WEBP")).shape == (48, 48, 3)
    assert decode_file(tmp_path, "a.jpg", encode(image)).shape == (48, 48, 3)


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_file(tmp_path, "cmyk.jpg", encode(cmyk))
    assert out.shape == (30, 40, 3)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
    out = decode_file(tmp_path, "deep.png", encode(Image.fromarray(ramp), "PNG"))
    assert out.shape == (16, 64, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert 100 < out[8, 32, 1] < 155  # mid-ramp maps to mid-gray, not 255


def test_rgba_composites_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (255, 0, 0, 255)  # opaque red top half, transparent bottom half
    out = decode_file(tmp_path, "a.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(out[-1, -1], (255, 255, 255))


def test_grayscale_and_palette(tmp_path):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L")
    out = decode_file(tmp_path, "g.jpg", encode(gray, "PNG"))
    assert out.shape == (8, 8, 3) and (out[..., 0] == out[..., 2]).all()
    palette = random_rgb(16).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    out = decode_file(tmp_path, "p.png", encode(palette, "PNG"))
    np.testing.assert_array_equal(out, np.asarray(palette.convert("RGB")))
    palette.info["transparency"] = 0
    assert decode_file(tmp_path, "pt.png", encode(palette, "PNG", transparency=0)).shape == (
        16,
        16,
        3,
    )


def test_draft_decodes_at_reduced_dct_scale(tmp_path):
    data = encode(random_rgb(512))
    assert decode_rgb(data, target_min_side=100).shape == (128, 128, 3)  # 1/4 keeps >= 100
    assert decode_rgb(data, target_min_side=300).shape == (512, 512, 3)  # 1/2 would be < 300
    assert decode_rgb(encode(random_rgb(512), "PNG"), target_min_side=64).shape == (512, 512, 3)
