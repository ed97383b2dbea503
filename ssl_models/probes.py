"""Probes of representation quality on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018, eq. 7): cosine similarity, each of the k neighbours
    votes for its class with weight exp(s / T). Returns predicted labels (M,).

    train_features: (N, D), train_labels: (N,) int64, test_features: (M, D).
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("weighted_knn_predict: features must be (N, D) and (M, D)")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"weighted_knn_predict: {train_features.shape[0]} train features but "
            f"{train_labels.shape[0]} labels"
        )
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    predictions = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].float(), dim=1)
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy of ``weighted_knn_predict``, a fraction in [0, 1]."""
    num_classes = int(max(train_labels.max(), test_labels.max()).item()) + 1
    predicted = weighted_knn_predict(
        train_features, train_labels, test_features, num_classes, k, temperature
    )
    return (predicted == test_labels).float().mean().item()
