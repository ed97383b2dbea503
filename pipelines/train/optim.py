"""Optimisers and the learning-rate schedule: SGD, AdamW, LARS; linear warmup + cosine."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipelines.config import OptimConfig
from pipelines.train.budget import lr_factor


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017), as used by SimCLR, BYOL and
    Barlow Twins for large batches: each parameter's update is scaled by
    eta * ||w|| / ||g + wd w||, eta = 0.001 as in google-research/simclr
    ``lars_optimizer.py`` (EETA_DEFAULT) and facebookresearch/barlowtwins ``main.py``. Groups with ``lars_exclude=True`` (norms, biases) get
    neither adaptation nor weight decay (Grill et al. 2020, appendix C.1).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ):
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "weight_decay": weight_decay,
                "eta": eta,
                "lars_exclude": False,
            },
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0),
                        group["eta"] * w_norm / u_norm,
                        torch.ones_like(w_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def scaled_lr(config: OptimConfig, global_batch_size: int) -> float:
    """Goyal et al. 2017 linear scaling (lr = base * B / 256), or the square-root rule."""
    ratio = global_batch_size / 256
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[config.lr_scaling]
    return config.base_lr * factor


def parameter_groups(
    model: nn.Module, weight_decay: float, lr: float, bias_lr_ratio: float = 1.0
) -> list[dict]:
    """Norm layers and biases (1-D parameters) get no weight decay and no LARS adaptation,
    and ``bias_lr_ratio`` times the weights' learning rate (Barlow Twins: 0.0048 / 0.2)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False, "lr": lr},
        {
            "params": no_decay,
            "weight_decay": 0.0,
            "lars_exclude": True,
            "lr": lr * bias_lr_ratio,
        },
    ]


def build_optimizer(
    model: nn.Module, config: OptimConfig, global_batch_size: int
) -> torch.optim.Optimizer:
    lr = scaled_lr(config, global_batch_size)
    ratio = config.bias_lr_ratio
    if ratio is None:  # the method's published ratio (1 unless its authors' code differs)
        ratio = getattr(model, "bias_lr_ratio", 1.0)
    groups = parameter_groups(model, config.weight_decay, lr, ratio)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=config.betas)
    return LARS(groups, lr=lr, momentum=config.momentum, eta=config.lars_eta)


def build_schedule(
    optimizer: torch.optim.Optimizer,
    config: OptimConfig,
    total_steps: int,
    time_fraction: Callable[[], float | None] | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup from ~0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio``
    (Loshchilov & Hutter 2017) over the steps, or over the time budget when
    ``time_fraction`` gives one (``pipelines.train.budget``)."""
    config.check_warmup(total_steps)

    def factor(step: int) -> float:
        fraction = time_fraction() if time_fraction is not None else None
        return lr_factor(step, config.warmup_steps, total_steps, config.min_lr_ratio, fraction)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scale_learning_rate(
    schedule: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float], scale: float
) -> None:
    """The schedule's peak learning rates set to ``base_lrs`` (as built, before a checkpoint
    restored its own) times ``scale``, and the optimiser's current rates in proportion."""
    scaled = [lr * scale for lr in base_lrs]
    groups = schedule.optimizer.param_groups
    for group, new, old in zip(groups, scaled, schedule.base_lrs, strict=True):
        group["lr"] *= new / old
    schedule.base_lrs = scaled
    schedule._last_lr = [group["lr"] for group in groups]
