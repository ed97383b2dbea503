"""I-JEPA: the loss is I-JEPA's, the EMA target encoder takes no gradient and follows the
linear schedule (kept in the checkpoint), the context encoder sees the context only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.ingest.masks import MultiBlockMask
from ssl_models.backbones import visible_patches
from ssl_models.ema import linear_momentum
from ssl_models.methods import METHODS, Batch, build_method
from ssl_models.methods.ijepa import IJEPA
from tests.tiny_models import masks_from, smooth_images, tiny_vit

SMALL = {"predictor_dim": 16, "predictor_depth": 1}
GRID = 8  # 32 px images, 4 px patches


def small_ijepa(**options) -> IJEPA:
    torch.manual_seed(0)
    return build_method("ijepa", tiny_vit(image_size=32), **(SMALL | options))


def batch(n: int = 6, seed: int = 0) -> Batch:
    return Batch(
        [smooth_images(n, side=32, seed=seed)], masks_from(MultiBlockMask(grid=GRID), n, seed)
    )


def test_registered_with_its_family():
    assert METHODS["ijepa"] is IJEPA
    assert IJEPA.anti_collapse == "EMA teacher" and IJEPA.recipe == "ijepa"
    # The predictor's heads default to the encoder's (I-JEPA helper.py init_model).
    assert small_ijepa().predictor.blocks[0].num_heads == 2


def test_loss_is_smooth_l1_on_layer_normed_targets_as_in_ijepa_train():
    """facebookresearch/ijepa src/train.py: forward_target, forward_context, loss_fn, with
    its mask-major repetition of the context (x.repeat(len(masks), 1, 1))."""
    method = small_ijepa()
    inputs = batch()
    images, mask, blocks = inputs.views[0], inputs.extras["mask"], inputs.extras["targets"]
    n, m, p = blocks.shape
    with torch.no_grad():
        loss = method(inputs).loss
        h = method.target_encoder.module.tokens(images)[:, 1:]
        h = F.layer_norm(h, (h.size(-1),))
        masks_pred = [blocks[:, j] for j in range(m)]
        h = torch.cat(
            [torch.gather(h, 1, b[..., None].expand(-1, -1, h.shape[-1])) for b in masks_pred]
        )
        keep = visible_patches(mask)
        z = method.backbone.tokens(images, keep)[:, 1:]
        z = method.predictor(z.repeat(m, 1, 1), keep.repeat(m, 1), torch.cat(masks_pred))
        expected = F.smooth_l1_loss(z, h)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


def test_ema_target_encoder_gets_no_gradient():
    method = small_ijepa().train()
    trainable = [name for name, p in method.named_parameters() if p.requires_grad]
    assert trainable and not any(name.startswith("target_encoder.") for name in trainable)
    method(batch()).loss.backward()
    assert all(p.grad is None for p in method.target_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())


def test_context_encoder_sees_only_the_context():
    method = small_ijepa()
    inputs = batch()
    images, mask = inputs.views[0], inputs.extras["mask"]
    outside = mask.view(-1, 1, GRID, 1, GRID, 1).expand(-1, 3, -1, 4, -1, 4).reshape(images.shape)
    changed = images.clone()
    changed[outside] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(
            method(inputs).embedding, method(Batch([changed], inputs.extras)).embedding
        )


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_momentum_is_linear_from_0996_to_1_and_checkpointed(progress, tmp_path):
    method = small_ijepa()
    method.update_teacher(progress)
    assert method.target_encoder.momentum == pytest.approx(0.996 + 0.004 * progress)
    assert linear_momentum(0.996, progress) == pytest.approx(0.996 + 0.004 * progress)
    torch.save(method.state_dict(), tmp_path / "m.pt")
    restored = small_ijepa()
    restored.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    assert restored.target_encoder.momentum == pytest.approx(method.target_encoder.momentum)


def test_loss_falls_and_the_energy_gap_opens_on_a_batch_it_fits():
    method = small_ijepa(base_momentum=0.9).train()
    inputs = batch()
    optimiser = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(15):
        loss = method(inputs).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        method.update_teacher(step / 15)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    true, mismatched = method.energy_pairs(method(inputs))
    assert true.shape == (6,) and (mismatched - true).mean() > 0


def test_needs_multiblock_targets():
    inputs = batch()
    with pytest.raises(ValueError, match="no 'targets' column; set data.mask.name: multiblock"):
        small_ijepa()(Batch(inputs.views, {"mask": inputs.extras["mask"]}))
