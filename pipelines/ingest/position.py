"""Where a run is in its data: which rows of which epoch's read tasks training has consumed.

Every row the pipeline delivers carries `epoch`, `task` (its read task's index in that
epoch's plan, `sources.unit_rows`) and `pos` (its index among the task's rows, before the
task's row shuffle), and `task_rows` (the task's rows when the plan knows them, else -1).
A `DataPosition` holds, per epoch, the tasks whose rows have all been consumed (one int
each) and a bitmap for each task still partly consumed: O(read tasks), not O(images)
(a read task is thousands of images, `ImageSource.rows_per_unit`).

The checkpoint stores it (`to_state`, torch.load(weights_only=True)-safe); a restored run
plans each epoch without the consumed rows (`remaining`), so it continues the epoch where
it stopped and sees every image of it once. `coverage` and `repeats` are what
`data/epoch_coverage` and `data/repeats` log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class EpochPosition:
    """One epoch: tasks fully consumed, bitmaps of the partly consumed ones, and counts."""

    complete: set[int] = field(default_factory=set)
    partial: dict[int, np.ndarray] = field(default_factory=dict)  # task -> bool per row
    task_rows: dict[int, int] = field(default_factory=dict)  # known sizes of partial tasks
    delivered: int = 0  # distinct rows consumed
    repeats: int = 0  # rows consumed again (already consumed in this epoch)

    def add(self, task: int, positions: np.ndarray, rows: int) -> None:
        """Mark `positions` of `task` (of `rows` rows, -1 when unknown) consumed."""
        if task in self.complete:
            self.repeats += len(positions)
            return
        unique, counts = np.unique(positions, return_counts=True)
        self.repeats += int((counts - 1).sum())
        bits = self.partial.get(task)
        size = max(int(unique[-1]) + 1, rows, 0 if bits is None else len(bits))
        if bits is None or len(bits) < size:
            grown = np.zeros(size, bool)
            if bits is not None:
                grown[: len(bits)] = bits
            bits = grown
        already = bits[unique]
        self.repeats += int(already.sum())
        self.delivered += int((~already).sum())
        bits[unique] = True
        if rows > 0:
            self.task_rows[task] = rows
        known = self.task_rows.get(task, -1)
        if known > 0 and bits[:known].all():
            self.complete.add(task)
            self.partial.pop(task, None)
            self.task_rows.pop(task, None)
        else:
            self.partial[task] = bits

    def consumed(self, task: int) -> np.ndarray | None:
        """Positions of `task` already consumed (None: none; an empty array never)."""
        bits = self.partial.get(task)
        return None if bits is None else np.flatnonzero(bits)


POSITION_COLUMNS: tuple[str, ...] = ("epoch", "task", "pos", "task_rows")


def row_ids(batch: dict) -> np.ndarray:
    """(4, N) int64: the `POSITION_COLUMNS` of a batch (numpy arrays or CPU tensors)."""
    return np.stack([np.asarray(batch[c], np.int64) for c in POSITION_COLUMNS])


@dataclass
class DataPosition:
    """The data position of a run: an `EpochPosition` per epoch it has read from.

    Workers of a data-parallel run each keep the `row_ids` of the batches they consumed
    since the last checkpoint; at a checkpoint every worker records everyone's (gathered),
    so all hold the same position and rows two workers consumed count as repeats.
    """

    epochs: dict[int, EpochPosition] = field(default_factory=dict)

    def record(self, rows: np.ndarray) -> None:
        """Mark rows consumed: `rows` is (4, N) int64, the `epoch`, `task`, `pos` and
        `task_rows` columns of the batches (`row_ids`), of one worker or several."""
        epoch, task, pos, rows = np.asarray(rows, np.int64).reshape(4, -1)
        if epoch.size == 0:
            return
        groups = np.stack([epoch, task])
        order = np.lexsort(groups[::-1])
        keys, starts = np.unique(groups[:, order], axis=1, return_index=True)
        for (e, t), chunk in zip(keys.T, np.split(order, starts[1:]), strict=True):
            self.epochs.setdefault(int(e), EpochPosition()).add(
                int(t), pos[chunk], int(rows[chunk].max())
            )

    def coverage(self, epoch: int, rows_in_epoch: int) -> float:
        """Distinct rows of `epoch` consumed / rows in the epoch."""
        delivered = self.epochs.get(epoch, EpochPosition()).delivered
        return delivered / rows_in_epoch if rows_in_epoch else 0.0

    def repeats(self, epoch: int) -> int:
        return self.epochs.get(epoch, EpochPosition()).repeats

    def to_state(self) -> dict[str, list]:
        """Plain lists and tensors (what ``torch.load(weights_only=True)`` accepts)."""
        state: dict[str, list] = {"epochs": []}
        for e, ep in sorted(self.epochs.items()):
            tasks = sorted(ep.partial)
            state["epochs"].append(
                {
                    "epoch": e,
                    "complete": torch.tensor(sorted(ep.complete), dtype=torch.int64),
                    "partial_tasks": torch.tensor(tasks, dtype=torch.int64),
                    "partial_sizes": torch.tensor(
                        [len(ep.partial[t]) for t in tasks], dtype=torch.int64
                    ),
                    "partial_rows": torch.tensor(
                        [ep.task_rows.get(t, -1) for t in tasks], dtype=torch.int64
                    ),
                    "partial_bits": torch.from_numpy(
                        np.packbits(np.concatenate([ep.partial[t] for t in tasks]))
                        if tasks
                        else np.zeros(0, np.uint8)
                    ),
                    "delivered": ep.delivered,
                    "repeats": ep.repeats,
                }
            )
        return state

    @classmethod
    def from_state(cls, state: dict) -> DataPosition:
        position = cls()
        for entry in state.get("epochs", []):
            ep = EpochPosition(
                complete=set(entry["complete"].tolist()),
                delivered=int(entry["delivered"]),
                repeats=int(entry["repeats"]),
            )
            sizes = entry["partial_sizes"].tolist()
            bits = np.unpackbits(entry["partial_bits"].numpy(), count=sum(sizes)).astype(bool)
            offsets = np.cumsum([0, *sizes])
            for t, rows, start, end in zip(
                entry["partial_tasks"].tolist(),
                entry["partial_rows"].tolist(),
                offsets[:-1],
                offsets[1:],
                strict=True,
            ):
                ep.partial[t] = bits[start:end].copy()
                if rows > 0:
                    ep.task_rows[t] = rows
            position.epochs[int(entry["epoch"])] = ep
        return position

    def is_complete(self, epoch: int, task: int) -> bool:
        """Every row of `task` in `epoch` consumed."""
        return epoch in self.epochs and task in self.epochs[epoch].complete

    def consumed(self, epoch: int, task: int) -> list[int]:
        """Positions of `task` in `epoch` consumed so far (a partly consumed task)."""
        ep = self.epochs.get(epoch)
        found = None if ep is None else ep.consumed(task)
        return [] if found is None else found.tolist()
