"""Probes of representation quality on frozen features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_neighbours(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 200,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest train rows of each test row by cosine similarity: (similarities (M, k'),
    their labels (M, k')), most similar first, k' = min(k, N).

    train_features: (N, D), train_labels: (N,) int64, test_features: (M, D).
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("knn_neighbours: features must be (N, D) and (M, D)")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"knn_neighbours: {train_features.shape[0]} train features but "
            f"{train_labels.shape[0]} labels"
        )
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    similarities, labels = [], []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].float(), dim=1)
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        similarities.append(similarity)
        labels.append(train_labels[index])
    if not similarities:
        return bank.new_zeros(0, k), train_labels.new_zeros(0, k)
    return torch.cat(similarities), torch.cat(labels)


@torch.no_grad()
def merge_neighbours(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of several banks' neighbour lists (``knn_neighbours`` of each part of a
    bank split by rows), as ``knn_neighbours`` gives them for the whole bank.

    parts: [(similarities (M, k_i), labels (M, k_i))]; a part may pad its list with
    similarity -inf (never chosen ahead of a real neighbour, and its vote weighs 0).
    """
    if not parts:
        raise ValueError("merge_neighbours: no parts")
    similarities = torch.cat([similarity for similarity, _ in parts], dim=1)
    labels = torch.cat([label for _, label in parts], dim=1)
    top, index = similarities.topk(min(k, similarities.shape[1]), dim=1)
    return top, labels.gather(1, index)


def knn_vote(
    similarities: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float = 0.1
) -> torch.Tensor:
    """Wu et al. 2018, eq. 7: each neighbour votes for its class with weight exp(s / T).
    similarities, labels: (M, k) from ``knn_neighbours``. Returns predicted labels (M,)."""
    weights = (similarities / temperature).exp()
    votes = torch.zeros(similarities.shape[0], num_classes, device=similarities.device)
    votes.scatter_add_(1, labels, weights)
    return votes.argmax(dim=1)


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
    similarities, labels = knn_neighbours(
        train_features, train_labels, test_features, k, chunk_size
    )
    return knn_vote(similarities, labels, num_classes, temperature)


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


# --- linear probes on frozen features -----------------------------------------------------

# Weight decays tried on the held-out split (CLIP's linear probe sweeps its L2 penalty the
# same way, Radford et al. 2021, appendix A.3); 0 included.
WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class LinearProbeResult:
    """Test top-1 (fraction), the weight decay chosen, its held-out top-1, the labels used."""

    top1: float
    weight_decay: float
    val_top1: float
    num_train: int


def stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train index, val index): round(val_fraction * n_c) of each class c to val, at least
    one when the class has two or more rows, none when it has one. Seeded."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"stratified_split: val_fraction={val_fraction!r} not in [0, 1)")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique():
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_val = max(1, round(val_fraction * len(rows))) if len(rows) > 1 and val_fraction else 0
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices of a class-balanced ``fraction`` of the rows: round(fraction * N / C) of
    each class (at least one; all of a smaller class), drawn with ``seed``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"balanced_subset: fraction={fraction!r} not in (0, 1]")
    classes = labels.unique()
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        rows = (labels == c).nonzero().flatten()
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return tuple((x - mean) / std for x in (train, *others))


def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 300,
) -> torch.nn.Linear:
    """Multinomial logistic regression, full-batch L-BFGS to convergence (strong Wolfe
    line search), L2 penalty ``weight_decay / 2 * ||W||^2`` on the weights. x: (N, D)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(
        layer.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return layer.requires_grad_(False)


def _top1(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return (layer(x).argmax(1) == y).float().mean().item() if len(y) else float("nan")


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 300,
) -> LinearProbeResult:
    """The linear evaluation protocol on frozen features (Kolesnikov et al. 2019; CLIP's
    L-BFGS logistic regression): features standardised with train statistics, the weight
    decay chosen on a class-stratified held-out ``val_fraction`` of train, then the
    classifier refitted on all of train and scored on test.

    train_features: (N, D), train_labels: (N,) int64, test_*: (M, D), (M,).
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("linear_probe: features must be (N, D) and (M, D)")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(
            f"linear_probe: {train_features.shape[0]} train features but "
            f"{train_labels.shape[0]} labels"
        )
    if test_features.shape[0] != test_labels.shape[0]:
        raise ValueError(
            f"linear_probe: {test_features.shape[0]} test features but "
            f"{test_labels.shape[0]} labels"
        )
    if not weight_decays:
        raise ValueError("linear_probe: weight_decays is empty")
    num_classes = int(max(train_labels.max(), test_labels.max()).item()) + 1
    x = train_features.float()
    fit_index, val_index = stratified_split(train_labels, val_fraction, seed)
    best_wd, best_val = weight_decays[0], float("nan")
    if len(weight_decays) > 1 and len(val_index) > 0:
        fit_x, val_x = _standardise(x[fit_index], x[val_index])
        scores = []
        for wd in weight_decays:
            layer = fit_linear(fit_x, train_labels[fit_index], num_classes, wd, max_iter)
            scores.append(_top1(layer, val_x, train_labels[val_index]))
        # Ties go to the stronger penalty (the simpler classifier).
        best = max(range(len(scores)), key=lambda i: (scores[i], weight_decays[i]))
        best_wd, best_val = weight_decays[best], scores[best]
    train_x, test_x = _standardise(x, test_features.float())
    layer = fit_linear(train_x, train_labels, num_classes, best_wd, max_iter)
    return LinearProbeResult(_top1(layer, test_x, test_labels), best_wd, best_val, len(x))


def low_label_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    fraction: float,
    *,
    seed: int = 0,
    **probe_options: float | int | tuple[float, ...],
) -> LinearProbeResult:
    """``linear_probe`` trained on a class-balanced, seeded ``fraction`` of the train labels
    (the 1% / 10% semi-supervised splits of Chen et al. 2020, sec. 4.2, as linear probes)."""
    subset = balanced_subset(train_labels, fraction, seed)
    return linear_probe(
        train_features[subset],
        train_labels[subset],
        test_features,
        test_labels,
        seed=seed,
        **probe_options,
    )
