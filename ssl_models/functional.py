"""The objectives as pure functions: each returns a scalar tensor that gradients flow through.

Values follow the official code of each paper; ``tests/ssl_models/test_functional.py``
checks them against transcriptions of that code and against closed forms on collapsed input.
Cross-worker gathering is the caller's choice (see ``ssl_models.distributed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_models.checks import check_min_batch, check_pair


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened (Barlow Twins' helper)."""
    n, m = matrix.shape
    if n != m:
        raise ValueError(f"off_diagonal needs a square matrix, got shape {tuple(matrix.shape)}")
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy (Chen et al. 2020, eq. 1).

    z1, z2: (N, D) embeddings of two views; row i of z1 and row i of z2 are a positive
    pair. Each of the 2N embeddings is an anchor whose candidates are the other 2N - 1
    (one positive, 2N - 2 negatives), as in the official ``add_contrastive_loss``; the
    loss is the mean over the 2N anchors, so identical rows give ln(2N - 1).
    """
    check_pair("nt_xent", z1, z2)
    if temperature <= 0:
        raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def batch_standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm1d(affine=False) in training mode: zero mean, unit (biased) variance per dim."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def barlow_twins(
    z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 0.0051
) -> torch.Tensor:
    """Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, eq. 1-2).

    The cross-correlation of the batch-standardised embeddings (official code:
    ``bn(z1).T @ bn(z2) / N``, no extra scale) is pulled to the identity:
    sum (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2. Constant inputs give D.
    """
    check_pair("barlow_twins", z1, z2)
    check_min_batch("barlow_twins", z1, 2)
    n = z1.shape[0]
    c = batch_standardise(z1).T @ batch_standardise(z2) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


def vicreg_invariance(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between paired embeddings (VICReg's s term)."""
    return F.mse_loss(z1, z2)


def vicreg_variance(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Hinge on the per-dimension std at 1 (VICReg's v term, official code: relu(1 - std))."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1 - std).mean()


def vicreg_covariance(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal covariances over D (VICReg's c term)."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


def vicreg(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VICReg (Bardes et al. 2022, eq. 6) with the terms of the official ``main_vicreg.py``.

    sim * mse(z1, z2) + std * (v(z1) + v(z2)) / 2 + cov * (c(z1) + c(z2)).
    Identical constant inputs give std_coeff * (1 - sqrt(eps)) = 24.75 by default.
    """
    check_pair("vicreg", z1, z2)
    check_min_batch("vicreg", z1, 2)
    return (
        sim_coeff * vicreg_invariance(z1, z2)
        + std_coeff * (vicreg_variance(z1, eps) + vicreg_variance(z2, eps)) / 2
        + cov_coeff * (vicreg_covariance(z1) + vicreg_covariance(z2))
    )


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean of minus the cosine similarity (SimSiam's D, Chen & He 2021, eq. 1).

    The caller detaches ``z`` (the stop-gradient). BYOL's 2 - 2cos is 2 + 2 * this.
    """
    check_pair("negative_cosine", p, z, ("p", "z"))
    return -F.cosine_similarity(p, z, dim=-1).mean()


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """MoCo v3's contrastive loss (Chen, Xie & He 2021, Alg. 1): CE(q k^T / T) * 2T.

    q: (N, D) local queries; k: (M, D) keys (all workers' keys when gathered); the positive
    of query i is key ``offset + i`` (offset = rank * N under DDP).
    """
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(
            f"info_nce: q and k must be (N, D) and (M, D), got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    targets = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, targets) * (2 * temperature)
