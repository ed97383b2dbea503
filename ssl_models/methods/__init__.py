"""The methods, by family, and ``build_method`` to make one by name."""

from __future__ import annotations

import inspect
from typing import Any

from ssl_models.backbones import Backbone
from ssl_models.checks import check_choice
from ssl_models.methods.barlow_twins import BarlowTwins
from ssl_models.methods.base import (
    ANTI_COLLAPSE,
    Batch,
    JointEmbedding,
    Method,
    StepOutput,
    ViewEncoding,
)
from ssl_models.methods.byol import BYOL
from ssl_models.methods.ijepa import IJEPA
from ssl_models.methods.lvpredict import LatentPredictive
from ssl_models.methods.mae import MAE
from ssl_models.methods.mocov3 import MoCoV3
from ssl_models.methods.siamese import SiameseDistance
from ssl_models.methods.simclr import SimCLR
from ssl_models.methods.simsiam import SimSiam
from ssl_models.methods.vicreg import VICReg

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        SimCLR,
        MoCoV3,
        BYOL,
        SimSiam,
        BarlowTwins,
        VICReg,
        SiameseDistance,
        MAE,
        IJEPA,
        LatentPredictive,
    )
}


def method_options(name: str) -> dict[str, Any]:
    """The options a method accepts, with their defaults."""
    check_choice("method", name, METHODS)
    params = inspect.signature(METHODS[name].__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "backbone")}


def build_method(name: str, backbone: Backbone, **options: Any) -> Method:
    """A method by name around ``backbone``; unknown options are refused by name."""
    accepted = method_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {name!r} has no option {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}"
        )
    return METHODS[name](backbone, **options)


__all__ = [
    "ANTI_COLLAPSE",
    "Batch",
    "JointEmbedding",
    "METHODS",
    "Method",
    "StepOutput",
    "ViewEncoding",
    "build_method",
    "method_options",
]
