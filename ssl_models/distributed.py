"""Gathering embeddings across DDP workers, so negatives and batch statistics are global;
the kNN monitor over a bank and queries split across workers."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from ssl_models.probes import knn_accuracy, knn_neighbours, knn_vote, merge_neighbours

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


@torch.no_grad()
def sharded_knn_accuracy(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """``probes.knn_accuracy`` of a bank and a query set that are split by rows across the
    workers of the process group (each worker passes its own shards); every worker gets the
    same value. Without a process group, or with one worker: ``knn_accuracy``, no collective.

    Each worker scores every query (all-gathered) against its bank shard and keeps its k
    nearest (``knn_neighbours``); an all-to-all hands each worker every shard's lists for its
    own queries, merged (``merge_neighbours``) and voted (``knn_vote``) as the whole bank's
    would be; the correct counts are summed. No worker ever holds the whole bank, and the
    lists exchanged are (queries x k) per worker whatever the bank's size.

    bank_features: (N_i, D), bank_labels: (N_i,) int64, query_features: (M_i, D),
    query_labels: (M_i,) int64 on this worker. Empty query set or bank: NaN.
    """
    if not is_distributed():
        if len(bank_labels) == 0 or len(query_labels) == 0:
            return float("nan")
        return knn_accuracy(
            bank_features, bank_labels, query_features, query_labels, k, temperature
        )
    # NCCL moves CUDA tensors only; gloo, CPU ones.
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    world, me = dist.get_world_size(), dist.get_rank()
    top_label = max(
        int(bank_labels.max()) if len(bank_labels) else -1,
        int(query_labels.max()) if len(query_labels) else -1,
    )
    dim = max(query_features.shape[-1], bank_features.shape[-1])  # 0 for empty shards
    shapes = gather_no_grad(
        torch.tensor([[len(query_labels), len(bank_labels), top_label, dim]], device=device)
    )  # (world, 4): queries, bank rows, largest label, feature width of each worker
    queries_per_worker, bank_rows = shapes[:, 0].tolist(), shapes[:, 1].tolist()
    if sum(queries_per_worker) == 0 or sum(bank_rows) == 0:
        return float("nan")
    num_classes, dim = int(shapes[:, 2].max()) + 1, int(shapes[:, 3].max())
    # Every worker's queries, each block padded to the longest (padding rows are scored and
    # dropped), so that the collectives move equal shapes.
    rows = max(queries_per_worker)
    width = min(k, max(bank_rows))
    padded = torch.zeros(rows, dim, device=device)
    padded[: len(query_labels)] = query_features.to(device, torch.float32)
    all_queries = gather_no_grad(padded)  # (world * rows, D)
    lists = (
        torch.full((world * rows, width), float("-inf"), device=device),
        torch.zeros(world * rows, width, dtype=torch.int64, device=device),
    )
    if len(bank_labels):
        similarity, label = knn_neighbours(
            bank_features.to(device), bank_labels.to(device), all_queries, k
        )
        lists[0][:, : similarity.shape[1]] = similarity
        lists[1][:, : label.shape[1]] = label
    # Block s of the rows goes to worker s; block r of what arrives is worker r's lists.
    received = [torch.empty_like(part) for part in lists]
    for out, part in zip(received, lists, strict=True):
        dist.all_to_all_single(out, part)
    mine = queries_per_worker[me]
    parts = [
        (received[0][r * rows : r * rows + mine], received[1][r * rows : r * rows + mine])
        for r in range(world)
    ]
    predicted = knn_vote(*merge_neighbours(parts, k), num_classes, temperature)
    correct = (predicted == query_labels.to(device)).sum()
    counts = torch.stack([correct.double(), torch.tensor(float(mine), device=device)])
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()
