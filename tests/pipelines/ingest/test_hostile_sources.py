"""Hostile corpora against the readers, called directly (no Ray): tar members named to
escape the shard, symlinks out of a folder corpus, parquet files of the wrong schema, and
a read plan (a manifest's, or a path list) naming a file that is not there."""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from ingest_files import encode, random_rgb

from pipelines.ingest.crops import crop_batch
from pipelines.ingest.listing import list_directories, parquet_footers
from pipelines.ingest.recipes import simclr
from pipelines.ingest.sources import (
    ImageSource,
    _read_files,
    _read_pieces,
    _read_tar,
    check_columns,
)

JPEG = encode(random_rgb(40))


def _tar(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(JPEG)
            tar.addfile(info, io.BytesIO(JPEG))
    return path


def test_tar_members_named_to_escape_are_skipped_never_extracted(tmp_path, caplog):
    hostile = ["../../etc/x.jpg", "/abs/x.jpg", "a/../../b.jpg", "..", "ok/../../c.jpg"]
    shard = _tar(tmp_path / "shard.tar", ["s/0001.jpg", *hostile, "s/0002.jpg"])
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    source = ImageSource(str(shard), format="webdataset")
    with caplog.at_level(logging.WARNING, logger="pipelines.ingest.sources"):
        tables = list(_read_tar(source, {"file": str(shard)}))
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    assert keys == [f"{shard}#s/0001", f"{shard}#s/0002"]
    assert all(".." not in k.split("#", 1)[1] for k in keys)
    for name in hostile[:3]:
        assert any(name in r.getMessage() for r in caplog.records), name
    # Read in memory only: nothing appeared beside the shard or above it.
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.tar"]
    assert not Path("/abs/x.jpg").exists()


def _walk(fs: pafs.FileSystem, root: str) -> tuple[list[str], list[str]]:
    """`listing.walk`, with the listing task's function called here (no Ray): (files, skipped)."""
    list_dir = list_directories._function
    files, skipped = [], []
    frontier, is_roots = [(root, 0)], True
    for _ in range(50):  # a loop would not end: the bound fails the test instead
        if not frontier:
            break
        result = list_dir(fs, frontier, roots=is_roots, root_paths=(root,))
        files += result["files"].column("path").to_pylist()
        skipped += result["skipped"]
        frontier, is_roots = result["dirs"], False
    assert not frontier, "the listing did not end (a symlink loop was walked)"
    return sorted(files), skipped


def test_symlinks_out_of_a_folder_corpus_are_skipped_with_a_reason(tmp_path, caplog):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(JPEG)
    root = tmp_path / "corpus"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(JPEG)
    os.symlink(root / "cat" / "a.jpg", root / "cat" / "inside.jpg")  # stays in the corpus
    os.symlink(outside, root / "cat" / "escape.jpg")
    os.symlink("/etc/hostname", root / "cat" / "etc.jpg")
    os.symlink(root, root / "cat" / "loop")  # a directory link to an ancestor
    os.symlink(tmp_path, root / "up")
    with caplog.at_level(logging.WARNING, logger="pipelines.ingest.listing"):
        files, skipped = _walk(pafs.LocalFileSystem(), str(root))
    assert files == [str(root / "cat" / "a.jpg"), str(root / "cat" / "inside.jpg")]
    assert len(skipped) == 4
    for name in ("escape.jpg", "etc.jpg", "loop", "up"):
        assert any(name in reason for reason in skipped), name
        assert any(name in r.getMessage() for r in caplog.records), name
    assert any("points outside" in reason and "secret.jpg" in reason for reason in skipped)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"img": [b"x"], "label": [1]}), "image_column='image' is not a column of"),
        (pa.table({"image": [1, 2], "label": [1, 2]}), "image_column='image' of"),
        (pa.table({"image": ["a.jpg"], "label": [1]}), "holds string, not image bytes"),
        (pa.table({"image": [b"x"], "label": ["cat"]}), "label_column='label' of"),
    ],
    ids=["no-image-column", "int-images", "string-images", "string-labels"],
)
def test_a_parquet_file_of_the_wrong_schema_is_refused_naming_file_and_column(
    tmp_path, table, message
):
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    source = ImageSource(str(path), label_column="label")
    (footer,) = parquet_footers(pafs.LocalFileSystem(), [str(path)])
    with pytest.raises(ValueError) as error:
        check_columns(source, footer["names"], str(path), footer["types"])
    assert message in str(error.value) and str(path) in str(error.value)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"image": [JPEG], "label": [3]}), good)
    (footer,) = parquet_footers(pafs.LocalFileSystem(), [str(good)])
    check_columns(source, footer["names"], str(good), footer["types"])  # accepted


def test_a_listed_image_file_that_is_missing_is_skipped_as_missing_by_its_key(tmp_path):
    """A manifest (or path list) row naming a file gone since: the row reads as null bytes
    under the file's key, and decoding counts it as `missing`; the others decode."""
    good, gone = tmp_path / "a.jpg", tmp_path / "gone.jpg"
    good.write_bytes(JPEG)
    source = ImageSource([str(good), str(gone)], format="paths")
    (table,) = _read_files(source, {"kind": "files", "files": [str(good), str(gone)]})
    assert table.column("key").to_pylist() == [str(good), str(gone)]
    assert table.column("bytes").to_pylist() == [JPEG, None]
    rngs = (np.random.default_rng(i) for i in range(2))
    cropped = crop_batch(table.column("bytes").to_pylist(), rngs, simclr(32), rows=2)
    assert cropped.kept == [0] and cropped.skipped == {"missing": 1}


def test_a_listed_parquet_file_that_is_missing_is_refused_naming_it(tmp_path):
    gone = tmp_path / "gone.parquet"
    source = ImageSource(str(tmp_path / "x.parquet"), format="parquet")
    with pytest.raises(FileNotFoundError) as error:
        list(_read_pieces(source, [[str(gone), 0, 0, 10]]))
    assert str(gone) in str(error.value)
