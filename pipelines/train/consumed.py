"""A worker's share of the data position: the rows it trained on, gathered at checkpoints.

Each batch's `epoch`, `task`, `pos`, `task_rows` columns (`pipelines.ingest.position`) are
kept as they come (on the batch's device: no copy or sync per step); `sync` gathers every
worker's since the last sync and records them all into the run's `DataPosition`, so that
every worker (and rank 0's checkpoint) holds the same position.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pipelines.ingest.position import POSITION_COLUMNS, DataPosition


class ConsumedRows:
    """The rows this worker has consumed since the last `sync`, and the run's position."""

    def __init__(self, position: DataPosition) -> None:
        self.position = position
        self._pending: list[torch.Tensor] = []

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Keep one batch's position columns ((4, N) int64, on the batch's device)."""
        self._pending.append(torch.stack([batch[c].long() for c in POSITION_COLUMNS]))

    def sync(self) -> DataPosition:
        """Record every worker's rows since the last sync (a collective: call on all ranks)."""
        mine = (
            torch.cat(self._pending, dim=1).cpu().numpy()
            if self._pending
            else np.zeros((4, 0), np.int64)
        )
        self._pending.clear()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[np.ndarray | None] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        for rows in everyone:
            self.position.record(rows)
        return self.position
