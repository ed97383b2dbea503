"""Backbones: every name builds and returns (N, feature_dim); stems, checkpoints, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from ssl_models.backbones import BACKBONES, Backbone, build_backbone, visible_patches

# name -> (build options, input side, feature dim stated by the paper's architecture)
SMALL_BUILDS = {
    "resnet18": ({"small_image_stem": True}, 32, 512),
    "regnet_y_400mf": ({"small_image_stem": True}, 32, 440),
    "vit_tiny": ({"small_image_stem": True, "image_size": 32}, 32, 192),
    "resnet50": ({}, 32, 2048),
    "resnet18_3stage": ({"small_image_stem": True}, 32, 256),
    "regnet_y_1_6gf": ({}, 32, 888),
    "regnet_y_16gf": ({}, 32, 3024),
    "vit_small": ({"small_image_stem": True, "image_size": 32}, 32, 384),
}


def test_every_backbone_is_covered():
    assert set(SMALL_BUILDS) == set(BACKBONES)


@pytest.mark.parametrize("name", sorted(SMALL_BUILDS))
def test_backbone_returns_features_of_its_stated_dimension(name):
    options, side, feature_dim = SMALL_BUILDS[name]
    torch.manual_seed(0)
    backbone = build_backbone(name, **options).eval()
    assert isinstance(backbone, Backbone)
    assert backbone.name == name
    assert backbone.feature_dim == feature_dim
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, side, side))
    assert features.shape == (2, feature_dim)
    assert torch.isfinite(features).all()


def _final_map_side(backbone: Backbone, side: int) -> int:
    """Spatial side of the feature map that the global pool reduces."""
    seen = []
    hook = backbone.model.avgpool.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        backbone.eval()(torch.randn(2, 3, side, side))
    hook.remove()
    return seen[0][-1]


@pytest.mark.parametrize(
    ("name", "standard_side", "small_side"),
    [("resnet18", 1, 4), ("regnet_y_400mf", 1, 2), ("resnet18_3stage", 2, 4)],
)
def test_small_image_stem_keeps_resolution_on_32px(name, standard_side, small_side):
    # The standard stems divide 32px down to a 1x1 map; the CIFAR stem keeps more of it.
    assert _final_map_side(build_backbone(name), 32) == standard_side
    assert _final_map_side(build_backbone(name, small_image_stem=True), 32) == small_side


def test_vit_small_stem_uses_4px_patches():
    vit = build_backbone("vit_tiny", small_image_stem=True, image_size=32).model
    assert vit.patch_size == 4
    assert vit.seq_length == (32 // 4) ** 2 + 1  # patches plus the class token
    assert build_backbone("vit_tiny", image_size=32).model.patch_size == 16


def test_vit_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of the patch size 4"):
        build_backbone("vit_tiny", small_image_stem=True, image_size=30)


def test_resnet18_state_dict_loads_strictly_into_plain_torchvision():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18").eval()
    plain = models.resnet18(weights=None)
    plain.fc = nn.Identity()
    plain.load_state_dict(backbone.model.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), backbone(images))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("resnet18", {"small_image_stem": True}),
        ("regnet_y_400mf", {"small_image_stem": True}),
        ("vit_tiny", {"small_image_stem": True, "image_size": 32}),
    ],
)
def test_state_dict_round_trips_strictly_between_same_builds(name, options):
    torch.manual_seed(0)
    source = build_backbone(name, **options).eval()
    torch.manual_seed(1)
    target = build_backbone(name, **options).eval()
    target.model.load_state_dict(source.model.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_small_stem_checkpoint_does_not_load_into_standard_stem():
    small = build_backbone("resnet18", small_image_stem=True)
    standard = build_backbone("resnet18")
    with pytest.raises(RuntimeError, match="conv1.weight"):
        standard.model.load_state_dict(small.model.state_dict(), strict=True)


def test_unknown_backbone_name_lists_the_accepted_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'") as info:
        build_backbone("resnet19")
    for name in BACKBONES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "shape",
    [(3, 32, 32), (2, 1, 32, 32), (2, 32, 32, 3), (2, 3 * 32 * 32)],
)
def test_wrong_image_shape_is_refused_with_the_shape(shape):
    backbone = build_backbone("resnet18", small_image_stem=True)
    with pytest.raises(ValueError, match=r"resnet18: images must have shape \(N, 3, H, W\)"):
        backbone(torch.zeros(shape))


# --- tokens (ViTs) ----------------------------------------------------------------


def _vit_tiny_32() -> Backbone:
    torch.manual_seed(0)
    return build_backbone("vit_tiny", small_image_stem=True, image_size=32).eval()


def test_vit_states_its_patch_grid_and_convnets_have_none():
    vit = _vit_tiny_32()
    assert (vit.patch_size, vit.num_patches) == (4, 64)
    assert build_backbone("vit_tiny", image_size=64).num_patches == 16
    resnet = build_backbone("resnet18", small_image_stem=True)
    assert (resnet.patch_size, resnet.num_patches) == (None, None)


def test_mean_pool_is_the_mean_patch_token_and_needs_a_vit():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", small_image_stem=True, image_size=32, pool="mean").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, tokens = vit(images), vit.tokens(images)
    assert torch.allclose(features, tokens[:, 1:].mean(dim=1))
    assert not torch.allclose(features, tokens[:, 0])
    with pytest.raises(ValueError, match="resnet18: pool 'mean' needs a ViT backbone"):
        build_backbone("resnet18", pool="mean")
    with pytest.raises(ValueError, match="pool"):
        build_backbone("vit_tiny", image_size=32, pool="max")


def test_vit_tokens_class_token_is_the_pooled_feature():
    vit = _vit_tiny_32()
    state = {k: v.clone() for k, v in vit.model.state_dict().items()}
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.tokens(images)
        features = vit(images)
    assert tokens.shape == (3, 1 + 64, 192)
    torch.testing.assert_close(tokens[:, 0], features)
    # Same parameters, same names: checkpoints still load strictly.
    assert vit.model.state_dict().keys() == state.keys()
    fresh = build_backbone("vit_tiny", small_image_stem=True, image_size=32)
    fresh.model.load_state_dict(vit.model.state_dict(), strict=True)


def _mae_encoder_reference(vit: Backbone, images: torch.Tensor, keep: torch.Tensor):
    """facebookresearch/mae models_mae.py forward_encoder, on torchvision's modules."""
    model = vit.model
    pos = model.encoder.pos_embedding
    x = model._process_input(images) + pos[:, 1:, :]
    x = torch.gather(x, 1, keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
    cls = model.class_token + pos[:, :1, :]
    x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
    for block in model.encoder.layers:
        x = block(x)
    return model.encoder.ln(x)


def test_vit_tokens_keep_runs_the_encoder_on_the_kept_patches_only():
    vit = _vit_tiny_32()
    images = torch.randn(2, 3, 32, 32)
    keep = torch.stack([torch.randperm(64)[:16].sort().values for _ in range(2)])
    with torch.no_grad():
        tokens = vit.tokens(images, keep)
        reference = _mae_encoder_reference(vit, images, keep)
        full = vit.tokens(images)
    assert tokens.shape == (2, 1 + 16, 192)
    torch.testing.assert_close(tokens, reference)
    # Attention sees only the kept tokens: the result differs from the full sequence's.
    assert not torch.allclose(
        tokens[:, 1:], torch.gather(full[:, 1:], 1, keep[..., None].expand(-1, -1, 192))
    )


def test_vit_tokens_keep_all_patches_is_the_full_sequence():
    vit = _vit_tiny_32()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            vit.tokens(images, torch.arange(64).expand(2, -1)), vit.tokens(images)
        )


