"""A last good copy of Ray Train's record of a run's committed checkpoints.

Ray Train rewrites that record (``checkpoint_manager_snapshot.json`` in the run folder) in
place after every checkpoint it commits. When the disk fills during that write, the record is
left empty, and neither a restart nor a rerun could find the checkpoints that are still there
(measured: docs/RELIABILITY.md, "the checkpoint disk full"). So after each committed
checkpoint, when the record is whole, the controller copies it beside itself, replacing the
copy only once the new one is written (``KeepRecordCopy``); the driver puts the copy back
when the record does not read (``restore_record``).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs
import ray.train

RECORD = "checkpoint_manager_snapshot.json"
RECORD_COPY = RECORD + ".last-good"


class RecordUnreadable(ray.train.TrainingFailedError):
    """The record does not read and its copy cannot be put back."""


def _read_json(filesystem: pyarrow.fs.FileSystem, path: str) -> tuple[bytes, dict] | None:
    try:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
        return data, json.loads(data)
    except (OSError, ValueError):  # missing, unreadable, empty or cut short
        return None


def copy_record(run_dir: str, source: str = RECORD, target: str = RECORD_COPY) -> bool:
    """Copy the run's ``source`` record over ``target`` if it is whole JSON, writing a
    temporary file first and moving it into place; False (``target`` unchanged) otherwise."""
    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(run_dir)
        read = _read_json(filesystem, f"{root}/{source}")
        if read is None:
            return False
        temporary = f"{root}/{target}.tmp"
        with filesystem.open_output_stream(temporary) as stream:
            stream.write(read[0])
        filesystem.move(temporary, f"{root}/{target}")
    except (OSError, ValueError):  # e.g. the disk is full: the last good copy stays
        return False
    return True


def restore_record(run_dir: str) -> bool:
    """Put the last good copy back in place of the record; False when there is none or it
    cannot be written."""
    return copy_record(run_dir, RECORD_COPY, RECORD)


def committed_steps(run_dir: str) -> list[int]:
    """The steps of the committed checkpoints, read from the record, else from its copy
    (nothing written: this works on a full disk)."""
    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(run_dir)
    except (OSError, ValueError):
        return []
    for name in (RECORD, RECORD_COPY):
        read = _read_json(filesystem, f"{root}/{name}")
        if read is not None:
            results: list[dict[str, Any]] = read[1].get("checkpoint_results", [])
            return [int(r["metrics"]["step"]) for r in results if "step" in r.get("metrics", {})]
    return []


class KeepRecordCopy(ray.train.UserCallback):
    """On the Ray Train controller: after each committed checkpoint (the checkpoint manager
    has written the record by then), copy the record to ``RECORD_COPY``."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None:
            copy_record(self.run_dir)
