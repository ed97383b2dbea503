"""Optimisers and schedule: LARS leaves norms and biases alone; warmup then cosine."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipelines.config import OptimConfig
from pipelines.train.optim import (
    LARS,
    build_optimizer,
    build_schedule,
    parameter_groups,
    scale_learning_rate,
    scaled_lr,
)


def test_lr_scales_with_global_batch():
    assert scaled_lr(OptimConfig(base_lr=0.3), 4096) == pytest.approx(4.8)
    assert scaled_lr(OptimConfig(base_lr=0.3, lr_scaling="sqrt"), 1024) == pytest.approx(0.6)
    assert scaled_lr(OptimConfig(base_lr=0.3, lr_scaling="none"), 1024) == pytest.approx(0.3)


def test_norms_and_biases_get_no_decay_or_adaptation():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    decay, no_decay = parameter_groups(model, weight_decay=0.1, lr=1.0)
    assert {p.ndim for p in decay["params"]} == {2}
    assert {p.ndim for p in no_decay["params"]} == {1}
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"]


def test_lars_scales_the_update_by_the_trust_ratio():
    weight = nn.Parameter(torch.full((3, 3), 2.0))
    bias = nn.Parameter(torch.zeros(3))
    optimizer = LARS(
        [
            {"params": [weight], "lars_exclude": False},
            {"params": [bias], "lars_exclude": True, "weight_decay": 0.0},
        ],
        lr=1.0,
        momentum=0.0,
        weight_decay=0.0,
        eta=0.01,
    )
    weight.grad = torch.full((3, 3), 100.0)
    bias.grad = torch.full((3,), 0.5)
    optimizer.step()
    # trust = eta * ||w|| / ||g|| = 0.01 * 6 / 300; update = trust * g = 0.02 per entry.
    assert torch.allclose(weight, torch.full((3, 3), 2.0 - 0.02))
    assert torch.allclose(bias, torch.full((3,), -0.5))  # excluded: plain SGD step


def test_warmup_then_cosine():
    model = nn.Linear(2, 2)
    config = OptimConfig(name="sgd", base_lr=1.0, lr_scaling="none", warmup_steps=10)
    optimizer = build_optimizer(model, config, global_batch_size=256)
    schedule = build_schedule(optimizer, config, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] < 0.001


def test_warmup_longer_than_run_is_refused():
    optimizer = build_optimizer(nn.Linear(2, 2), OptimConfig(warmup_steps=50), 256)
    with pytest.raises(
        ValueError, match=r"optim.warmup_steps \(50\) must be shorter than the run \(50 steps\)"
    ):
        build_schedule(optimizer, OptimConfig(warmup_steps=50), total_steps=50)


def test_a_restored_schedule_scaled_down_keeps_its_shape():
    """A restart after non-finite steps: the restored schedule's peak and current rate both
    take the factor; the cosine goes on from the restored step."""
    model = nn.Linear(4, 2)
    config = OptimConfig(name="sgd", base_lr=0.256, warmup_steps=2)
    optimizer = build_optimizer(model, config, 256)
    schedule = build_schedule(optimizer, config, 10)
    built = list(schedule.base_lrs)
    for _ in range(5):
        optimizer.step()
        schedule.step()
    unscaled = [g["lr"] for g in optimizer.param_groups]
    scale_learning_rate(schedule, built, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr / 2 for lr in unscaled])
    scale_learning_rate(schedule, built, 0.25)  # cumulative scales are given whole, not chained
    assert schedule.base_lrs == pytest.approx([lr / 4 for lr in built])
    optimizer.step()
    schedule.step()
    unscaled_optimizer = build_optimizer(nn.Linear(4, 2), config, 256)
    expected = build_schedule(unscaled_optimizer, config, 10)
    for _ in range(6):
        unscaled_optimizer.step()
        expected.step()
    assert schedule.get_last_lr() == pytest.approx([lr / 4 for lr in expected.get_last_lr()])
