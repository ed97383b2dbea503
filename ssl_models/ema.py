"""Exponential-moving-average teachers and their momentum schedule."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule (Grill et al. 2020, sec. 3.2): 1 - (1 - base) (cos(pi k/K) + 1) / 2."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def linear_momentum(base: float, progress: float) -> float:
    """I-JEPA's schedule (facebookresearch/ijepa ``src/train.py`` ``momentum_scheduler``,
    ema [0.996, 1.0]): from ``base`` to 1 linearly in the fraction of training done."""
    progress = min(max(progress, 0.0), 1.0)
    return base + (1.0 - base) * progress


MOMENTUM_SCHEDULES = {"cosine": cosine_momentum, "linear": linear_momentum}


class EMATeacher(nn.Module):
    """A frozen copy of a student whose weights trail it: t <- m t + (1 - m) s.

    The schedule position is a buffer, so checkpoints carry it with the weights.
    ``schedule``: "cosine" (BYOL's, the default) or "linear" (I-JEPA's).
    """

    def __init__(self, student: nn.Module, base_momentum: float, schedule: str = "cosine") -> None:
        super().__init__()
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"base_momentum must be in [0, 1], got {base_momentum}")
        if schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(
                f"unknown momentum schedule {schedule!r}; accepted: {', '.join(MOMENTUM_SCHEDULES)}"
            )
        self.schedule = schedule
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.base_momentum = base_momentum
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))

    @property
    def momentum(self) -> float:
        return MOMENTUM_SCHEDULES[self.schedule](self.base_momentum, float(self.progress))

    @torch.no_grad()
    def update(self, student: nn.Module, progress: float) -> None:
        """Move toward the student with the momentum at ``progress`` (fraction of training)."""
        self.progress.fill_(progress)
        m = self.momentum
        for t, s in zip(self.module.parameters(), student.parameters(), strict=True):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)
        for t, s in zip(self.module.buffers(), student.buffers(), strict=True):
            t.copy_(s)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
