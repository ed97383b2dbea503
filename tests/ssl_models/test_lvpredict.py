"""The latent-variable predictive EBM: E = min over z, the winning hypothesis alone is
trained, K = 1 is the plain predictor, the continuous latent pays its KL, the diagnostics
report the latent's usage, and an unlimited latent flattens the energy."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pipelines.ingest.masks import RandomPatchMask
from ssl_models.methods import METHODS, Batch, build_method
from ssl_models.methods.lvpredict import (
    LatentPredictive,
    kl_to_standard_normal,
    usage_entropy_bits,
)
from ssl_models.methods.masked import patch_errors
from tests.tiny_models import masks_from, smooth_images, tiny_vit

SMALL = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


def small(**options) -> LatentPredictive:
    torch.manual_seed(0)
    return build_method("lvpredict", tiny_vit(), **(SMALL | options))


def batch(n: int = 8, seed: int = 0) -> Batch:
    return Batch(
        [smooth_images(n, seed=seed)], masks_from(RandomPatchMask(grid=4, ratio=0.5), n, seed)
    )


def features(method: LatentPredictive, inputs: Batch):
    return method(inputs).state  # (h, y)


def test_registered_with_its_family():
    assert METHODS["lvpredict"] is LatentPredictive
    assert LatentPredictive.anti_collapse == "latent capacity"
    assert small(hypotheses=16).capacity_bits == 4.0


def test_discrete_energy_is_the_minimum_over_the_hypotheses():
    method = small(hypotheses=5)
    with torch.no_grad():
        h, y = features(method, batch())
        per_k = torch.stack(
            [patch_errors(method.head(h, code), y).mean(dim=1) for code in method.codes], dim=1
        )
        energy = method.energy(h, y)
    torch.testing.assert_close(energy.energy, per_k.min(dim=1).values)
    assert torch.equal(energy.choice, per_k.argmin(dim=1))
    assert (energy.energy <= per_k[:, 0]).all()


def test_only_the_winning_hypotheses_are_trained():
    method = small(hypotheses=32)
    out = method(batch())
    out.loss.backward()
    h, y = out.state
    winners = set(method.energy(h, y).choice.tolist())
    assert len(winners) < 32
    for k in range(32):
        assert (method.codes.grad[k].abs().sum() > 0) == (k in winners), k


def test_one_hypothesis_is_the_plain_predictor():
    """K = 1: E is the prediction error of one prediction, the code a constant input."""
    method = small(hypotheses=1)
    with torch.no_grad():
        h, y = features(method, batch())
        first, activation, second = method.head.net
        plain = second(activation(first(h + method.codes[0])))
        energy = method.energy(h, y)
    torch.testing.assert_close(energy.energy, patch_errors(plain, y).mean(dim=1))
    assert (energy.choice == 0).all() and float(energy.cost.abs().sum()) == 0


def test_continuous_energy_is_error_plus_weighted_kl():
    method = small(latent="continuous", kl_weight=0.3).eval()
    assert method.latent_dim == 48  # None: a patch's pixels
    with torch.no_grad():
        h, y = features(method, batch())
        energy = method.energy(h, y)
    torch.testing.assert_close(energy.energy, energy.error + 0.3 * energy.cost)
    mean, log_var = torch.randn(4, 6), torch.randn(4, 6)
    reference = kl_divergence(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_to_standard_normal(mean, log_var), reference)


def test_usage_entropy_in_bits():
    assert usage_entropy_bits(torch.tensor([0, 1, 2, 3]), 4) == pytest.approx(2.0)
    assert usage_entropy_bits(torch.tensor([2, 2, 2]), 4) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("options", "key"),
    [({"hypotheses": 4}, "latent_usage_bits"), ({"latent": "continuous"}, "latent_kl")],
)
def test_diagnostics_report_the_latents_usage(options, key):
    method = small(**options)
    report = method.diagnostics(method(batch()))
    assert {"embedding_std", "effective_rank", "energy_gap", key} <= set(report)


def fit(method: LatentPredictive, inputs: Batch, steps: int) -> list[float]:
    optimiser = torch.optim.AdamW(method.parameters(), lr=5e-3)
    losses = []
    for _ in range(steps):
        loss = method(inputs).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


def test_limited_capacity_keeps_the_gap_an_unlimited_latent_closes_it():
    inputs = batch()
    limited = small(hypotheses=1).train()
    losses = fit(limited, inputs, 20)
    assert losses[-1] < 0.8 * losses[0]
    unlimited = small(latent="continuous", kl_weight=0.0).train()
    fit(unlimited, inputs, 20)
    gaps = []
    for method in (limited, unlimited):
        method.eval()
        true, shuffled = method.energy_pairs(method(inputs))
        gaps.append(float((shuffled - true).mean()))
    assert gaps[0] > 0.05
    assert abs(gaps[1]) < 0.5 * gaps[0]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="hypotheses=0 must be >= 1"):
        small(hypotheses=0)
    with pytest.raises(ValueError, match="kl_weight=-1 must be >= 0"):
        small(latent="continuous", kl_weight=-1)
