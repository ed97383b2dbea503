"""The objectives against transcriptions of each paper's official code and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_models import functional as F_ssl


def official_simclr_loss(h1: torch.Tensor, h2: torch.Tensor, temperature: float) -> torch.Tensor:
    """google-research/simclr objective.py ``add_contrastive_loss``, transcribed from TF."""
    large_num = 1e9
    h1, h2 = F.normalize(h1, dim=1), F.normalize(h2, dim=1)
    n = h1.shape[0]
    labels = torch.arange(n)
    masks = torch.eye(n)
    logits_aa = h1 @ h1.T / temperature - masks * large_num
    logits_bb = h2 @ h2.T / temperature - masks * large_num
    logits_ab = h1 @ h2.T / temperature
    logits_ba = h2 @ h1.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


def official_barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """facebookresearch/barlowtwins main.py ``BarlowTwins.forward`` (single GPU)."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False)
    c = bn(z1).T @ bn(z2)
    c.div_(z1.shape[0])
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = F_ssl.off_diagonal(c).pow_(2).sum()
    return on_diag + lambd * off_diag


def official_vicreg_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """facebookresearch/vicreg main_vicreg.py ``VICReg.forward`` (single GPU, default coefficients)."""
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = F_ssl.off_diagonal(cov_x).pow_(2).sum().div(num_features) + F_ssl.off_diagonal(
        cov_y
    ).pow_(2).sum().div(num_features)
    return 25.0 * repr_loss + 25.0 * std_loss + 1.0 * cov_loss


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(16, 32, generator=g)
    return z1, z1 + 0.5 * torch.randn(16, 32, generator=g)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_official_code(pair, temperature):
    # The official code sums the two anchors' mean losses; ours averages over all 2N anchors.
    expected = official_simclr_loss(*pair, temperature) / 2
    assert F_ssl.nt_xent(*pair, temperature=temperature).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


@pytest.mark.parametrize("n", [2, 8, 64])
def test_nt_xent_identical_rows_give_log_2n_minus_1(n):
    z = torch.ones(n, 16)
    assert F_ssl.nt_xent(z, z.clone()).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)


def test_barlow_twins_matches_official_code(pair):
    expected = official_barlow_twins_loss(*pair, 0.0051)
    assert F_ssl.barlow_twins(*pair).item() == pytest.approx(expected.item(), rel=1e-5)


def test_barlow_twins_constant_input_gives_d():
    z = torch.full((8, 24), 3.0)
    assert F_ssl.barlow_twins(z, z.clone()).item() == pytest.approx(24.0, rel=1e-6)


def test_vicreg_matches_official_code(pair):
    expected = official_vicreg_loss(*pair)
    assert F_ssl.vicreg(*pair).item() == pytest.approx(expected.item(), rel=1e-5)


def test_vicreg_constant_input_gives_24_75():
    z = torch.full((8, 24), -1.5)
    assert F_ssl.vicreg(z, z.clone()).item() == pytest.approx(24.75, rel=1e-6)


def test_negative_cosine_matches_simsiam_d(pair):
    p, z = pair
    expected = -F.cosine_similarity(p, z.detach(), dim=-1).mean()
    assert F_ssl.negative_cosine(p, z).item() == pytest.approx(expected.item(), rel=1e-6)
    assert F_ssl.negative_cosine(p, p.clone()).item() == pytest.approx(-1.0, rel=1e-6)


def test_info_nce_is_mocov3_ctr(pair):
    q, k = pair
    t = 0.2
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t
    expected = F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * t
    assert F_ssl.info_nce(q, k, t).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    "loss", [F_ssl.nt_xent, F_ssl.barlow_twins, F_ssl.vicreg, F_ssl.negative_cosine]
)
def test_losses_are_scalars_that_gradients_flow_through(loss, pair):
    z1, z2 = (t.clone().requires_grad_(True) for t in pair)
    value = loss(z1, z2)
    assert value.ndim == 0
    value.backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "loss", [F_ssl.nt_xent, F_ssl.barlow_twins, F_ssl.vicreg, F_ssl.negative_cosine]
)
def test_bad_input_is_refused_by_name(loss):
    good = torch.randn(4, 8)
    first, second = ("p", "z") if loss is F_ssl.negative_cosine else ("z1", "z2")
    with pytest.raises(ValueError, match=f"{second} must have the same shape"):
        loss(good, torch.randn(4, 9))
    with pytest.raises(ValueError, match=rf"{first} must have shape \(N, D\)"):
        loss(torch.randn(4), torch.randn(4))
    nan = good.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{second} contains NaN"):
        loss(good, nan)
    with pytest.raises(TypeError, match=f"{first} must be floating point"):
        loss(torch.ones(4, 8, dtype=torch.long), good)


@pytest.mark.parametrize("loss", [F_ssl.barlow_twins, F_ssl.vicreg])
def test_batch_statistics_refuse_a_single_row(loss):
    with pytest.raises(ValueError, match="batch size 1 is too small"):
        loss(torch.randn(1, 8), torch.randn(1, 8))


def test_nt_xent_refuses_bad_temperature(pair):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        F_ssl.nt_xent(*pair, temperature=0.0)
