"""Collapse diagnostics: is the embedding still using its dimensions, and does energy separate pairs?"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

from ssl_models.checks import check_embeddings, check_min_batch

T = TypeVar("T")


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the batch std of L2-normalised embeddings.

    About 1/sqrt(D) for embeddings spread over the sphere, 0 when collapsed
    (SimSiam, Chen & He 2021, sec. 4.1 and fig. 2).
    """
    check_embeddings("embedding_std", "z", z)
    check_min_batch("embedding_std", z, 2)
    return F.normalize(z.float(), dim=1).std(dim=0).mean().item()


@torch.no_grad()
def effective_rank(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, eq. 1): exp of the entropy of the normalised singular values.

    1 for a rank-one (collapsed) embedding, up to min(N, D) when all directions are used.
    """
    check_embeddings("effective_rank", "z", z)
    check_min_batch("effective_rank", z, 2)
    s = torch.linalg.svdvals(z.float())
    p = s / (s.sum() + eps) + eps
    return torch.exp(-(p * p.log()).sum()).item()


def derange(x: T) -> T:
    """Shift rows by one, so no row keeps its partner (works on tensors and tuples of them)."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 0 or x.shape[0] < 2:
            raise ValueError(
                f"derange: needs a batch of at least 2 rows to mismatch, got shape {tuple(x.shape)}"
            )
        return torch.roll(x, shifts=1, dims=0)
    if isinstance(x, tuple):
        parts = [derange(t) if t is not None else None for t in x]
        # A NamedTuple (ViewEncoding) takes its fields positionally; a plain tuple takes one iterable.
        return type(x)(*parts) if hasattr(x, "_fields") else tuple(parts)  # type: ignore[return-value]
    raise TypeError(f"derange: cannot shuffle {type(x).__name__}")


@torch.no_grad()
def energy_gap(energy: Callable[[T, T], torch.Tensor], a: T, b: T) -> float:
    """Mean energy of mismatched pairs minus mean energy of true pairs.

    Positive when the energy tells compatible pairs from incompatible ones; <= 0 means
    the energy surface is flat: collapse (LeCun 2022, sec. 4.4).
    """
    gap = (energy(a, derange(b)).mean() - energy(a, b).mean()).item()
    if not math.isfinite(gap):
        raise ValueError("energy_gap: the energies are NaN or Inf (check the inputs for NaN)")
    return gap


def collapse_report(
    z: torch.Tensor, energy_true: torch.Tensor, energy_mismatched: torch.Tensor
) -> dict[str, float]:
    """The three diagnostics of one step, named as they are logged: z (N, D) embeddings,
    the (N,) energies of true pairs and of mismatched ones (gap = their mean difference)."""
    gap = (energy_mismatched.float().mean() - energy_true.float().mean()).item()
    if not math.isfinite(gap):
        raise ValueError("energy_gap: the energies are NaN or Inf (check the inputs for NaN)")
    return {
        "embedding_std": embedding_std(z),
        "effective_rank": effective_rank(z),
        "energy_gap": gap,
    }
