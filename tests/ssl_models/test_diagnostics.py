"""Collapse diagnostics: values on healthy and collapsed embeddings, and refused bad input."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_models.diagnostics import (
    collapse_report,
    derange,
    effective_rank,
    embedding_std,
    energy_gap,
)
from ssl_models.methods import ViewEncoding


def gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).sum(dim=1)


def cosine_energy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - torch.nn.functional.cosine_similarity(a, b, dim=1)


@pytest.mark.parametrize("d", [8, 32, 128])
def test_embedding_std_of_gaussian_embeddings_is_one_over_sqrt_d(d):
    assert embedding_std(gaussian(4096, d)) == pytest.approx(1 / math.sqrt(d), rel=0.03)
    # The embeddings are L2-normalised first: the scale does not matter.
    assert embedding_std(100 * gaussian(4096, d)) == pytest.approx(1 / math.sqrt(d), rel=0.03)


def test_embedding_std_of_collapsed_embeddings_is_zero():
    assert embedding_std(torch.full((64, 16), 3.0)) == pytest.approx(0.0, abs=1e-6)
    # Tiny noise around one point is still collapse on the sphere.
    near_constant = torch.ones(64, 16) + 1e-4 * gaussian(64, 16)
    assert embedding_std(near_constant) < 1e-3


def test_effective_rank_of_rank_one_embeddings_is_one():
    rank_one = gaussian(256, 1, seed=1) @ gaussian(1, 32, seed=2)
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=0.01)
    assert effective_rank(torch.full((64, 16), 3.0)) == pytest.approx(1.0, abs=0.01)


def test_effective_rank_of_isotropic_gaussian_is_close_to_d():
    assert effective_rank(gaussian(4096, 32)) > 0.97 * 32


def test_effective_rank_counts_equally_used_directions():
    # k orthonormal directions used equally: all k singular values equal, entropy ln k.
    q, _ = torch.linalg.qr(gaussian(512, 4, seed=3))
    basis, _ = torch.linalg.qr(gaussian(32, 4, seed=4))
    z = q @ basis.T  # (512, 32), singular values all 1
    assert effective_rank(z) == pytest.approx(4.0, rel=1e-3)


def test_energy_gap_is_positive_for_matched_noisy_pairs():
    x = gaussian(1024, 16, seed=5)
    y = x + 0.1 * gaussian(1024, 16, seed=6)
    # Shuffled pairs are ~2D apart in squared distance, true pairs ~0.01 D.
    assert energy_gap(squared_distance, x, y) == pytest.approx(2 * 16, rel=0.1)
    assert energy_gap(cosine_energy, x, y) == pytest.approx(1.0, abs=0.1)


def test_energy_gap_is_zero_when_collapsed():
    c = torch.ones(256, 16)
    assert energy_gap(squared_distance, c, c) == pytest.approx(0.0, abs=1e-6)
    noisy = c + 1e-4 * gaussian(256, 16)
    assert abs(energy_gap(squared_distance, noisy, c)) < 1e-6


def test_energy_gap_never_keeps_a_true_pair_when_shuffling():
    x = torch.arange(5.0).unsqueeze(1)
    assert (derange(x) != x).all()


def test_energy_gap_shuffles_view_encodings_and_plain_tuples():
    x = gaussian(64, 8, seed=7)
    y = x + 0.1 * gaussian(64, 8, seed=8)

    def on_encodings(a: ViewEncoding, b: ViewEncoding) -> torch.Tensor:
        return squared_distance(a.embedding, b.embedding)

    def on_tuples(a: tuple, b: tuple) -> torch.Tensor:
        return squared_distance(a[0], b[0])

    expected = energy_gap(squared_distance, x, y)
    assert energy_gap(on_encodings, ViewEncoding(x), ViewEncoding(y)) == pytest.approx(expected)
    assert energy_gap(on_tuples, (x, None), (y, None)) == pytest.approx(expected)


def test_collapse_report_names_the_three_diagnostics():
    z = gaussian(512, 16)
    report = collapse_report(z, squared_distance(z, z + 0.1), squared_distance(z, derange(z)))
    assert set(report) == {"embedding_std", "effective_rank", "energy_gap"}
    assert report["effective_rank"] == pytest.approx(effective_rank(z))


@pytest.mark.parametrize("diagnostic", [embedding_std, effective_rank])
def test_nan_embeddings_are_refused(diagnostic):
    z = gaussian(16, 4)
    z[3, 1] = float("nan")
    with pytest.raises(ValueError, match="z contains NaN or Inf"):
        diagnostic(z)


@pytest.mark.parametrize("diagnostic", [embedding_std, effective_rank])
def test_one_row_batch_is_refused(diagnostic):
    with pytest.raises(ValueError, match="batch size 1 is too small"):
        diagnostic(gaussian(1, 4))


@pytest.mark.parametrize("diagnostic", [embedding_std, effective_rank])
def test_one_dimensional_tensor_is_refused(diagnostic):
    with pytest.raises(ValueError, match=r"z must have shape \(N, D\), got \(16,\)"):
        diagnostic(torch.randn(16))


@pytest.mark.parametrize("diagnostic", [embedding_std, effective_rank])
def test_integer_embeddings_are_refused(diagnostic):
    with pytest.raises(TypeError, match="z must be floating point"):
        diagnostic(torch.ones(8, 4, dtype=torch.long))


def test_energy_gap_refuses_a_one_row_batch():
    # With one row there is no mismatched pair; a gap of 0 would read as collapse.
    x = gaussian(1, 4)
    with pytest.raises(ValueError, match="at least 2 rows"):
        energy_gap(squared_distance, x, x)


def test_energy_gap_refuses_nan():
    x = gaussian(8, 4)
    y = x.clone()
    y[0, 0] = float("nan")
    with pytest.raises(ValueError, match="energy_gap: the energies are NaN or Inf"):
        energy_gap(squared_distance, x, y)


def test_derange_refuses_what_it_cannot_shuffle():
    with pytest.raises(TypeError, match="cannot shuffle list"):
        derange([torch.ones(2, 2)])
    with pytest.raises(ValueError, match="at least 2 rows"):
        derange(torch.tensor(1.0))
