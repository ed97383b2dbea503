"""The corpus shuffle (`sources.epoch_tasks`) on real Ray and real files: a class-per-folder
tree (and the same images class-sorted in parquet and in tars) read in batches that mix
the classes, every image once per epoch, a new order each epoch, views unchanged."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from pipelines.ingest.dataset import view_dataset
from pipelines.ingest.recipes import simclr
from pipelines.ingest.sources import ImageSource, epoch_tasks, plan_units, read_raw_rows

CLASSES, PER_CLASS, UNIT = 10, 40, 64


@pytest.fixture(scope="module")
def sorted_corpus(tmp_path_factory, sample_dir: Path) -> dict[str, Path]:
    """10 classes x 40 sample images, sorted by class: a folder tree `<class>/<i>.jpg`, one
    parquet file (row groups of 20) and 16 tars of 25 images."""
    table = pq.read_table(sample_dir / "train.parquet", columns=["image", "label", "class"])
    labels = np.asarray(table.column("label"))
    rows = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(CLASSES)])
    table = table.take(rows)
    images, names = table.column("image").to_pylist(), table.column("class").to_pylist()
    root = tmp_path_factory.mktemp("sorted")
    for i, (data, name) in enumerate(zip(images, names, strict=True)):
        (root / "folder" / name).mkdir(parents=True, exist_ok=True)
        (root / "folder" / name / f"{i:04d}.jpg").write_bytes(data)
    parquet = root / "sorted.parquet"
    pq.write_table(table.select(["image", "label"]), parquet, row_group_size=20)
    (root / "tars").mkdir()
    for shard in range(16):
        with tarfile.open(root / "tars" / f"shard-{shard:02d}.tar", "w") as tar:
            for i in range(shard * 25, shard * 25 + 25):
                for ext, payload in (("jpg", images[i]), ("cls", str(labels[rows[i]]).encode())):
                    info = tarfile.TarInfo(f"{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return {"folder": root / "folder", "parquet": parquet, "tar": root / "tars"}


SOURCES = {
    "folder": dict(label_column="folder"),
    "parquet": dict(label_column="label"),
    "tar": dict(label_column="cls"),
}


def source_of(corpus: dict[str, Path], layout: str) -> ImageSource:
    return ImageSource(str(corpus[layout]), rows_per_unit=UNIT, **SOURCES[layout])


@pytest.fixture
def preserve_order(ray_session):
    """Ray Data's output in plan order (tasks otherwise finish in any order)."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    yield
    options.preserve_order = before


def keys_by_epoch(source: ImageSource, seed: int | None, epochs: int = 2) -> dict[int, list]:
    rows = read_raw_rows(source, epochs=epochs, shuffle_seed=seed).take_all()
    return {e: [r["key"] for r in rows if r["epoch"] == e] for e in range(epochs)}


def expected_classes(batch: int) -> float:
    """Mean classes in `batch` images drawn at random from 10 classes x 40 images."""
    total = CLASSES * PER_CLASS
    return CLASSES * (1 - math.comb(total - PER_CLASS, batch) / math.comb(total, batch))


def test_plan_takes_every_file_once_from_across_the_corpus(sorted_corpus):
    source = source_of(sorted_corpus, "folder")
    _, units = plan_units(source)
    plan = {
        (seed, epoch): epoch_tasks(units, UNIT, epoch=epoch, shuffle_seed=seed)
        for seed in (3, 4)
        for epoch in (0, 1)
    }
    everything = sorted(f for unit in units for f in unit["files"])
    for tasks in plan.values():
        assert sorted(f for task in tasks for f in task["files"]) == everything
        assert all(task["rows"] <= UNIT for task in tasks) and len(tasks) == len(units)
        # Each task draws from across the corpus: most classes, where a unit holds 1-3.
        assert min(len(set(task["labels"])) for task in tasks) >= 8
    assert max(len(set(unit["labels"])) for unit in units) <= 3
    assert plan[3, 0] == epoch_tasks(units, UNIT, epoch=0, shuffle_seed=3)
    assert plan[3, 0] != plan[3, 1] and plan[3, 0] != plan[4, 0]
    assert epoch_tasks(units, UNIT, epoch=0, shuffle_seed=None) == units
    with pytest.raises(ValueError, match="scope='rows'"):
        epoch_tasks(units, UNIT, epoch=0, shuffle_seed=3, scope="rows")


@pytest.mark.parametrize("layout", list(SOURCES))
def test_every_key_once_per_epoch_new_order_each_epoch_same_for_same_seed(
    sorted_corpus, preserve_order, layout
):
    source = source_of(sorted_corpus, layout)
    plain = keys_by_epoch(source, None, epochs=1)[0]
    assert len(plain) == len(set(plain)) == CLASSES * PER_CLASS
    first, again, other = (keys_by_epoch(source, seed) for seed in (3, 3, 4))
    for order in (first, other):
        assert all(sorted(keys) == sorted(plain) for keys in order.values())
    assert first == again
    assert first[0] != first[1] and first[0] != other[0] and first[0] != plain


def class_counts_per_batch(source: ImageSource, shuffle: str, batch: int) -> list[int]:
    ds = view_dataset(source, simclr(8), seed=0, shuffle=shuffle, counter=f"shuffle-{shuffle}")
    return [
        len(np.unique(b["label"].numpy()))
        for b in ds.iterator().iter_torch_batches(batch_size=batch, drop_last=True)
    ]


def test_batches_mix_classes_like_random_sampling(ray_session, sorted_corpus):
    """Batches of 32 from a sorted class-per-folder tree: as many classes as random
    sampling (9.7), with no local shuffle buffer; read units alone give about 2."""
    source = source_of(sorted_corpus, "folder")
    mixed = class_counts_per_batch(source, "corpus", 32)
    units = class_counts_per_batch(source, "units", 32)
    assert len(mixed) == len(units) == CLASSES * PER_CLASS // 32
    assert np.mean(mixed) >= 0.9 * expected_classes(32)
    assert np.mean(units) <= 3.5


def views_by_key(source: ImageSource, shuffle: str | None) -> dict[tuple[str, int], list]:
    ds = view_dataset(source, simclr(16), seed=5, epochs=2, shuffle=shuffle, keep_key=True)
    out = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, key in enumerate(batch["key"]):
            out[str(key), int(batch["epoch"][i])] = [batch["view_0"][i], batch["view_1"][i]]
    return out


def test_views_depend_on_seed_epoch_key_not_on_the_order(ray_session, sorted_corpus):
    source = source_of(sorted_corpus, "folder")
    mixed, units, plain = (views_by_key(source, s) for s in ("corpus", "units", None))
    assert len(mixed) == 2 * CLASSES * PER_CLASS
    assert mixed.keys() == units.keys() == plain.keys()
    for key, views in mixed.items():
        for other in (units[key], plain[key]):
            assert all(np.array_equal(a, b) for a, b in zip(views, other, strict=True))
    key = next(iter(mixed))[0]
    assert not np.array_equal(mixed[key, 0][0], mixed[key, 1][0])  # new views each epoch
