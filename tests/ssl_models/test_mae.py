"""MAE: the encoder sees the visible patches only, the loss reads the hidden ones only,
the decoder is MAE's, the loss falls and the energy gap opens on a batch it fits."""

from __future__ import annotations

import pytest
import torch

from pipelines.ingest.masks import RandomPatchMask
from ssl_models.backbones import hidden_patches, visible_patches
from ssl_models.methods import METHODS, Batch, build_method
from ssl_models.methods.mae import MAE
from ssl_models.patches import normalised_patches, patchify
from tests.tiny_models import masks_from, smooth_images, tiny_backbone, tiny_vit

SMALL = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


def small_mae(**options) -> MAE:
    torch.manual_seed(0)
    return build_method("mae", tiny_vit(), **(SMALL | options))


def batch(n: int = 8, seed: int = 0) -> Batch:
    return Batch([smooth_images(n, seed=seed)], masks_from(RandomPatchMask(grid=4), n, seed))


def fit(method, inputs: Batch, steps: int) -> list[float]:
    optimiser = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(steps):
        loss = method(inputs).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        method.update_teacher(step / steps)
        losses.append(loss.item())
    return losses


def test_registered_with_its_family():
    assert METHODS["mae"] is MAE
    assert MAE.anti_collapse == "denoising" and MAE.recipe == "mae"


def test_loss_reads_only_the_hidden_patches():
    method = small_mae()
    inputs = batch()
    images, mask = inputs.views[0], inputs.extras["mask"]
    out = method(inputs)
    prediction, target = out.state
    # MAE forward_loss on the full grid: predictions anywhere at the visible patches.
    n, t = mask.shape
    full = torch.full((n, t, 48), 1e3)
    full.scatter_(1, hidden_patches(mask)[..., None].expand(-1, -1, 48), prediction)
    pixels = normalised_patches(patchify(images, 4))
    per_patch = ((full - pixels) ** 2).mean(dim=-1)
    expected = (per_patch * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss.detach(), expected)
    torch.testing.assert_close(
        target, torch.gather(pixels, 1, hidden_patches(mask)[..., None].expand(-1, -1, 48))
    )


def test_encoder_never_sees_the_hidden_patches():
    method = small_mae()
    inputs = batch()
    images, mask = inputs.views[0], inputs.extras["mask"]
    changed = images.clone()
    hidden_pixels = mask.view(-1, 1, 4, 1, 4, 1).expand(-1, 3, -1, 4, -1, 4).reshape(images.shape)
    changed[hidden_pixels] = torch.randn(int(hidden_pixels.sum()))
    with torch.no_grad():
        a = method(inputs).embedding
        b = method(Batch([changed], inputs.extras)).embedding
    torch.testing.assert_close(a, b)


def test_decoder_is_maes_forward_decoder():
    """The same modules in MAE's order (unshuffled to the grid, class token first) give the
    same predictions at the hidden patches: attention has no order."""
    method = small_mae()
    inputs = batch()
    images, mask = inputs.views[0], inputs.extras["mask"]
    keep, hidden = visible_patches(mask), hidden_patches(mask)
    decoder = method.decoder
    with torch.no_grad():
        tokens = method.backbone.tokens(images, keep)
        ours = decoder(tokens[:, 1:], keep, hidden, extra=tokens[:, :1])
        x = decoder.embed(tokens)
        n, t = mask.shape
        grid = decoder.mask_token.expand(n, t, -1).clone()
        grid.scatter_(1, keep[..., None].expand(-1, -1, x.shape[-1]), x[:, 1:])
        position = torch.cat([torch.zeros(1, x.shape[-1]), decoder.position])
        full = torch.cat([x[:, :1], grid], dim=1) + position
        out = decoder.project(decoder.norm(decoder.blocks(full)))[:, 1:]
        reference = torch.gather(out, 1, hidden[..., None].expand(-1, -1, out.shape[-1]))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_loss_falls_and_the_energy_gap_opens_on_a_batch_it_fits():
    # Raw pixels: each image's colour, seen in its visible patches, predicts its hidden ones.
    method = small_mae(norm_pix_loss=False).train()
    inputs = batch()
    losses = fit(method, inputs, 30)
    assert losses[-1] < 0.7 * losses[0]
    true, mismatched = method.energy_pairs(method(inputs))
    assert true.shape == mismatched.shape == (8,)
    assert (mismatched - true).mean() > 0
    report = method.diagnostics(method(inputs))
    assert report["energy_gap"] > 0


def test_needs_a_mask_and_a_vit():
    with pytest.raises(ValueError, match="set data.mask.name: random"):
        small_mae()(Batch([smooth_images(2)]))
    with pytest.raises(ValueError, match="mae: needs a ViT backbone"):
        build_method("mae", tiny_backbone())
