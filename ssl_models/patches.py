"""Patches of an image: pixels per patch, fixed 2D sin-cos positions, gathers by index.

The patch order everywhere is the row-major grid that ``Backbone.tokens`` and the data
pipeline's masks use (``pipelines/ingest/masks.py``).
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): sines then cosines of positions / 10000^(2i/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding: dim {dim} must be even")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int, class_token: bool = False) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings of a grid x grid patch grid: (grid**2, dim),
    or (1 + grid**2, dim) with a zero row first for the class token.

    MAE's ``get_2d_sincos_pos_embed`` (facebookresearch/mae ``util/pos_embed.py``, also
    I-JEPA's ``src/models/vision_transformer.py``): half the dimensions encode one grid
    coordinate, half the other; the class token's position is zeros. Same values (in
    float64, returned as float32), same layout: the first half encodes the column.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding: dim {dim} must be a multiple of 4")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    embedding = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if class_token:
        embedding = torch.cat([torch.zeros(1, dim, dtype=embedding.dtype), embedding])
    return embedding.float()


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, p * p * C), patches in row-major grid order, each flattened
    (p, p, C) as MAE's ``patchify`` (facebookresearch/mae ``models_mae.py``)."""
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: patch size {p} does not divide the image ({h} x {w})")
    x = images.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """The inverse of ``patchify`` for square images: (N, T, p * p * C) -> (N, C, H, W)."""
    n, t, _ = patches.shape
    side = int(round(t**0.5))
    p = patch_size
    x = patches.reshape(n, side, side, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, side * p, side * p)


def normalised_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch standardised over its own pixels: MAE's ``norm_pix_loss`` target
    ((x - mean) / sqrt(var + 1e-6), unbiased var as ``torch.var``)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, T, D), index (N, K) long -> (N, K, D): row i's tokens ``index[i]``
    (I-JEPA's ``apply_masks`` for one mask, facebookresearch/ijepa ``src/masks/utils.py``)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
