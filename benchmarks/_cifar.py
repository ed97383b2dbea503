"""Shared by the benchmarks: the CIFAR-10 parquet files, or a clear exit when absent."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

# The full CIFAR-10 as parquet shards (train-*.parquet, test-*.parquet), in a folder beside
# the repository's own: ../shared/data/cifar10 from its root. `--data` names another one.
CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=CIFAR_DIR,
        help=f"folder of CIFAR-10 parquet shards (default: {CIFAR_DIR})",
    )


def cifar_files(pattern: str, data_dir: Path = CIFAR_DIR) -> list[Path]:
    """The shards of ``data_dir`` matching ``pattern``; exits with a clear message if none."""
    files = sorted(Path(data_dir).glob(pattern))
    if not files:
        sys.exit(
            f"benchmark needs CIFAR-10 as parquet in {data_dir} ({pattern}); not found "
            "(give the folder with --data); nothing measured"
        )
    return files


def cifar_train_files(data_dir: Path = CIFAR_DIR) -> list[Path]:
    return cifar_files("train-*.parquet", data_dir)


def cifar_jpegs(n: int, data_dir: Path = CIFAR_DIR) -> list[bytes]:
    """The first n training JPEGs (32 x 32), as stored."""
    table = pq.read_table(cifar_train_files(data_dir)[0], columns=["image"]).slice(0, n)
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
