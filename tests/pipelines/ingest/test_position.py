"""The data position: what a run has consumed, and a read plan that leaves it out."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.ingest.manifest import build_manifest
from pipelines.ingest.position import POSITION_COLUMNS, DataPosition, row_ids
from pipelines.ingest.sources import ImageSource, read_raw_rows

REPO = Path(__file__).resolve().parents[3]
TRAIN = REPO / "data" / "cifar10-sample" / "train.parquet"


def ids(epoch, task, pos, rows):
    return np.array([epoch, task, pos, rows], np.int64).reshape(4, -1)


def test_a_task_all_of_whose_rows_are_consumed_is_held_as_one_number():
    position = DataPosition()
    position.record(ids([0] * 3, [7] * 3, [0, 2, 1], [4] * 3))
    assert not position.is_complete(0, 7)
    assert position.consumed(0, 7) == [0, 1, 2]
    position.record(ids([0], [7], [3], [4]))
    assert position.is_complete(0, 7)
    assert position.consumed(0, 7) == []
    assert position.epochs[0].partial == {}
    assert position.coverage(0, rows_in_epoch=8) == 0.5


def test_rows_consumed_twice_are_repeats_not_coverage():
    position = DataPosition()
    position.record(ids([1, 1, 1], [0, 0, 0], [5, 5, 6], [-1, -1, -1]))  # size unknown
    position.record(ids([1], [0], [6], [-1]))
    assert position.epochs[1].delivered == 2
    assert position.repeats(1) == 2
    assert position.coverage(1, rows_in_epoch=4) == 0.5
    assert position.repeats(0) == 0


def test_the_position_survives_a_weights_only_checkpoint(tmp_path):
    position = DataPosition()
    rng = np.random.default_rng(0)
    position.record(ids([0] * 100, rng.integers(0, 5, 100), rng.integers(0, 50, 100), [50] * 100))
    position.record(ids([0] * 10, [9] * 10, np.arange(10), [10] * 10))  # one complete task
    torch.save(position.to_state(), tmp_path / "p.pt")
    restored = DataPosition.from_state(torch.load(tmp_path / "p.pt", weights_only=True))
    assert restored.is_complete(0, 9)
    for task in range(5):
        assert restored.consumed(0, task) == position.consumed(0, task)
    assert restored.epochs[0].delivered == position.epochs[0].delivered
    assert restored.repeats(0) == position.repeats(0)


def test_a_restored_plan_reads_exactly_the_rows_not_yet_consumed(ray_session):
    """Consume part of a shuffled epoch (one task whole, others in part), re-plan from that
    position: the rest of the epoch comes out, each row once, nothing consumed again."""
    source = ImageSource(str(TRAIN), rows_per_unit=500)
    first = read_raw_rows(source, epochs=2, shuffle_seed=5).take_all()
    assert len({(r["epoch"], r["key"]) for r in first}) == len(first) == 4000
    assert {r["task"] for r in first} == {0, 1, 2, 3}
    rng = np.random.default_rng(1)
    taken = [r for r in first if r["epoch"] == 0 and (r["task"] == 2 or rng.random() < 0.3)]
    position = DataPosition()
    position.record(row_ids({c: np.array([r[c] for r in taken]) for c in POSITION_COLUMNS}))
    assert position.is_complete(0, 2)

    rest = read_raw_rows(source, epochs=2, shuffle_seed=5, position=position).take_all()
    seen = Counter((r["epoch"], r["key"]) for r in taken + rest)
    assert set(seen.values()) == {1}
    assert len(seen) == 4000  # every row of both epochs, once
    assert all(r["task"] != 2 for r in rest if r["epoch"] == 0)
    # Rows keep their data position: the same (epoch, task, pos) names the same image.
    where = {(r["epoch"], r["task"], r["pos"]): r["key"] for r in first}
    assert all(where[(r["epoch"], r["task"], r["pos"])] == r["key"] for r in rest)


def test_a_fully_consumed_position_is_refused_alike_from_a_folder_and_a_manifest(
    ray_session, tmp_path
):
    """Nothing left to read: the same error whether the plan comes from the files or from
    a manifest (planned in Ray tasks, so checked on the driver from the marker's rows)."""
    source = ImageSource(str(TRAIN), rows_per_unit=500)
    everything = read_raw_rows(source, epochs=1, shuffle_seed=5).take_all()
    position = DataPosition()
    position.record(row_ids({c: np.array([r[c] for r in everything]) for c in POSITION_COLUMNS}))
    build_manifest(source, str(tmp_path / "manifest"))
    manifest = ImageSource(str(tmp_path / "manifest"), format="manifest")
    for planned in (source, manifest):
        with pytest.raises(ValueError, match="nothing left to read in 1 epoch"):
            read_raw_rows(planned, epochs=1, shuffle_seed=5, position=position)
