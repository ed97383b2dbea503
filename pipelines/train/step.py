"""One optimisation step and its non-finite policy.

A step whose embeddings, loss or gradient norm are non-finite on any worker is skipped on
every worker together (their weights stay in sync), counted, and its batch-norm statistics
are put back; after ``train.max_nonfinite_in_a_row`` such steps in a row the worker stops
with ``NonFiniteLossError``, and the driver restores the last checkpoint with a lower
learning rate (``train.nonfinite_lr_factor``), or stops naming the step when no restarts
remain (``pipelines.train.driver``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipelines.train.checkpointing import Progress
from ssl_models.checks import NonFiniteInputError
from ssl_models.methods import Batch, Method, StepOutput


class NonFiniteLossError(RuntimeError):
    """Raised after too many non-finite steps in a row; the driver then restores the last
    checkpoint with a lower learning rate."""


def all_workers_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is true on every worker (so all skip a step together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


class NonFinitePolicy:
    """Counts skipped (non-finite) steps in ``progress.nonfinite_total`` (checkpointed) and
    in a row (not checkpointed: a restart begins a fresh streak); raises at ``max_in_a_row``."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0

    def record(self, finite: bool, progress: Progress) -> None:
        """Record the outcome of step ``progress.step`` (before it is counted as done)."""
        if finite:
            self.in_a_row = 0
            return
        progress.nonfinite_total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(  # the step as logged: 1-based
                f"{self.in_a_row} non-finite losses or gradients in a row at step "
                f"{progress.step + 1} ({progress.nonfinite_total} in all): stopping; the run "
                "restores the last checkpoint with a lower learning rate if restarts remain "
                "(checkpoint.max_failures, train.nonfinite_lr_factor). "
                "Lower optim.base_lr or set optim.grad_clip_norm."
            )


@dataclass
class StepResult:
    """``loss``: the step's loss, None when the step was skipped (``finite`` false);
    ``output``: the method's output (the diagnostics read its embedding), None when the
    objective refused non-finite embeddings."""

    loss: float | None
    finite: bool
    output: StepOutput | None


def train_step(
    model: Method,
    forward: Callable[[Batch], StepOutput],
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    policy: NonFinitePolicy,
    progress: Progress,
    run_fraction: float,
    grad_clip_norm: float | None = None,
) -> StepResult:
    """Forward, backward, clip, step and the EMA teacher's update, or a skip on every
    worker when the embeddings, the loss or the gradient norm are non-finite on any of them.

    ``model``: the method itself (its parameters and teacher); ``forward``: the same model as
    the loop calls it (DDP, compiled, autocast). ``progress.step``: the step being taken (the
    caller counts it done, and steps the learning-rate schedule, skipped or not);
    ``run_fraction``: how far through the run this step takes it (``TrainingBudget.fraction``),
    for the EMA teacher's momentum schedule.

    Non-finite embeddings make the objectives' input checks raise ``NonFiniteInputError``:
    the step is then skipped like a non-finite loss. The methods gather embeddings across
    workers before their objective, so every worker sees the same embeddings and raises
    together, never one worker alone inside a collective.
    """
    # A non-finite forward pass also writes non-finite batch-norm statistics: kept to put back.
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    saved = [b.detach().clone() for b in buffers]
    device = next(model.parameters()).device
    try:
        output: StepOutput | None = forward(batch)
        finite = bool(torch.isfinite(output.loss))
    except NonFiniteInputError:
        output, finite = None, False
    finite = all_workers_agree(finite, device)
    optimizer.zero_grad(set_to_none=True)
    if finite:
        output.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm or math.inf)
        finite = all_workers_agree(bool(torch.isfinite(grad_norm)), device)
    if not finite:
        optimizer.zero_grad(set_to_none=True)  # drop this worker's gradients, if any
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
        policy.record(False, progress)
        return StepResult(loss=None, finite=False, output=output)
    policy.record(True, progress)
    optimizer.step()
    model.update_teacher(run_fraction)
    return StepResult(loss=output.loss.item(), finite=True, output=output)
