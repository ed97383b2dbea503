"""kNN and linear probes on tiny labeled sets whose answer is known."""

from __future__ import annotations

import pytest
import torch

from ssl_models.probes import (
    balanced_subset,
    knn_accuracy,
    linear_probe,
    low_label_probe,
    stratified_split,
    weighted_knn_predict,
)

NUM_CLASSES = 10


def clustered(n: int, dim: int = 32, noise: float = 0.3, seed: int = 0):
    """Features around one random direction per class: linearly separable classes."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(n) % NUM_CLASSES
    features = centres[labels] + noise * torch.randn(n, dim, generator=generator)
    return features, labels


def shuffled(labels: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_knn_separable_features_are_perfect():
    train_x, train_y = clustered(1000)
    test_x, test_y = clustered(500, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y) == 1.0


def test_knn_shuffled_labels_give_chance():
    # Unclustered features: with 10 clusters, shuffled labels would still vote by cluster.
    train_x, train_y = clustered(2000, noise=10.0)
    test_x, test_y = clustered(2000, noise=10.0, seed=1)
    accuracy = knn_accuracy(train_x, shuffled(train_y), test_x, test_y)
    assert abs(accuracy - 1 / NUM_CLASSES) < 0.05


def test_knn_votes_are_weighted_by_similarity():
    # One near neighbour of class 1 outweighs two far ones of class 0 at T=0.1.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.2]])
    assert weighted_knn_predict(bank, labels, query, 2, k=3).tolist() == [1]


def test_linear_probe_separable_features_are_perfect():
    train_x, train_y = clustered(600)
    test_x, test_y = clustered(300, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y)
    assert result.top1 == 1.0
    assert result.val_top1 == 1.0
    assert result.num_train == 600


def test_linear_probe_shuffled_labels_give_chance():
    train_x, train_y = clustered(2000, noise=10.0)
    test_x, test_y = clustered(2000, noise=10.0, seed=1)
    result = linear_probe(train_x, shuffled(train_y), test_x, test_y)
    assert abs(result.top1 - 1 / NUM_CLASSES) < 0.05


def test_linear_probe_needs_a_linear_boundary_not_neighbours():
    # Classes split by the sign of one coordinate, buried in 20 noise dimensions: a linear
    # classifier finds it, so the probe must clearly beat kNN here.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(800, 21, generator=generator)
    y = (x[:, 0] > 0).long()
    result = linear_probe(x[:600], y[:600], x[600:], y[600:])
    assert result.top1 >= 0.95
    assert result.top1 > knn_accuracy(x[:600], y[:600], x[600:], y[600:]) + 0.1


def test_linear_probe_picks_the_weight_decay_on_held_out_rows():
    train_x, train_y = clustered(300)
    test_x, test_y = clustered(100, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, weight_decays=(1e-4, 1e-2))
    assert result.weight_decay in (1e-4, 1e-2)
    single = linear_probe(train_x, train_y, test_x, test_y, weight_decays=(1e-3,))
    assert single.weight_decay == 1e-3


def test_linear_probe_names_mismatched_inputs():
    x, y = clustered(50)
    with pytest.raises(ValueError, match="50 train features but 49 labels"):
        linear_probe(x, y[:49], x, y)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        linear_probe(x[:, 0], y, x, y)


def test_balanced_subset_is_balanced_and_seeded():
    labels = torch.arange(2000) % NUM_CLASSES
    subset = balanced_subset(labels, 0.01, seed=3)
    assert len(subset) == 20
    assert torch.bincount(labels[subset], minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES
    assert torch.equal(subset, balanced_subset(labels, 0.01, seed=3))
    assert not torch.equal(subset, balanced_subset(labels, 0.01, seed=4))
    assert len(balanced_subset(labels, 0.1)) == 200
    with pytest.raises(ValueError, match="fraction=0"):
        balanced_subset(labels, 0)


def test_stratified_split_is_a_partition():
    labels = torch.arange(100) % NUM_CLASSES
    fit, val = stratified_split(labels, 0.2)
    assert sorted(fit.tolist() + val.tolist()) == list(range(100))
    assert torch.bincount(labels[val], minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES


def test_low_label_probe_trains_on_the_fraction():
    train_x, train_y = clustered(2000)
    test_x, test_y = clustered(300, seed=1)
    result = low_label_probe(train_x, train_y, test_x, test_y, 0.01)
    assert result.num_train == 20
    assert result.top1 == 1.0
