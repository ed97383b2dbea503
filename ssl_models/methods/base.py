"""The seam every method plugs into: encode a view, score a pair, combine pairs into a loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.backbones import Backbone


class ViewEncoding(NamedTuple):
    """What a method computes for one view: the embedding (diagnostics, energy) and, for
    predictive methods, the prediction and the stop-gradient target."""

    embedding: torch.Tensor
    prediction: torch.Tensor | None = None
    target: torch.Tensor | None = None


@dataclass
class StepOutput:
    loss: torch.Tensor
    embeddings: tuple[torch.Tensor, torch.Tensor]  # views 0 and 1, detached, for diagnostics
    encodings: tuple[ViewEncoding, ViewEncoding]


ANTI_COLLAPSE = ("negatives", "regulariser", "predictor + stop-gradient", "EMA teacher", "none")


def cosine_energy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a_i, b_i): 0 for aligned pairs, 2 for opposite ones. (N,)"""
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


class Method(nn.Module):
    """A self-supervised method: a backbone, its heads, an energy and an anti-collapse mechanism.

    Subclasses define ``encode`` (one view -> ViewEncoding), ``pair_loss`` (two encodings
    -> scalar) and ``pair_energy`` (two encodings -> (N,) energies, low = compatible).
    Views beyond the first two (multi-crop's local views) are paired with both global
    views and the pair losses averaged (Caron et al. 2020, sec. 3.3).
    """

    name: ClassVar[str]
    anti_collapse: ClassVar[str]

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def encode(self, x: torch.Tensor) -> ViewEncoding:
        raise NotImplementedError

    def pair_loss(self, a: ViewEncoding, b: ViewEncoding) -> torch.Tensor:
        raise NotImplementedError

    def pair_energy(self, a: ViewEncoding, b: ViewEncoding) -> torch.Tensor:
        return cosine_energy(a.embedding, b.embedding)

    def energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E(x, y) for a batch of view pairs: (N,), low for compatible pairs."""
        return self.pair_energy(self.encode(x), self.encode(y))

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        if len(views) < 2:
            raise ValueError(f"{self.name}: needs at least 2 views, got {len(views)}")
        encodings = [self.encode(v) for v in views]
        pairs = [(0, 1)] + [(g, j) for j in range(2, len(views)) for g in (0, 1)]
        loss = torch.stack([self.pair_loss(encodings[i], encodings[j]) for i, j in pairs]).mean()
        a, b = encodings[0], encodings[1]
        return StepOutput(loss, (a.embedding.detach(), b.embedding.detach()), (a, b))

    def update_teacher(self, progress: float) -> None:
        """Called after each optimiser step with the fraction of training done. EMA methods override."""
