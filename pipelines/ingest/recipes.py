"""View recipes as data: what each augmented view of an image is made of.

A `ViewSpec` holds the parameters of one view; a `ViewRecipe` is the tuple of
views a method trains on. Presets carry the published defaults:

- SimCLR (Chen et al. 2020, appendix A): crop scale (0.08, 1), flip 0.5, colour
  jitter strength s=1 -> (0.8, 0.8, 0.8, 0.2) at p=0.8, grayscale 0.2, Gaussian
  blur p=0.5 with sigma in (0.1, 2.0) and a kernel 10% of the image side; no blur
  on CIFAR-sized images (appendix B.9).
- BYOL (Grill et al. 2020, table 6): colour jitter (0.4, 0.4, 0.2, 0.1) at p=0.8,
  grayscale 0.2, blur p=1.0 / 0.1 and solarize p=0.0 / 0.2 for the two views.
- Multi-crop (SwAV, Caron et al. 2020, its `main_swav.py` defaults): 2 global
  crops with scale (0.14, 1) and N local crops with scale (0.05, 0.14), SimCLR
  colour distortion, blur p=0.5.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def blur_kernel_size(size: int) -> int:
    """SimCLR's Gaussian kernel side: 10% of the image side, made odd (23 at 224)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


@dataclass(frozen=True)
class ViewSpec:
    """Parameters of one augmented view; ranges are (low, high)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 0  # 0: SimCLR's 10% of `size`
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # on [0, 1] pixels, as torchvision's float solarize
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Values from YAML arrive as lists; keep the dataclass hashable and exact.
        for name in ("scale", "ratio", "blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.blur_kernel == 0:
            object.__setattr__(self, "blur_kernel", blur_kernel_size(self.size))
        _validate(self)


def _validate(spec: ViewSpec) -> None:
    def fail(name: str, message: str) -> None:
        raise ValueError(f"ViewSpec.{name}={getattr(spec, name)!r}: {message}")

    if not isinstance(spec.size, int) or spec.size < 1:
        fail("size", "must be a positive integer")
    for name in ("scale", "ratio", "blur_sigma"):
        low_high = getattr(spec, name)
        if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
            fail(name, "must be (low, high) with 0 < low <= high")
    if spec.scale[1] > 1.0:
        fail("scale", "the crop cannot cover more than the image (high <= 1)")
    for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        if not 0.0 <= getattr(spec, name) <= 1.0:
            fail(name, "is a probability, must be in [0, 1]")
    for name in ("brightness", "contrast", "saturation"):
        if getattr(spec, name) < 0:
            fail(name, "must be >= 0 (the factor is drawn from [max(0, 1-v), 1+v])")
    if not 0.0 <= spec.hue <= 0.5:
        fail("hue", "must be in [0, 0.5] (torchvision ColorJitter)")
    if spec.blur_kernel < 1 or spec.blur_kernel % 2 == 0:
        fail("blur_kernel", "must be a positive odd integer (0 for 10% of size)")
    if not 0.0 <= spec.solarize_threshold <= 1.0:
        fail("solarize_threshold", "must be in [0, 1]")
    for name in ("mean", "std"):
        if len(getattr(spec, name)) != 3:
            fail(name, "needs one value per RGB channel")
    if min(spec.std) <= 0:
        fail("std", "must be > 0")


@dataclass(frozen=True)
class ViewRecipe:
    """A named tuple of views; view i becomes column `view_i` of the dataset."""

    name: str
    views: tuple[ViewSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", tuple(self.views))
        if not self.views:
            raise ValueError(f"ViewRecipe {self.name!r}: needs at least one view")
        for i, view in enumerate(self.views):
            if not isinstance(view, ViewSpec):
                raise TypeError(f"ViewRecipe {self.name!r}: views[{i}] is not a ViewSpec")

    @property
    def columns(self) -> list[str]:
        return [f"view_{i}" for i in range(len(self.views))]


def simclr(size: int = 224) -> ViewRecipe:
    """SimCLR's two identical views; blur off at CIFAR scale (<= 64 px), per appendix B.9."""
    view = ViewSpec(size=size, blur_p=0.5 if size > 64 else 0.0)
    return ViewRecipe("simclr", (view, view))


