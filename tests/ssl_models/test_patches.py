"""Patches and fixed 2D sin-cos positions, against MAE's reference code; ViT positions frozen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_models.backbones import build_backbone, hidden_patches, visible_patches
from ssl_models.patches import normalised_patches, patchify, sincos_2d, unpatchify


def mae_2d_sincos(embed_dim: int, grid_size: int, cls_token: bool) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed, as written there."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize(("dim", "grid", "cls"), [(192, 8, True), (64, 14, False), (16, 3, True)])
def test_sincos_matches_mae(dim, grid, cls):
    expected = torch.from_numpy(mae_2d_sincos(dim, grid, cls)).float()
    torch.testing.assert_close(sincos_2d(dim, grid, class_token=cls), expected)


def test_sincos_refuses_odd_widths():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(30, 4)


def test_vit_positions_are_fixed_sincos_and_old_checkpoints_load():
    vit = build_backbone("vit_tiny", small_image_stem=True, image_size=32)
    position = vit.model.encoder.pos_embedding
    assert not position.requires_grad
    torch.testing.assert_close(position[0], sincos_2d(192, 8, class_token=True))
    # A checkpoint from when the embedding was learned: same key and shape, loads strictly.
    state = vit.model.state_dict()
    state["encoder.pos_embedding"] = torch.randn_like(state["encoder.pos_embedding"])
    vit.model.load_state_dict(state, strict=True)
    vit(torch.randn(1, 3, 32, 32)).sum().backward()
    assert position.grad is None


def test_patchify_is_row_major_and_inverts():
    images = torch.randn(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right 4x4 block, flattened (row, column, channel).
    torch.testing.assert_close(
        patches[:, 1], images[:, :, :4, 4:].permute(0, 2, 3, 1).reshape(2, 48)
    )
    torch.testing.assert_close(unpatchify(patches, 4), images)


def test_normalised_patches_have_zero_mean_unit_variance():
    patches = normalised_patches(3 + 5 * torch.randn(2, 4, 48))
    torch.testing.assert_close(patches.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(patches.var(-1), torch.ones(2, 4), atol=1e-4, rtol=0)


def test_hidden_patches_complement_visible_patches():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    assert hidden_patches(mask).tolist() == [[0, 2], [2, 3]]
    assert visible_patches(mask).tolist() == [[1, 3], [0, 1]]
