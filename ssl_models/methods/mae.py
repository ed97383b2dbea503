"""MAE (He et al. 2022): reconstruct the hidden patches from the visible ones.

The energy of an image x and its hidden patches y is the reconstruction error of y
from x: MAE is a denoising auto-encoder, a contrastive energy-based model in the
energy-based view (the corrupted inputs, here the masked images, are the points whose
energy the training pushes toward the clean ones'). Nothing can collapse: the targets
are pixels. Faithful to facebookresearch/mae ``models_mae.py``: the encoder sees only
the visible patches (``Backbone.tokens(images, keep)``), a lightweight decoder
(``MaskTokenPredictor``) sees them plus a mask token at every hidden position, the loss
is the mean squared error of per-patch normalised pixels on the hidden patches only.
"""

from __future__ import annotations

import torch

from ssl_models.backbones import Backbone, hidden_patches, visible_patches
from ssl_models.diagnostics import derange
from ssl_models.methods.base import Batch, Method, StepOutput
from ssl_models.methods.masked import batch_column, one_view, patch_errors, pixel_targets, vit_grid
from ssl_models.patches import gather_tokens
from ssl_models.predictors import MaskTokenPredictor


class MAE(Method):
    name = "mae"
    anti_collapse = "denoising"
    recipe = "mae"

    def __init__(
        self,
        backbone: Backbone,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
    ) -> None:
        """Defaults: facebookresearch/mae ``models_mae.py`` ``mae_vit_*_dec512d8b`` (decoder
        512 wide, 8 blocks, 16 heads) and README's pretraining command (``--norm_pix_loss``)."""
        super().__init__(backbone)
        grid = vit_grid(backbone, self.name)
        self.patch_size = backbone.patch_size
        pixels = self.patch_size * self.patch_size * 3
        self.decoder = MaskTokenPredictor(
            grid, backbone.feature_dim, decoder_dim, decoder_depth, decoder_heads, pixels
        )
        self.norm_pix_loss = norm_pix_loss

    def forward(self, batch: Batch) -> StepOutput:
        """Views: the first; extras: ``mask`` (N, T) bool, True = hidden (the same count
        per row, ``data.mask.name: random``)."""
        images = one_view(batch, self.name)
        mask = batch_column(batch, "mask", self.name, "random")
        keep, hidden = visible_patches(mask), hidden_patches(mask)
        tokens = self.backbone.tokens(images, keep)  # (N, 1 + K, D), class token first
        prediction = self.decoder(tokens[:, 1:], keep, hidden, extra=tokens[:, :1])
        target = gather_tokens(pixel_targets(images, self.patch_size, self.norm_pix_loss), hidden)
        # Every row hides as many patches: the mean over rows and patches is MAE's
        # (loss * mask).sum() / mask.sum().
        loss = patch_errors(prediction, target).mean()
        return StepOutput(
            loss,
            tokens[:, 0].detach(),
            terms={"reconstruction": loss.detach()},
            state=(prediction.detach(), target),
        )

    @torch.no_grad()
    def energy_pairs(self, output: StepOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's reconstruction error against its own hidden patches, and against
        another image's (at that image's hidden positions)."""
        prediction, target = output.state
        true = patch_errors(prediction, target).mean(dim=1)
        return true, patch_errors(prediction, derange(target)).mean(dim=1)
