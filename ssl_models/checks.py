"""Input checks shared by the objectives: clear errors that name the argument."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class NonFiniteInputError(ValueError):
    """An objective's input holds NaN or Inf: a diverging model, not a caller's mistake. The
    training step catches it and skips the step (``pipelines.train.step``)."""


def check_embeddings(fn: str, name: str, z: torch.Tensor) -> None:
    """z must be a finite floating (N, D) tensor."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(z).__name__}")
    if z.ndim != 2:
        raise ValueError(f"{fn}: {name} must have shape (N, D), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"{fn}: {name} must be floating point, got {z.dtype}")
    if z.shape[0] == 0:
        raise ValueError(f"{fn}: {name} is an empty batch")
    if not torch.isfinite(z).all():
        raise NonFiniteInputError(f"{fn}: {name} contains NaN or Inf")


def check_pair(
    fn: str, a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("z1", "z2")
) -> None:
    """Both embeddings valid and of the same shape."""
    check_embeddings(fn, names[0], a)
    check_embeddings(fn, names[1], b)
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: {names[0]} and {names[1]} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_min_batch(fn: str, z: torch.Tensor, minimum: int) -> None:
    """Batch statistics (variance, covariance, batch norm) need at least ``minimum`` rows."""
    if z.shape[0] < minimum:
        raise ValueError(
            f"{fn}: batch size {z.shape[0]} is too small; its batch statistics need "
            f"at least {minimum} rows (across all workers when gathered)"
        )


def check_choice(kind: str, value: str, accepted: Iterable[str]) -> None:
    """Refuse an unknown name, listing what is accepted."""
    accepted = sorted(accepted)
    if value not in accepted:
        raise ValueError(f"unknown {kind} {value!r}; accepted: {', '.join(accepted)}")
