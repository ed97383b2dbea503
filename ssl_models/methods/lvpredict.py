"""A latent-variable predictive energy-based model (LeCun 2022, "A path towards autonomous
machine intelligence", sec. 4.4-4.5): a predictor maps the context x and a latent z to a
prediction of the target y, and

    E(x, y) = min_z  D(Pred(x, z), y) + cost(z).

z spans the plausible predictions, so its capacity must be limited: with enough
information z can encode y itself and every y gets low energy (the energy surface is
flat: collapse in the energy-based sense). Two limits, both configurable:

- ``latent: discrete``: z is one of ``hypotheses`` (K) learned codes, E is the minimum
  over the K predictions, and the loss trains the winning one (winner-takes-all, as in
  multiple-hypothesis prediction). K = 1 is the plain predictor. The capacity is log2 K
  bits per image; the diagnostic is the usage entropy of the K codes over a batch.
- ``latent: continuous``: a vector z per target patch (``latent_dim``; None: as large as
  a patch's pixels), inferred from (x, y) by an encoder (amortised minimisation, as in a
  conditional VAE), with noise (the reparameterised sample) and the cost
  ``kl_weight`` x KL(q(z | x, y) || N(0, I)) (nats per patch). The weight is the
  capacity: 0 leaves it unlimited. The energy uses the encoder's mean; the diagnostic
  is the KL.

Here x is an image's visible patches (encoded by the ViT backbone) and y its hidden
patches as per-patch normalised pixels, MAE's targets (``ssl_models/methods/mae.py``);
D is the mean squared error per patch, averaged over the hidden patches. The predictor
is MAE's decoder (``MaskTokenPredictor``) followed by a head that takes its output
plus the latent's embedding: the decoder runs once, the head once per hypothesis.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.backbones import Backbone, hidden_patches, visible_patches
from ssl_models.diagnostics import collapse_report, derange
from ssl_models.methods.base import Batch, Method, StepOutput
from ssl_models.methods.masked import batch_column, one_view, patch_errors, pixel_targets, vit_grid
from ssl_models.patches import gather_tokens
from ssl_models.predictors import MaskTokenPredictor


class LatentEnergy(NamedTuple):
    """The energy of each pair and its parts: ``energy`` (N,), ``error`` (N,) the
    prediction error at the best z, ``cost`` (N,) the latent's cost, ``choice`` (N,) the
    winning hypothesis (discrete; None otherwise)."""

    energy: torch.Tensor
    error: torch.Tensor
    cost: torch.Tensor
    choice: torch.Tensor | None = None


def kl_to_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) summed over the last dimension, in nats."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(dim=-1)


def usage_entropy_bits(choice: torch.Tensor, hypotheses: int) -> float:
    """Entropy (bits) of how often each of the K hypotheses wins over a batch: log2 K when
    all are used equally, 0 when one wins always."""
    counts = torch.bincount(choice, minlength=hypotheses).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum()) + 0.0  # + 0.0: no "-0.0" when one hypothesis wins


class PredictionHead(nn.Module):
    """The part of the predictor that sees z: (predictor features h + embedding of z) ->
    pixels of a patch, a two-layer MLP. h: (..., H, dim), latent: broadcastable to it."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, out_dim))

    def forward(self, h: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        # W1 (h + u) + b = (W1 h + b) + W1 u: the first layer runs once on h, not per hypothesis.
        first, activation, second = self.net
        return second(activation(first(h) + F.linear(latent, first.weight)))


class LatentPredictive(Method):
    name = "lvpredict"
    anti_collapse = "latent capacity"
    recipe = "mae"

    def __init__(
        self,
        backbone: Backbone,
        latent: Literal["discrete", "continuous"] = "discrete",
        hypotheses: int = 16,
        latent_dim: int | None = None,
        kl_weight: float = 1.0,
        decoder_dim: int = 256,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
    ) -> None:
        """No published recipe: a decoder narrower than MAE's (the head runs once per
        hypothesis), 16 hypotheses (4 bits per image), KL weight 1 (a VAE's)."""
        super().__init__(backbone)
        if latent not in ("discrete", "continuous"):
            raise ValueError(
                f"{self.name}: latent must be 'discrete' or 'continuous', got {latent!r}"
            )
        if hypotheses < 1:
            raise ValueError(f"{self.name}: hypotheses={hypotheses!r} must be >= 1")
        if kl_weight < 0:
            raise ValueError(f"{self.name}: kl_weight={kl_weight!r} must be >= 0")
        grid = vit_grid(backbone, self.name)
        self.patch_size = backbone.patch_size
        pixels = self.patch_size * self.patch_size * 3
        self.latent = latent
        self.hypotheses = hypotheses
        self.kl_weight = kl_weight
        # Features only: the head below makes the predictions.
        self.decoder = MaskTokenPredictor(
            grid, backbone.feature_dim, decoder_dim, decoder_depth, decoder_heads, None
        )
        self.head = PredictionHead(decoder_dim, pixels)
        if latent == "discrete":
            self.codes = nn.Parameter(0.02 * torch.randn(hypotheses, decoder_dim))
        else:
            self.latent_dim = latent_dim if latent_dim is not None else pixels
            self.posterior = nn.Sequential(  # q(z | x, y): (h, y) -> (mean, log variance)
                nn.Linear(decoder_dim + pixels, 2 * decoder_dim),
                nn.GELU(),
                nn.Linear(2 * decoder_dim, 2 * self.latent_dim),
            )
            self.embed_latent = nn.Linear(self.latent_dim, decoder_dim)

    @property
    def capacity_bits(self) -> float:
        """log2 K for a discrete latent; inf for a continuous one (its KL measures it)."""
        return math.log2(self.hypotheses) if self.latent == "discrete" else math.inf

    def energy(self, h: torch.Tensor, y: torch.Tensor, sample: bool = False) -> LatentEnergy:
        """E(x, y) from the predictor's features h (N, H, dim) of x and the targets y
        (N, H, P). ``sample``: the continuous latent is drawn (training) instead of its mean."""
        if self.latent == "discrete":
            predictions = self.head(h.unsqueeze(1), self.codes[None, :, None, :])  # (N, K, H, P)
            errors = patch_errors(predictions, y.unsqueeze(1)).mean(dim=2)  # (N, K)
            error, choice = errors.min(dim=1)
            return LatentEnergy(error, error, torch.zeros_like(error), choice)
        mean, log_var = self.posterior(torch.cat([h, y], dim=-1)).chunk(2, dim=-1)
        z = mean + (0.5 * log_var).exp() * torch.randn_like(mean) if sample else mean
        error = patch_errors(self.head(h, self.embed_latent(z)), y).mean(dim=1)
        cost = kl_to_standard_normal(mean, log_var).mean(dim=1)  # nats per patch
        return LatentEnergy(error + self.kl_weight * cost, error, cost)

    def forward(self, batch: Batch) -> StepOutput:
        """Views: the first; extras: ``mask`` (N, T) bool, True = hidden (``random``)."""
        images = one_view(batch, self.name)
        mask = batch_column(batch, "mask", self.name, "random")
        keep, hidden = visible_patches(mask), hidden_patches(mask)
        tokens = self.backbone.tokens(images, keep)
        h = self.decoder.features(tokens[:, 1:], keep, hidden, extra=tokens[:, :1])
        y = gather_tokens(pixel_targets(images, self.patch_size, True), hidden)
        energy = self.energy(h, y, sample=self.training)
        loss = energy.energy.mean()
        terms = {"prediction_error": energy.error.mean().detach()}
        if self.latent == "continuous":
            terms["kl"] = energy.cost.mean().detach()
        return StepOutput(loss, tokens[:, 0].detach(), terms=terms, state=(h.detach(), y))

    @torch.no_grad()
    def energy_pairs(self, output: StepOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """E(x, y) of each image's own hidden patches, and of another image's (each at the
        minimising z for that pair: a shuffled y gets its own best hypothesis)."""
        h, y = output.state
        return self.energy(h, y).energy, self.energy(h, derange(y)).energy

    @torch.no_grad()
    def diagnostics(self, output: StepOutput) -> dict[str, float]:
        """The collapse report plus the latent's usage: the entropy (bits) of the winning
        hypotheses over the batch (at most log2 K), or the KL (nats per patch)."""
        h, y = output.state
        true, mismatched = self.energy(h, y), self.energy(h, derange(y))
        report = collapse_report(output.embedding.float(), true.energy, mismatched.energy)
        if self.latent == "discrete":
            report["latent_usage_bits"] = usage_entropy_bits(true.choice, self.hypotheses)
        else:
            report["latent_kl"] = float(true.cost.mean())
        return report
