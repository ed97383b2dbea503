"""Projector and predictor MLPs: layer layout, last-layer options, paper shapes, bad dims."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_models.backbones import Backbone
from ssl_models.heads import mlp
from ssl_models.methods import METHODS, JointEmbedding, build_method


def linear_shapes(head: nn.Sequential) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)]


def test_hidden_layers_are_linear_bn_relu_then_a_final_linear():
    head = mlp(16, [32, 24], 8)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert linear_shapes(head) == [(16, 32), (32, 24), (24, 8)]
    # A bias before BN is redundant; the output layer keeps its bias by default.
    assert [m.bias is not None for m in head if isinstance(m, nn.Linear)] == [False, False, True]
    assert head(torch.randn(4, 16)).shape == (4, 8)


def test_no_hidden_layers_is_a_single_linear():
    head = mlp(16, [], 8)
    assert [type(m) for m in head] == [nn.Linear]
    assert head(torch.randn(3, 16)).shape == (3, 8)


def test_last_bias_can_be_dropped():
    assert mlp(16, [32], 8, last_bias=False)[-1].bias is None


def test_last_bn_replaces_the_output_bias_and_keeps_affine_by_default():
    head = mlp(16, [32], 8, last_bn=True)
    assert isinstance(head[-1], nn.BatchNorm1d) and head[-1].affine
    assert head[-2].bias is None  # BN right after: the bias would be cancelled


def test_last_bn_without_center_learns_a_scale_and_no_shift():
    head = mlp(16, [32], 8, last_bn=True, last_bn_center=False)
    bn = head[-1]
    assert bn.weight.requires_grad and not bn.bias.requires_grad
    head(torch.randn(8, 16)).sum().backward()
    assert bn.bias.grad is None and bn.weight.grad is not None


def test_last_bn_without_affine_standardises_the_output():
    torch.manual_seed(0)
    head = mlp(16, [32], 8, last_bn=True, last_bn_affine=False).train()
    bn = head[-1]
    assert not bn.affine and bn.weight is None and bn.bias is None
    assert not any(p is bn.weight for p in head.parameters())
    out = head(torch.randn(64, 16) * 5 + 3)
    torch.testing.assert_close(out.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("in_dim", "hidden", "out_dim"),
    [(0, [32], 8), (16, [32], 0), (16, [0], 8), (16, [32, -1], 8), (-3, [], 8)],
)
def test_non_positive_dimensions_are_refused(in_dim, hidden, out_dim):
    with pytest.raises(ValueError, match="mlp: dimensions must be positive"):
        mlp(in_dim, hidden, out_dim)


# Default heads of each method on a ResNet-50 (d = 2048), as each paper's official code has them:
# Linear shapes of the projector and predictor, and the output BN (None, "affine", "scale"
# (affine without a shift) or "plain" (no affine)).
PAPER_HEADS = {
    # google-research/simclr model_util.py projection_head: hidden = d, BN on every layer,
    # the output's with center=False.
    "simclr": ([(2048, 2048), (2048, 128)], "scale", None, None),
    "byol": ([(2048, 4096), (4096, 256)], None, [(256, 4096), (4096, 256)], None),
    "simsiam": (
        [(2048, 2048), (2048, 2048), (2048, 2048)],
        "plain",
        [(2048, 512), (512, 2048)],
        None,
    ),
    # facebookresearch/moco-v3 moco/builder.py MoCo_ResNet: 2-layer projector with the
    # output BN (no affine), 2-layer predictor without one (`_build_mlp(2, ..., False)`).
    "mocov3": ([(2048, 4096), (4096, 256)], "plain", [(256, 4096), (4096, 256)], None),
    "barlow_twins": ([(2048, 8192), (8192, 8192), (8192, 8192)], None, None, None),
    "vicreg": ([(2048, 8192), (8192, 8192), (8192, 8192)], None, None, None),
    "siamese": ([(2048, 2048), (2048, 128)], None, None, None),
}


def test_mocov3_on_a_vit_takes_the_vit_heads():
    """MoCo_ViT: 3-layer projector, predictor with the output BN, temperature 0.2."""
    backbone = Backbone("vit-like", nn.Flatten(), 384)
    backbone.patch_size = 16
    with torch.device("meta"):
        method = build_method("mocov3", backbone)
    assert linear_shapes(method.projector) == [(384, 4096), (4096, 4096), (4096, 256)]
    assert output_bn(method.predictor) == "plain"
    assert method.temperature == 0.2


def output_bn(head: nn.Sequential) -> str | None:
    last = head[-1]
    if not isinstance(last, nn.BatchNorm1d):
        return None
    if not last.affine:
        return "plain"
    return "affine" if last.bias.requires_grad else "scale"


def test_every_method_has_its_paper_heads_listed():
    # The masked and predictive methods have no projector (their heads: test_mae.py, ...).
    assert set(PAPER_HEADS) == {n for n, c in METHODS.items() if issubclass(c, JointEmbedding)}


@pytest.mark.parametrize("name", sorted(PAPER_HEADS))
def test_default_heads_have_the_paper_shapes(name):
    projector, projector_bn, predictor, predictor_bn = PAPER_HEADS[name]
    # On the meta device the 8192-wide heads cost neither memory nor initialisation time.
    with torch.device("meta"):
        method = build_method(name, Backbone("resnet50-like", nn.Flatten(), 2048))
    assert linear_shapes(method.projector) == projector
    assert output_bn(method.projector) == projector_bn
    if predictor is None:
        assert not hasattr(method, "predictor")
    else:
        assert linear_shapes(method.predictor) == predictor
        assert output_bn(method.predictor) == predictor_bn
