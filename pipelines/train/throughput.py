"""The logging window: mean loss, images per second and the share of time spent waiting
for data, over the steps since the last log line."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class ThroughputWindow:
    """Steps since the last ``reset``. ``batch_size`` is the global batch (all workers)."""

    batch_size: int
    loss_sum: float = 0.0
    finite_steps: int = 0
    steps: int = 0
    data_wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, adding the time spent waiting for each one to ``data_wait``."""
        iterator = iter(batches)
        while True:
            waited_since = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - waited_since
            yield batch

    def add(self, loss: float | None) -> None:
        """One step done; ``loss`` None for a skipped (non-finite) step."""
        self.steps += 1
        if loss is not None:
            self.loss_sum += loss
            self.finite_steps += 1

    def metrics(self, now: float | None = None) -> dict[str, float]:
        """``loss`` (mean over finite steps), ``img_per_s`` and ``data_wait_share``."""
        elapsed = (time.perf_counter() if now is None else now) - self.start
        return {
            "loss": self.loss_sum / max(1, self.finite_steps),
            "img_per_s": self.steps * self.batch_size / elapsed,
            "data_wait_share": self.data_wait / elapsed,
        }

    def reset(self, now: float | None = None) -> None:
        """Start a new window (in place: ``timed`` keeps adding to this object)."""
        self.loss_sum, self.finite_steps, self.steps, self.data_wait = 0.0, 0, 0, 0.0
        self.start = time.perf_counter() if now is None else now
