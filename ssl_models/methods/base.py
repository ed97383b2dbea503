"""The seam every method plugs into, for every family of the energy-based view.

A method receives a ``Batch`` (views plus the extra columns the data pipeline drew with
them: masks, positions, latents) and returns a ``StepOutput`` (the loss, its named
terms, the embedding the collapse diagnostics read). Each method says itself how its
energy gap is measured (``energy_pairs``): the energy of true (x, y) pairs against the
energy of y taken from another image. Joint-embedding methods share ``JointEmbedding``,
which pairs views; a masked or predictive method subclasses ``Method`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.backbones import Backbone
from ssl_models.diagnostics import collapse_report, derange


@dataclass
class Batch:
    """One step's input. ``views``: normalised (N, 3, H, W) tensors, global views first;
    ``extras``: the columns drawn with them in the data pipeline (``mask``: (N, T) bool, ...)."""

    views: list[torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepOutput:
    """``loss``: scalar to minimise; ``embedding``: (N, D) detached, what the collapse
    diagnostics read; ``terms``: named detached scalars of the loss, logged as they are;
    ``state``: whatever the method's ``energy_pairs`` needs (its encodings)."""

    loss: torch.Tensor
    embedding: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    state: Any = None


class ViewEncoding(NamedTuple):
    """What a method computes for one view: the embedding (diagnostics, energy) and, for
    predictive methods, the prediction and the stop-gradient target."""

    embedding: torch.Tensor
    prediction: torch.Tensor | None = None
    target: torch.Tensor | None = None


# "denoising": the targets are the input itself (pixels), corrupted by the mask (MAE);
# "latent capacity": a latent variable whose information is limited (K hypotheses, a KL).
ANTI_COLLAPSE = (
    "negatives",
    "regulariser",
    "predictor + stop-gradient",
    "EMA teacher",
    "denoising",
    "latent capacity",
    "none",
)


def cosine_energy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a_i, b_i): 0 for aligned pairs, 2 for opposite ones. (N,)"""
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


class Method(nn.Module):
    """A self-supervised method: a backbone, its heads, an energy and an anti-collapse
    mechanism. ``recipe`` names the view recipe it trains on (the config's default)."""

    name: ClassVar[str]
    anti_collapse: ClassVar[str]
    recipe: ClassVar[str] = "simclr"
    # Learning rate of biases and norm parameters relative to the weights' (the optimiser's
    # default when the config leaves optim.bias_lr_ratio unset).
    bias_lr_ratio: ClassVar[float] = 1.0

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    @torch.no_grad()
    def energy_pairs(self, output: StepOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) energies of the true pairs and (N,) of mismatched ones (each x with
        another image's y): their mean difference is the energy gap, <= 0 at collapse."""
        raise NotImplementedError

    @torch.no_grad()
    def diagnostics(self, output: StepOutput) -> dict[str, float]:
        """Collapse diagnostics of one step: embedding std, effective rank, energy gap."""
        true, mismatched = self.energy_pairs(output)
        return collapse_report(output.embedding.float(), true, mismatched)

    def update_teacher(self, progress: float) -> None:
        """Called after each optimiser step with the fraction of training done. EMA methods override."""


class JointEmbedding(Method):
    """Two (or more) views of one image, encoded alike and scored as pairs.

    Subclasses define ``encode`` (one view -> ViewEncoding), ``pair_loss`` (two encodings
    -> scalar) and ``pair_energy`` (two encodings -> (N,) energies, low = compatible).
    Views beyond the first two (multi-crop's local views) are paired with both global
    views (Caron et al. 2020, sec. 3.3). Methods with a target branch (EMA or
    stop-gradient: BYOL, MoCo v3, SimSiam) define ``directed_loss(query, target)``, with
    ``pair_loss(a, b) == directed_loss(a, b) + directed_loss(b, a)``: a local view is then
    only a query and the targets are the global views (SwAV's and DINO's rule: DINO
    ``main_dino.py`` ``DINOLoss`` takes teacher outputs of the 2 global crops only); the
    loss is twice the mean of the directed terms, so two views give ``pair_loss``. The
    others average the pair losses.
    """

    def directed_loss(self, query: ViewEncoding, target: ViewEncoding) -> torch.Tensor:
        """The loss of predicting ``target``'s branch from ``query`` (target-branch methods)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> ViewEncoding:
        raise NotImplementedError

    def pair_loss(self, a: ViewEncoding, b: ViewEncoding) -> torch.Tensor:
        raise NotImplementedError

    def pair_energy(self, a: ViewEncoding, b: ViewEncoding) -> torch.Tensor:
        return cosine_energy(a.embedding, b.embedding)

    def energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E(x, y) for a batch of view pairs: (N,), low for compatible pairs."""
        return self.pair_energy(self.encode(x), self.encode(y))

    def forward(self, batch: Batch) -> StepOutput:
        views = batch.views
        if len(views) < 2:
            raise ValueError(f"{self.name}: needs at least 2 views, got {len(views)}")
        encodings = [self.encode(v) for v in views]
        locals_ = range(2, len(views))
        if len(views) > 2 and type(self).directed_loss is not JointEmbedding.directed_loss:
            directed = [(0, 1), (1, 0)] + [(j, g) for j in locals_ for g in (0, 1)]
            terms = [self.directed_loss(encodings[q], encodings[t]) for q, t in directed]
            loss = 2 * torch.stack(terms).mean()
        else:
            pairs = [(0, 1)] + [(g, j) for j in locals_ for g in (0, 1)]
            terms = [self.pair_loss(encodings[i], encodings[j]) for i, j in pairs]
            loss = torch.stack(terms).mean()
        a, b = encodings[0], encodings[1]
        return StepOutput(loss, a.embedding.detach(), state=(a, b))

    @torch.no_grad()
    def energy_pairs(self, output: StepOutput) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = output.state
        return self.pair_energy(a, b), self.pair_energy(a, derange(b))
