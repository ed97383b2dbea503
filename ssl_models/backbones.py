"""Backbones from torchvision, classifier removed, each stating its feature dimension.

``Backbone.model`` is the torchvision model itself with its classifier set to
``nn.Identity()``, so ``backbone.model.state_dict()`` loads with ``strict=True`` into
``build_backbone(same name, same options).model`` and, for the standard stem, into the
plain torchvision constructor with the classifier replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models
from torchvision.models.vision_transformer import VisionTransformer

from ssl_models.checks import check_choice


class Backbone(nn.Module):
    """A feature extractor: (N, 3, H, W) images -> (N, feature_dim) features."""

    def __init__(self, name: str, model: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"backbone {self.name}: images must have shape (N, 3, H, W), got {tuple(images.shape)}"
            )
        return self.model(images)


def _small_resnet_stem(model: models.ResNet) -> None:
    """CIFAR stem (He et al. 2016, sec. 4.2; SimCLR appendix B.9): 3x3 conv, stride 1, no max-pool."""
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _resnet(
    constructor: Callable[..., models.ResNet], small_image_stem: bool
) -> tuple[nn.Module, int]:
    model = constructor(weights=None)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if small_image_stem:
        _small_resnet_stem(model)
    return model, feature_dim


def _resnet18_3stage(small_image_stem: bool) -> tuple[nn.Module, int]:
    """ResNet-18 (He et al. 2016) without its last stage: 256-d features at stride 16.

    A CPU-budget backbone for small images. On 32 px inputs the ImageNet stem leaves
    an 8x8 map and the last stage runs at 1x1, where 3x3 convolutions mostly multiply
    padding and run far below the CPU's matmul rate; here the small-image stem is a
    3x3 stride-2 convolution without max-pool (16x16 into stage 1) and the 512-wide
    stage is dropped. Measured on a 2-core CPU (bf16, batch 256, two views): about
    the step time of ResNet-18 with the ImageNet stem, at 4x its spatial resolution
    (docs/RESULTS.md).
    """
    model = models.resnet18(weights=None)
    model.layer4 = nn.Identity()
    model.fc = nn.Identity()
    if small_image_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model, 256


def _regnet(
    constructor: Callable[..., models.RegNet], small_image_stem: bool
) -> tuple[nn.Module, int]:
    model = constructor(weights=None)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if small_image_stem:
        # Keep the stem's width, drop its stride: 32px inputs keep a 2x2 map at the end (not 1x1).
        conv = model.stem[0]
        model.stem[0] = nn.Conv2d(
            3, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
    return model, feature_dim


@dataclass(frozen=True)
class ViTSize:
    hidden_dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int


# DeiT (Touvron et al. 2021, table 1): Tiny and Small.
VIT_SIZES = {
    "vit_tiny": ViTSize(hidden_dim=192, num_layers=12, num_heads=3, mlp_dim=768),
    "vit_small": ViTSize(hidden_dim=384, num_layers=12, num_heads=6, mlp_dim=1536),
}


def _vit(size: ViTSize, image_size: int, small_image_stem: bool) -> tuple[nn.Module, int]:
    patch_size = 4 if small_image_stem else 16
    if image_size % patch_size:
        raise ValueError(
            f"image_size {image_size} is not a multiple of the patch size {patch_size}"
        )
    model = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        hidden_dim=size.hidden_dim,
        mlp_dim=size.mlp_dim,
    )
    model.heads = nn.Identity()
    return model, size.hidden_dim


BACKBONES: dict[str, Callable[[bool, int], tuple[nn.Module, int]]] = {
    "resnet18": lambda small, _: _resnet(models.resnet18, small),
    "resnet50": lambda small, _: _resnet(models.resnet50, small),
    "resnet18_3stage": lambda small, _: _resnet18_3stage(small),
    "regnet_y_400mf": lambda small, _: _regnet(models.regnet_y_400mf, small),
    "regnet_y_1_6gf": lambda small, _: _regnet(models.regnet_y_1_6gf, small),
    "regnet_y_16gf": lambda small, _: _regnet(models.regnet_y_16gf, small),
    "vit_tiny": lambda small, size: _vit(VIT_SIZES["vit_tiny"], size, small),
    "vit_small": lambda small, size: _vit(VIT_SIZES["vit_small"], size, small),
}


def build_backbone(name: str, small_image_stem: bool = False, image_size: int = 224) -> Backbone:
    """A randomly initialised backbone by name (see ``BACKBONES``).

    small_image_stem: for 32px inputs (CIFAR) — a stride-1 3x3 stem for ResNets and
    RegNets (stride 2 for ``resnet18_3stage``), 4px patches for ViTs. image_size matters only for ViTs (position embeddings).
    """
    check_choice("backbone", name, BACKBONES)
    model, feature_dim = BACKBONES[name](small_image_stem, image_size)
    return Backbone(name, model, feature_dim)
