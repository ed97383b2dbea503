"""Manifests (`darkmatter index`) and listing in Ray tasks, on real Ray and real files: the
shards hold what the source holds, every command's read path gives the same keys and
labels from a manifest as from its source, and the driver never lists a tree itself."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from pipelines import cli
from pipelines.ingest import sources
from pipelines.ingest.dataset import view_dataset
from pipelines.ingest.listing import MARKER, WalkStats, list_directories, list_files
from pipelines.ingest.manifest import build_manifest
from pipelines.ingest.recipes import simclr
from pipelines.ingest.sources import (
    ImageSource,
    count_rows,
    epoch_tasks,
    open_manifest,
    plan_units,
    read_raw,
    unit_rows,
)

LAYOUTS = {
    "folder": dict(label_column="folder"),
    "parquet": dict(image_column="img", label_column="y"),
    "tar": dict(label_column="cls"),
}


@pytest.fixture(scope="module")
def manifests(ray_session, corpus, tmp_path_factory) -> dict[str, Path]:
    """Each layout of the corpus indexed; the folder tree in shards of 16 files."""
    root = tmp_path_factory.mktemp("manifests")
    out = {}
    for layout, options in LAYOUTS.items():
        source = ImageSource(str(corpus[layout]), **options)
        build_manifest(source, str(root / layout), shard_entries=16)
        out[layout] = root / layout
    return out


def shard_rows(manifest: Path) -> list[dict]:
    marker = json.loads((manifest / MARKER).read_text())
    return [
        row
        for shard in marker["shards"]
        for row in pq.read_table(manifest / shard["path"]).to_pylist()
    ]


def test_folder_shards_hold_every_image_sorted_with_its_folder_label(manifests, corpus):
    images = sorted(
        str(p) for p in Path(corpus["folder"]).rglob("*") if p.suffix in (".jpg", ".png")
    )
    marker = json.loads((manifests["folder"] / MARKER).read_text())
    rows = shard_rows(manifests["folder"])
    assert sorted(r["uri"] for r in rows) == images  # notes.txt is not an image
    assert marker["format"] == "folder" and marker["rows"] == marker["files"] == len(images)
    assert len(marker["shards"]) > 1 and max(s["entries"] for s in marker["shards"]) <= 16
    assert all(r["rows"] == 1 and r["row_group"] is None for r in rows)
    assert all(r["bytes"] == Path(r["uri"]).stat().st_size for r in rows)
    classes = marker["classes"]
    assert classes == sorted({Path(p).parent.name for p in images})
    assert all(classes[r["label"]] == Path(r["uri"]).parent.name for r in rows)
    for shard in marker["shards"]:  # sorted inside each shard
        uris = pq.read_table(manifests["folder"] / shard["path"]).column("uri").to_pylist()
        assert uris == sorted(uris)


def test_parquet_shards_hold_one_row_per_row_group(manifests, corpus):
    rows = shard_rows(manifests["parquet"])
    assert [(r["row_group"], r["first_row"], r["rows"]) for r in rows] == [(0, 0, 50), (1, 50, 50)]
    assert {r["uri"] for r in rows} == {str(corpus["parquet"])}
    assert all(r["label"] is None and r["bytes"] > 0 for r in rows)
    marker = json.loads((manifests["parquet"] / MARKER).read_text())
    assert marker["rows"] == 100 and marker["columns"] == ["img", "y"]
    tar = json.loads((manifests["tar"] / MARKER).read_text())
    assert tar["format"] == "webdataset" and tar["rows"] is None


def keys_and_labels(ds) -> list[tuple[str, int]]:
    rows = ds.take_all()
    return sorted((str(r["key"]), int(r["label"])) for r in rows)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_manifest_reads_the_same_keys_and_labels_as_its_source(manifests, corpus, layout):
    options = LAYOUTS[layout]
    source = ImageSource(str(corpus[layout]), **options)
    # `auto` finds the marker; the parquet image column comes from the manifest.
    manifest = ImageSource(str(manifests[layout]), label_column=options["label_column"])
    assert open_manifest(manifest) is not None
    assert keys_and_labels(read_raw(manifest)) == keys_and_labels(read_raw(source))
    if layout != "tar":  # tars are counted by reading them
        assert count_rows(manifest) == count_rows(source)
    viewed = [
        keys_and_labels(view_dataset(s, simclr(8), seed=0, keep_key=True, counter=f"m-{layout}"))
        for s in (source, manifest)
    ]
    assert viewed[0] == viewed[1] and len(viewed[0]) == corpus["n_good"]


def test_manifest_plans_the_same_units_and_epochs_in_tasks(manifests, corpus):
    """One planning group (a small manifest): the tasks Ray plans from the shards are the
    driver's `epoch_tasks` over `plan_units`, epoch by epoch, numbered the same."""
    source = ImageSource(str(corpus["folder"]), label_column="folder", rows_per_unit=10)
    manifest = ImageSource(str(manifests["folder"]), label_column="folder", rows_per_unit=10)
    _, units = plan_units(source)
    assert plan_units(manifest)[1] == units
    rows = unit_rows(manifest, epochs=2, shuffle_seed=3).take_all()
    for epoch in (0, 1):
        planned = sorted((r["task"], json.loads(r["unit"])) for r in rows if r["epoch"] == epoch)
        expected = epoch_tasks(units, 10, epoch=epoch, shuffle_seed=3)
        assert [task for _, task in planned] == expected
        assert [number for number, _ in planned] == list(range(len(expected)))