@pytest.mark.parametrize(
    "keep",
    [
        torch.zeros(2, 4, dtype=torch.int32),
        torch.zeros(3, 4, dtype=torch.long),
        torch.zeros(8, dtype=torch.long),
    ],
)
def test_vit_tokens_refuses_a_malformed_keep(keep):
    with pytest.raises(
        ValueError, match=r"keep must be \(N=2, K\) long indices into the 64 patches"
    ):
        _vit_tiny_32().tokens(torch.randn(2, 3, 32, 32), keep)


@pytest.mark.parametrize("name", ["resnet18", "regnet_y_400mf"])
def test_convnets_have_no_token_interface(name):
    backbone = build_backbone(name, small_image_stem=True)
    with pytest.raises(
        ValueError, match=f"backbone {name} has no token interface: use a ViT backbone"
    ):
        backbone.tokens(torch.randn(2, 3, 32, 32))


def test_visible_patches_lists_the_unmasked_patches_in_grid_order():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    torch.testing.assert_close(visible_patches(mask), torch.tensor([[1, 3], [0, 1]]))
    assert visible_patches(torch.zeros(0, 4, dtype=torch.bool)).shape == (0, 0)


def test_visible_patches_refuses_ragged_or_non_bool_masks():
    with pytest.raises(ValueError, match="visible per row: \\[2, 1\\]"):
        visible_patches(torch.tensor([[True, False, True, False], [True, False, True, True]]))
    with pytest.raises(ValueError, match="mask must be \\(N, T\\) bool"):
        visible_patches(torch.zeros(2, 4))
