"""The training budget: steps and wall-clock time, and the learning rate over either."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.config import BUDGET_EPOCH_CAP, ConfigError, load_config
from pipelines.train.budget import TrainingBudget, lr_factor

CPU = torch.device("cpu")


def test_step_budget_ends_at_its_last_step_and_ignores_the_clock():
    budget = TrainingBudget(total_steps=10)
    budget.start(spent_seconds=1e9)
    budget.tick(CPU)
    assert not budget.done(9) and budget.done(10)
    assert budget.fraction(5) == 0.5
    assert budget.time_fraction() is None and budget.minutes_line() == ""


def test_time_budget_counts_the_time_a_resumed_run_already_spent():
    budget = TrainingBudget(total_steps=1_000_000, max_seconds=60.0)
    budget.start(spent_seconds=45.0)  # a checkpoint's Progress.train_seconds
    elapsed = budget.tick(CPU)
    assert 45.0 <= elapsed < 50.0
    assert not budget.done(100)
    assert budget.fraction(100) == pytest.approx(elapsed / 60.0)
    assert budget.minutes_line() == "0.8/1.0 min"
    budget.start(spent_seconds=60.0)
    budget.tick(CPU)
    assert budget.done(101)  # time is up whatever the step
    assert budget.fraction(101) == 1.0


def test_lr_by_steps_is_warmup_then_cosine_after_it():
    assert lr_factor(0, 10, 110, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.0) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.0) == pytest.approx(0.5)
    assert lr_factor(110, 10, 110, 0.0) == pytest.approx(0.0)
    assert lr_factor(110, 10, 110, 0.01) == pytest.approx(0.01)


def test_lr_by_time_runs_the_cosine_over_the_budget_and_ends_annealed():
    """The in-process loop of benchmarks/cifar10_quality.py: lr = warm-up x cosine(t / T)."""
    cap = 1_000_000
    assert lr_factor(4, 10, cap, 0.0, time_fraction=0.001) == pytest.approx(
        0.5 * 0.5 * (1 + math.cos(math.pi * 0.001))
    )
    assert lr_factor(500, 10, cap, 0.0, time_fraction=0.5) == pytest.approx(0.5)
    assert lr_factor(900, 10, cap, 0.0, time_fraction=1.0) == pytest.approx(0.0)
    # With both a step count and a budget, whichever is further along sets the cosine.
    assert lr_factor(60, 10, 110, 0.0, time_fraction=0.1) == pytest.approx(0.5)


def test_schedule_accepts_a_time_budget_alone_and_caps_its_steps():
    config = load_config(
        None,
        [
            "data.train.path=data/cifar10-sample/train.parquet",
            "schedule.epochs=null",
            "schedule.max_minutes=20",
        ],
    )
    assert config.schedule.max_minutes == 20
    assert config.schedule.step_cap(steps_per_epoch=7) == 7 * BUDGET_EPOCH_CAP
    with pytest.raises(ConfigError, match="schedule.max_minutes"):
        load_config(
            None,
            [
                "data.train.path=data/cifar10-sample/train.parquet",
                "schedule.epochs=null",
                "schedule.max_minutes=0",
            ],
        )
