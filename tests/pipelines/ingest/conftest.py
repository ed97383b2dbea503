"""Real files for the ingest tests: odd images, and the sample in every source layout."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# The helpers module sits beside this file; the suite runs with --import-mode=importlib,
# which does not put test folders on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_files import bad_files  # noqa: E402

# Dummy credentials for the local moto S3 server. Set at collection, before the
# session's `ray.init`, because Ray workers inherit the driver's environment then.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


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
