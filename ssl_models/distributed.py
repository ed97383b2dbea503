"""Gathering embeddings across DDP workers, so negatives and batch statistics are global."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

# torch 2.14 flags torch.distributed.nn's all_gather as deprecated in favour of a private
# module; it remains the public autograd-aware all-gather, so we keep it, quietly.
warnings.filterwarnings(
    "ignore", message="torch.distributed.nn.functional.all_gather is deprecated"
)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """All workers' rows, concatenated in rank order, with gradients flowing back.

    ``torch.distributed.nn``'s all-gather sums the gradient over workers in backward;
    as every worker computes the same global loss, DDP's averaging then gives exactly
    the single-process gradient on the concatenated batch (tested with 2 gloo processes).
    """
    if not is_distributed():
        return z
    return torch.cat(dist_nn.all_gather(z.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(z: torch.Tensor) -> torch.Tensor:
    """All workers' rows, for targets that carry no gradient (MoCo's momentum keys)."""
    if not is_distributed():
        return z
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.contiguous())
    return torch.cat(parts, dim=0)


def gather_pair(
    z1: torch.Tensor, z2: torch.Tensor, enabled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views' embeddings over the global batch (with gradients) when ``enabled``."""
    if not enabled:
        return z1, z2
    return gather_with_grad(z1), gather_with_grad(z2)
