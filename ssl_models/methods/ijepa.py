"""I-JEPA (Assran et al. 2023): predict the embeddings of target blocks from a context block.

The energy of an image's context x and its target blocks y is the distance between the
predictor's output and the target encoder's embeddings of y. The anti-collapse
mechanism is the EMA target encoder (plus the predictor). Faithful to
facebookresearch/ijepa ``src/train.py``: the context encoder sees only the context
patches, the target encoder (an EMA of it, momentum 0.996 -> 1.0 linearly; the
schedule's position is a buffer, so the checkpoint carries it) sees the whole image and
its output is layer-normed over the features, a narrow predictor
(``src/models/vision_transformer.py`` ``VisionTransformerPredictor``) gets the context
tokens and one mask token per target position, once per target block, and the loss is
``smooth_l1_loss`` between its output and the target blocks' embeddings.

I-JEPA's ViT has no class token; torchvision's has one, which the context encoder
carries along (it attends and is attended to) but the predictor does not see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_models.backbones import Backbone, visible_patches
from ssl_models.diagnostics import derange
from ssl_models.ema import EMATeacher
from ssl_models.methods.base import Batch, Method, StepOutput
from ssl_models.methods.masked import batch_column, one_view, vit_grid, vit_heads
from ssl_models.patches import gather_tokens
from ssl_models.predictors import MaskTokenPredictor


def block_energies(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (beta 1, ``F.smooth_l1_loss``'s) per image: (N, M, P, D) pairs -> (N,)."""
    return F.smooth_l1_loss(prediction, target, reduction="none").flatten(1).mean(dim=1)


class IJEPA(Method):
    name = "ijepa"
    anti_collapse = "EMA teacher"
    recipe = "ijepa"

    def __init__(
        self,
        backbone: Backbone,
        predictor_dim: int = 384,
        predictor_depth: int = 12,
        predictor_heads: int | None = None,
        base_momentum: float = 0.996,
    ) -> None:
        """Defaults: facebookresearch/ijepa ``configs/in1k_vith14_ep300.yaml`` (pred_emb_dim
        384, pred_depth 12, ema [0.996, 1.0]); the predictor's heads are the encoder's
        (``src/helper.py`` ``init_model``: ``num_heads=encoder.num_heads``) when None."""
        super().__init__(backbone)
        grid = vit_grid(backbone, self.name)
        dim = backbone.feature_dim
        heads = predictor_heads if predictor_heads is not None else vit_heads(backbone)
        self.predictor = MaskTokenPredictor(grid, dim, predictor_dim, predictor_depth, heads, dim)
        self.target_encoder = EMATeacher(backbone, base_momentum, schedule="linear")

    @torch.no_grad()
    def targets(self, images: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The target encoder's layer-normed embeddings of each block: (N, M, P, D)."""
        h = self.target_encoder.module.tokens(images)[:, 1:]  # no class token
        h = F.layer_norm(h, (h.shape[-1],))
        n, m, p = blocks.shape
        return gather_tokens(h, blocks.reshape(n, m * p)).reshape(n, m, p, -1)

    def forward(self, batch: Batch) -> StepOutput:
        """Views: the first; extras (``data.mask.name: multiblock``): ``mask`` (N, T) bool,
        False = in the context; ``targets`` (N, M, P) long, M blocks of P patches."""
        images = one_view(batch, self.name)
        mask = batch_column(batch, "mask", self.name, "multiblock")
        blocks = batch_column(batch, "targets", self.name, "multiblock")
        n, m, p = blocks.shape
        keep = visible_patches(mask)
        context = self.backbone.tokens(images, keep)[:, 1:]  # (N, C, D)
        # One predictor pass per target block, each with the whole context (I-JEPA repeats
        # the context per mask); image-major here: row i * M + j is image i, block j.
        prediction = self.predictor(
            context.repeat_interleave(m, dim=0),
            keep.repeat_interleave(m, dim=0),
            blocks.reshape(n * m, p),
        ).reshape(n, m, p, -1)
        target = self.targets(images, blocks)
        loss = F.smooth_l1_loss(prediction, target)
        return StepOutput(
            loss,
            context.mean(dim=1).detach(),
            terms={"prediction": loss.detach()},
            state=(prediction.detach(), target),
        )

    @torch.no_grad()
    def energy_pairs(self, output: StepOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's predictions against its own target blocks, and against another
        image's."""
        prediction, target = output.state
        return block_energies(prediction, target), block_energies(prediction, derange(target))

    def update_teacher(self, progress: float) -> None:
        self.target_encoder.update(self.backbone, progress)