def byol(size: int = 224) -> ViewRecipe:
    """BYOL's asymmetric pair (table 6): blur 1.0 / 0.1, solarize 0.0 / 0.2."""
    common = dict(size=size, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    return ViewRecipe(
        "byol",
        (
            ViewSpec(**common, blur_p=1.0, solarize_p=0.0),
            ViewSpec(**common, blur_p=0.1, solarize_p=0.2),
        ),
    )


def multicrop(global_size: int = 224, local_size: int = 96, n_local: int = 6) -> ViewRecipe:
    """SwAV multi-crop: 2 global crops, scale (0.14, 1); `n_local` local, scale (0.05, 0.14)."""
    if n_local < 0:
        raise ValueError(f"multicrop: n_local={n_local!r} must be >= 0")
    global_view = ViewSpec(size=global_size, scale=(0.14, 1.0))
    local_view = ViewSpec(size=local_size, scale=(0.05, 0.14))
    return ViewRecipe("multicrop", (global_view, global_view) + (local_view,) * n_local)


def _crop_only(size: int, scale: tuple[float, float], flip_p: float) -> ViewSpec:
    """A random resized crop and nothing photometric (masked and predictive methods)."""
    return ViewSpec(
        size=size, scale=scale, flip_p=flip_p, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0
    )


def mae(size: int = 224) -> ViewRecipe:
    """MAE's one view: RandomResizedCrop(scale=(0.2, 1.0)) and a horizontal flip, no colour
    (facebookresearch/mae ``main_pretrain.py`` ``transform_train``)."""
    return ViewRecipe("mae", (_crop_only(size, (0.2, 1.0), 0.5),))


def ijepa(size: int = 224) -> ViewRecipe:
    """I-JEPA's one view: a random resized crop of scale (0.3, 1.0), no flip, no colour
    (facebookresearch/ijepa ``configs/in1k_vith14_ep300.yaml``: crop_scale, use_horizontal_flip
    false, use_color_distortion false, use_gaussian_blur false)."""
    return ViewRecipe("ijepa", (_crop_only(size, (0.3, 1.0), 0.0),))


# The recipes by name: a builder takes the crop size first, then its own arguments
# (settable as overrides). Adding a recipe is one line here.
RECIPES: dict[str, Callable[..., ViewRecipe]] = {
    "simclr": simclr,
    "byol": byol,
    "multicrop": multicrop,
    "mae": mae,
    "ijepa": ijepa,
}
_SPEC_FIELDS = {f.name for f in dataclasses.fields(ViewSpec)}


def _replace(view: ViewSpec, changes: dict[str, Any]) -> ViewSpec:
    changes = dict(changes)
    if "size" in changes and "blur_kernel" not in changes:
        changes["blur_kernel"] = 0  # recompute SimCLR's 10% rule for the new size
    return dataclasses.replace(view, **changes)


def recipe_from_dict(name: str, size: int, overrides: dict[str, Any] | None = None) -> ViewRecipe:
    """A preset with overrides, e.g. from a YAML config.

    `overrides` maps ViewSpec field names to values applied to every view, and may
    hold `views: {index: {field: value}}` for one view only (e.g. BYOL's second
    view) and the builder's own arguments (for `multicrop`, `local_size` and
    `n_local` choose the local crops). Unknown keys are refused by name.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; accepted: {', '.join(sorted(RECIPES))}")
    builder = RECIPES[name]
    overrides = dict(overrides or {})
    per_view = overrides.pop("views", {}) or {}
    builder_params = list(inspect.signature(builder).parameters)[1:]  # after the size
    builder_args = {k: overrides.pop(k) for k in builder_params if k in overrides}
    unknown = sorted(set(overrides) - _SPEC_FIELDS)
    if unknown:
        raise ValueError(
            f"recipe {name!r}: unknown override(s) {unknown}; "
            f"allowed: {sorted(_SPEC_FIELDS | {'views', *builder_params})}"
        )
    recipe = builder(size, **builder_args)
    views = [_replace(v, overrides) for v in recipe.views]
    for index, view_overrides in per_view.items():
        i = int(index)
        if not 0 <= i < len(views):
            raise ValueError(f"recipe {name!r}: views.{index} out of range (0..{len(views) - 1})")
        bad = sorted(set(view_overrides) - _SPEC_FIELDS)
        if bad:
            raise ValueError(f"recipe {name!r}: views.{index}: unknown override(s) {bad}")
        views[i] = _replace(views[i], view_overrides)
    return ViewRecipe(name, tuple(views))
