"""Real files for the ingest tests: odd images, and the sample in every source layout."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

# Dummy credentials for the local moto S3 server. Set at collection, before the
# session's `ray.init`, because Ray workers inherit the driver's environment then.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


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


@pytest.fixture(scope="session")
def sample_table(sample_dir: Path) -> pa.Table:
    return pq.read_table(sample_dir / "train.parquet").slice(0, 96)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, sample_table: pa.Table) -> dict[str, object]:
    """The first 96 sample images as a folder tree, a parquet file, a tar and a path list,
    each with the bad files mixed in among the good ones."""
    root = tmp_path_factory.mktemp("corpus")
    images = sample_table.column("image").to_pylist()
    labels = sample_table.column("label").to_pylist()
    bad = bad_files()

    folder = root / "folder"
    for i, (data, label) in enumerate(zip(images, labels, strict=True)):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        (folder / f"class{label}" / f"{i:04d}.jpg").write_bytes(data)
    for name, data in bad.items():
        (folder / "class0" / name).write_bytes(data)
    (folder / "notes.txt").write_text("not listed: not an image extension")

    mixed_images = images[:40] + list(bad.values()) + images[40:]
    mixed_labels = labels[:40] + [0] * len(bad) + labels[40:]
    parquet = root / "mixed.parquet"
    pq.write_table(
        pa.table({"img": pa.array(mixed_images, pa.binary()), "y": mixed_labels}),
        parquet,
        row_group_size=50,
    )

    tar_path = root / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, (data, label) in enumerate(zip(mixed_images, mixed_labels, strict=True)):
            for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s/{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    paths = sorted(str(p) for p in (folder / "class1").glob("*.jpg"))
    paths.append(str(folder / "class1" / "missing.jpg"))
    return {
        "folder": folder,
        "parquet": parquet,
        "tar": tar_path,
        "paths": paths,
        "n_good": len(images),
        "bad_reasons": {Path(name).stem: 1 for name in bad},
    }
