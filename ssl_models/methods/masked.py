"""What the masked and predictive methods share: a ViT backbone's patch grid, the mask
the data pipeline drew for the batch, and MAE's pixel targets."""

from __future__ import annotations

import torch

from ssl_models.backbones import VIT_SIZES, Backbone, is_vit
from ssl_models.methods.base import Batch
from ssl_models.patches import normalised_patches, patchify


def vit_grid(backbone: Backbone, method: str) -> int:
    """Patches per image side of a ViT backbone; any other backbone is refused."""
    if not is_vit(backbone) or backbone.num_patches is None:
        raise ValueError(
            f"{method}: needs a ViT backbone ({', '.join(sorted(VIT_SIZES))}), got {backbone.name}"
        )
    return round(backbone.num_patches**0.5)


def vit_heads(backbone: Backbone) -> int:
    """Attention heads of a ViT backbone's blocks."""
    return backbone.model.encoder.layers[0].num_heads


def batch_column(batch: Batch, column: str, method: str, mask_name: str) -> torch.Tensor:
    """``batch.extras[column]``, or an error that says which ``data.mask`` draws it."""
    if column not in batch.extras:
        raise ValueError(
            f"{method}: the batch has no {column!r} column; set data.mask.name: {mask_name} "
            f"in the config (pipelines/ingest/masks.py draws it with the views)"
        )
    return batch.extras[column]


def one_view(batch: Batch, method: str) -> torch.Tensor:
    """The first view: masked methods encode one view of each image."""
    if not batch.views:
        raise ValueError(f"{method}: needs a view, got none")
    return batch.views[0]


def pixel_targets(images: torch.Tensor, patch_size: int, normalise: bool) -> torch.Tensor:
    """(N, 3, H, W) -> (N, T, p * p * 3) pixels per patch, each standardised over its
    own pixels when ``normalise`` (MAE ``forward_loss`` with ``norm_pix_loss``)."""
    patches = patchify(images, patch_size)
    return normalised_patches(patches) if normalise else patches


def patch_errors(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch: (..., P) pairs -> (...) (MAE ``loss.mean(dim=-1)``)."""
    return (prediction - target).pow(2).mean(dim=-1)
