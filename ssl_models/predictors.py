"""The narrow transformer that fills in hidden patches from visible ones: MAE's decoder
and I-JEPA's predictor are the same module (embed the encoder's tokens, add fixed
position embeddings, append one learned mask token per queried position, a few
transformer blocks, a norm, a projection; read the queried tokens).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock

from ssl_models.patches import gather_tokens, sincos_2d


class MaskTokenPredictor(nn.Module):
    """Tokens at known positions -> predictions at queried positions.

    MAE ``forward_decoder`` (facebookresearch/mae ``models_mae.py``: ``decoder_embed``,
    ``mask_token``, fixed sin-cos ``decoder_pos_embed``, ``decoder_blocks``,
    ``decoder_norm``, ``decoder_pred``) and I-JEPA ``VisionTransformerPredictor.forward``
    (facebookresearch/ijepa ``src/models/vision_transformer.py``: ``predictor_embed``,
    ``mask_token`` + ``predictor_pos_embed`` at the target positions, ``predictor_blocks``,
    ``predictor_norm``, ``predictor_proj``). Attention has no order, so the context and
    mask tokens are concatenated rather than unshuffled into grid order (MAE): the
    outputs are the same. Blocks are torchvision's ViT ``EncoderBlock`` (pre-norm, MLP
    ratio 4, LayerNorm eps 1e-6, as timm's ``Block`` in both codes).

    grid: patches per image side (positions index a grid x grid row-major grid);
    in_dim: the encoder's width; dim, depth, heads: the predictor's; out_dim: the width
    of a prediction (pixels of a patch for MAE, the encoder's width for I-JEPA), None for
    no projection (a caller that reads ``features`` only: no parameter left unused,
    which DDP would wait for).
    """

    def __init__(
        self, grid: int, in_dim: int, dim: int, depth: int, heads: int, out_dim: int | None
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"predictor: width {dim} is not divisible by {heads} heads")
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("position", sincos_2d(dim, grid), persistent=False)
        self.blocks = nn.Sequential(
            *(
                EncoderBlock(heads, dim, 4 * dim, dropout=0.0, attention_dropout=0.0)
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.project = nn.Linear(dim, out_dim) if out_dim is not None else nn.Identity()
        nn.init.normal_(self.mask_token, std=0.02)
        for linear in (self.embed, self.project):  # MAE _init_weights
            if isinstance(linear, nn.Linear):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    def features(
        self,
        context: torch.Tensor,
        context_positions: torch.Tensor,
        query_positions: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The normed tokens at the queried positions, before the projection: (N, Q, dim).

        context: (N, C, in_dim) encoder tokens at ``context_positions`` (N, C) long;
        query_positions: (N, Q) long; extra: (N, E, in_dim) tokens without a position
        (MAE's class token, whose position embedding is zero), or None.
        """
        n = context.shape[0]
        position = self.position.expand(n, -1, -1)
        x = self.embed(context) + gather_tokens(position, context_positions)
        queries = self.mask_token + gather_tokens(position, query_positions)
        parts = [x, queries] if extra is None else [self.embed(extra), x, queries]
        x = self.norm(self.blocks(torch.cat(parts, dim=1)))
        return x[:, -query_positions.shape[1] :]

    def forward(
        self,
        context: torch.Tensor,
        context_positions: torch.Tensor,
        query_positions: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predictions at the queried positions: (N, Q, out_dim) (see ``features``)."""
        return self.project(self.features(context, context_positions, query_positions, extra))
