"""Shared by the benchmarks: the CIFAR-10 parquet files, or a clear exit when absent."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

CIFAR_DIR = Path("/work/shared/data/cifar10")


def cifar_train_files() -> list[Path]:
    files = sorted(CIFAR_DIR.glob("train-*.parquet"))
    if not files:
        sys.exit(f"benchmark needs CIFAR-10 as parquet in {CIFAR_DIR} (train-*.parquet); not found")
    return files


def cifar_jpegs(n: int) -> list[bytes]:
    """The first n training JPEGs (32 x 32), as stored."""
    table = pq.read_table(cifar_train_files()[0], columns=["image"]).slice(0, n)
    return table.column("image").to_pylist()


def upscaled_jpegs(images: list[bytes], side: int = 256, quality: int = 90) -> list[bytes]:
    """The same images as side x side JPEGs (bicubic), for 224 px work."""
    out = []
    for data in images:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize(
            (side, side), Image.Resampling.BICUBIC
        ).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out
