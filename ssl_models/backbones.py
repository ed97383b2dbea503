"""Backbones from torchvision, classifier removed, each stating its feature dimension.

``Backbone.model`` is the torchvision model itself with its classifier set to
``nn.Identity()``, so ``backbone.model.state_dict()`` loads with ``strict=True`` into
``build_backbone(same name, same options).model`` and, for the standard stem, into the
plain torchvision constructor with the classifier replaced.

ViTs also give their tokens (``Backbone.tokens``), optionally for a subset of the patches
(MAE-style patch dropping), for masked and predictive methods. Their position embeddings
are fixed 2D sin-cos (``ssl_models.patches.sincos_2d``), as MAE's and I-JEPA's: the
parameter ``encoder.pos_embedding`` keeps its name and shape (so state_dicts load
strictly, older checkpoints included) but holds sin-cos values and has
``requires_grad=False``. A checkpoint saved when it was learned loads its learned values,
which then stay frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models
from torchvision.models.vision_transformer import VisionTransformer

from ssl_models.checks import check_choice
from ssl_models.patches import sincos_2d

POOLS = ("cls", "mean")


class Backbone(nn.Module):
    """A feature extractor: (N, 3, H, W) images -> (N, feature_dim) features.

    For a ViT, ``patch_size`` (pixels) and ``num_patches`` (T, the patch grid's side
    squared) say how ``tokens`` cuts an image; both are None for convolutional backbones.
    ``pool`` is a ViT's feature: ``cls``, the class token (torchvision's forward, MAE's
    linear probe), or ``mean``, the mean of the patch tokens (I-JEPA's evaluation,
    Assran et al. 2023, sec. 5: its encoder has no class token to train).
    """

    def __init__(self, name: str, model: nn.Module, feature_dim: int, pool: str = "cls") -> None:
        super().__init__()
        check_choice("pool", pool, POOLS)
        self.name = name
        self.model = model
        self.feature_dim = feature_dim
        self.patch_size: int | None = None
        self.num_patches: int | None = None
        if isinstance(model, VisionTransformer):
            self.patch_size = model.patch_size
            self.num_patches = (model.image_size // model.patch_size) ** 2
        elif pool != "cls":
            raise ValueError(f"backbone {name}: pool {pool!r} needs a ViT backbone")
        self.pool = pool

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"backbone {self.name}: images must have shape (N, 3, H, W), got {tuple(images.shape)}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        if self.pool == "mean":
            return self.tokens(images)[:, 1:].mean(dim=1)
        return self.model(images)

    def tokens(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output tokens, class token first: (N, 1 + T, D), or (N, 1 + K, D)
        when ``keep`` (N, K) long indices into the T patches (row-major grid) is given.

        MAE's encoder (He et al. 2022; facebookresearch/mae ``models_mae.py``,
        ``forward_encoder``): patchify, add the position embeddings, keep only the
        patches in ``keep`` (the encoder then runs on K + 1 tokens), prepend the class
        token plus its position embedding, then the encoder layers and the final
        LayerNorm. Without ``keep`` this is torchvision's ``VisionTransformer`` forward
        before its head: ``tokens(images)[:, 0] == backbone(images)``. Only the weights
        of ``model`` are used, so its ``state_dict`` is the same either way.
        """
        self._check_images(images)
        vit = self.model
        if not isinstance(vit, VisionTransformer):
            raise ValueError(
                f"backbone {self.name} has no token interface: use a ViT backbone "
                f"({', '.join(sorted(VIT_SIZES))})"
            )
        encoder = vit.encoder
        position = encoder.pos_embedding  # (1, 1 + T, D), the class token's first
        patches = vit._process_input(images) + position[:, 1:]  # (N, T, D)
        n, num_patches, dim = patches.shape
        if keep is not None:
            if keep.ndim != 2 or keep.shape[0] != n or keep.dtype != torch.long:
                raise ValueError(
                    f"backbone {self.name}: keep must be (N={n}, K) long indices into the "
                    f"{num_patches} patches, got {tuple(keep.shape)} {keep.dtype}"
                )
            patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, dim))
        class_token = (vit.class_token + position[:, :1]).expand(n, -1, -1)
        x = torch.cat([class_token, patches], dim=1)
        return encoder.ln(encoder.layers(encoder.dropout(x)))


def is_vit(backbone: Backbone) -> bool:
    """A vision transformer (patch tokens), as opposed to a convolutional network."""
    return backbone.patch_size is not None


def visible_patches(mask: torch.Tensor) -> torch.Tensor:
    """The indices of the visible patches of each row, in grid order: (N, T) bool mask
    (True = hidden) -> (N, K) long, the ``keep`` of ``Backbone.tokens``.

    Every row must hide the same number of patches (MAE's random masking does), so that
    the kept tokens form one (N, K) batch.
    """
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be (N, T) bool, got {tuple(mask.shape)} {mask.dtype}")
    visible = (~mask).sum(dim=1)
    if mask.shape[0] and bool((visible != visible[0]).any()):
        raise ValueError(
            f"every row of the mask must hide as many patches; visible per row: {visible.tolist()}"
        )
    kept = int(visible[0]) if mask.shape[0] else 0
    # A stable sort puts the visible (False) patches first, each row in grid order.
    return torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, :kept]


def hidden_patches(mask: torch.Tensor) -> torch.Tensor:
    """The indices of the hidden patches of each row, in grid order: (N, T) bool mask
    (True = hidden) -> (N, T - K) long; the complement of ``visible_patches``."""
    return visible_patches(~mask)


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
    stage is dropped: the step time of ResNet-18 with the ImageNet stem buys 4x its
    spatial resolution (the figures: docs/RESULTS.md).
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
    # Fixed 2D sin-cos positions, zeros for the class token (MAE models_mae.py
    # initialize_weights; I-JEPA the same, without class token).
    position = model.encoder.pos_embedding
    position.data.copy_(sincos_2d(size.hidden_dim, image_size // patch_size, class_token=True))
    position.requires_grad_(False)
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


def build_backbone(
    name: str, small_image_stem: bool = False, image_size: int = 224, pool: str = "cls"
) -> Backbone:
    """A randomly initialised backbone by name (see ``BACKBONES``); ``pool``: see ``Backbone``.

    small_image_stem: for 32px inputs (CIFAR) — a stride-1 3x3 stem for ResNets and
    RegNets (stride 2 for ``resnet18_3stage``), 4px patches for ViTs. image_size matters only for ViTs (position embeddings).
    """
    check_choice("backbone", name, BACKBONES)
    model, feature_dim = BACKBONES[name](small_image_stem, image_size)
    return Backbone(name, model, feature_dim, pool)
