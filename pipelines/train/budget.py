"""How far through its length a run is, in steps and, with ``schedule.max_minutes``, in
wall-clock time; the learning-rate schedule and the EMA teacher read it.

A wall-clock budget ("20 minutes on this laptop", "8 hours on this cluster") ends the
run when the training time is spent, and the cosine schedule runs over that time rather
than over a step count, so a run of any budget ends annealed (as the in-process loop of
``benchmarks/cifar10_quality.py`` did). Training time counts from the first batch a
worker receives (Ray's start-up, read planning and the data pipeline's first blocks are
not counted); a resumed run continues from the time its checkpoint recorded
(``Progress.train_seconds``).

Workers must agree on when the run ends and on the learning rate, or their collectives
would wait on each other: each step, the workers' clocks are reduced to their maximum
(one scalar ``all_reduce``), so every rank sees the same elapsed time.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist


class TrainingBudget:
    """A run's length: ``total_steps`` (always; a cap when the budget is time) and,
    optionally, ``max_seconds`` of training time. ``start`` sets the clock going (with the
    time a resumed run has spent), ``tick`` reads it once per step."""

    def __init__(self, total_steps: int, max_seconds: float | None = None) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r} must be >= 1")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds={max_seconds!r} must be > 0")
        self.total_steps = total_steps
        self.max_seconds = max_seconds
        self.start()

    def start(self, spent_seconds: float = 0.0) -> None:
        """Start (or restart) the clock with ``spent_seconds`` already behind the run."""
        self._started = time.monotonic() - spent_seconds
        self.elapsed = spent_seconds

    @property
    def timed(self) -> bool:
        return self.max_seconds is not None

    def tick(self, device: torch.device) -> float:
        """Read the clock (the maximum over workers when timed): the training seconds spent."""
        elapsed = time.monotonic() - self._started
        if self.timed and dist.is_available() and dist.is_initialized():
            value = torch.tensor([elapsed], dtype=torch.float64, device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            elapsed = float(value.item())
        self.elapsed = elapsed
        return elapsed

    def fraction(self, step: int) -> float:
        """How far through the run, in [0, 1]: steps done out of ``total_steps``, or the
        training time out of ``max_seconds`` when that is further along."""
        return min(1.0, max(step / self.total_steps, self.time_fraction() or 0.0))

    def time_fraction(self) -> float | None:
        """Training time spent / the budget (None without a time budget)."""
        return None if self.max_seconds is None else self.elapsed / self.max_seconds

    def remaining(self) -> float:
        """Seconds of the time budget left (0 when spent or without one)."""
        return max(0.0, (self.max_seconds or 0.0) - self.elapsed)

    def done(self, step: int) -> bool:
        """The run's last step has been taken (the same answer on every worker after ``tick``)."""
        return step >= self.total_steps or (
            self.timed and self.elapsed >= self.max_seconds  # type: ignore[operator]
        )

    def minutes_line(self) -> str:
        """``3.2/20.0 min`` for the progress line (empty without a time budget)."""
        if not self.timed:
            return ""
        return f"{self.elapsed / 60:.1f}/{self.max_seconds / 60:.1f} min"  # type: ignore[operator]


def lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    time_fraction: float | None = None,
) -> float:
    """The learning rate's multiplier at ``step``: a linear warm-up over ``warmup_steps``
    (Goyal et al. 2017) times a cosine (Loshchilov & Hutter 2017) from 1 to ``min_lr_ratio``
    over the run. By steps the cosine runs over the steps after the warm-up; with a time
    budget (``time_fraction``: training time spent / budget) over the whole budget, as the
    in-process loop of ``benchmarks/cifar10_quality.py`` does; with both, whichever is
    further along."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    by_steps = max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    progress = min(1.0, max(by_steps, time_fraction or 0.0))
    return warm * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