def test_planning_groups_take_every_file_once(manifests, monkeypatch):
    """A manifest bigger than a planning group: each epoch deals the shards into groups
    drawn from (seed, epoch), and the groups' tasks hold every file once."""
    monkeypatch.setattr(sources, "_PLAN_GROUP_ENTRIES", 40)
    source = ImageSource(str(manifests["folder"]), label_column="folder", rows_per_unit=8)
    manifest = open_manifest(source)
    everything = sorted(f for unit in plan_units(source)[1] for f in unit["files"])
    groups = {e: sources._shard_groups(manifest, 3, e) for e in (0, 1)}
    assert len(groups[0]) == len(groups[1]) == -(-len(everything) // 40) > 1
    assert groups[0] != groups[1]
    assert sorted(sum(groups[0], [])) == list(range(len(manifest.shards)))
    items = {"epoch": np.zeros(len(groups[0]), np.int64), "group": np.arange(len(groups[0]))}
    batches = list(
        sources._plan_rows(
            items,
            source=sources.reading_source(source),
            manifest=manifest,
            shuffle_seed=3,
            scope="corpus",
            position=None,
        )
    )
    tasks = [json.loads(u) for b in batches for u in b["unit"]]
    numbers = np.concatenate([b["task"] for b in batches])
    assert sorted(f for task in tasks for f in task["files"]) == everything
    assert len(set(numbers.tolist())) == len(tasks)
    assert len({tuple(t["row_order_seed"]) for t in tasks}) == len(tasks)


def test_listing_runs_in_tasks_one_directory_level_each(ray_session, tmp_path, monkeypatch):
    for path in ("a/b/c/deep.jpg", "a/b/mid.jpg", "a/top.jpg", "x/y.jpg"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"jpeg")
    assert isinstance(list_directories, ray.remote_function.RemoteFunction)
    level = ray.get(list_directories.remote(pafs.LocalFileSystem(), [(str(tmp_path / "a"), 0)]))
    assert level["files"].column("path").to_pylist() == [str(tmp_path / "a" / "top.jpg")]
    assert level["dirs"] == [(str(tmp_path / "a" / "b"), 0)]

    # The driver never lists recursively: a recursive selector made here fails the test.
    real = pafs.FileSelector

    def no_recursion(*args, **kwargs):
        assert not kwargs.get("recursive"), "recursive listing on the driver"
        return real(*args, **kwargs)

    monkeypatch.setattr(pafs, "FileSelector", no_recursion)
    stats = WalkStats()
    listed, missing = list_files(pafs.LocalFileSystem(), [str(tmp_path)], stats=stats)
    assert [posixpath.relpath(p, tmp_path) for p, _ in listed] == [
        "a/b/c/deep.jpg",
        "a/b/mid.jpg",
        "a/top.jpg",
        "x/y.jpg",
    ]
    # One task per directory here (the frontier is never long enough to batch).
    assert missing == [] and stats.directories == stats.tasks == 5
    _, units = plan_units(ImageSource(str(tmp_path), label_column="folder"))
    assert units[0]["labels"] == [2, 1, 0, 3]  # classes a, b, c, x


def test_index_command_and_bad_inputs(ray_session, manifests, corpus, tmp_path, capsys):
    out = tmp_path / "m"
    assert cli.main(["index", str(corpus["folder"]), "--out", str(out)]) == 0
    assert "folder manifest" in capsys.readouterr().out
    assert (out / MARKER).exists()
    # Indexing again replaces the manifest.
    assert cli.main(["index", str(corpus["folder"]), "--out", str(out), "--shard-rows", "7"]) == 0
    shards = json.loads((out / MARKER).read_text())["shards"]
    assert sum(s["entries"] for s in shards) == 100 and max(s["entries"] for s in shards) <= 7

    missing = tmp_path / "nowhere"
    assert cli.main(["index", str(missing), "--out", str(tmp_path / "m2")]) == 2
    assert f"{str(missing)!r} does not exist" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("not a manifest")
    assert cli.main(["index", str(corpus["folder"]), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert f"--out {str(taken)!r} exists and is not a darkmatter manifest" in err
    assert (taken / "keep.txt").exists()
    code = cli.main(
        ["index", str(corpus["parquet"]), "--out", str(tmp_path / "m3"), "--image-column", "q"]
    )
    assert code == 2 and "ImageSource.image_column='q' is not a column of" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "m3").exists()  # a failed index leaves nothing behind

    with pytest.raises(FileNotFoundError, match="is not a darkmatter manifest"):
        plan_units(ImageSource(str(taken), format="manifest"))
    with pytest.raises(ValueError, match="label_column='z' is not a column of every file"):
        sources.reading_source(ImageSource(str(manifests["parquet"]), label_column="z"))
