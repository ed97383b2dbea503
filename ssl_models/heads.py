"""Projector and predictor MLPs, with the shapes each paper defines."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(
    in_dim: int,
    hidden_dims: Sequence[int],
    out_dim: int,
    *,
    last_bn: bool = False,
    last_bn_affine: bool = True,
    last_bn_center: bool = True,
    last_bias: bool = True,
) -> nn.Sequential:
    """Linear-BN-ReLU for each hidden layer, then a final Linear (optionally followed by BN).

    ``last_bn_center=False`` keeps the output BN's scale but fixes its shift at zero
    (SimCLR's ``center=False``).

    Paper shapes, as used by ``ssl_models.methods``:
    - SimCLR projector (Chen et al. 2020; google-research/simclr ``model_util.py``,
      ``projection_head``): d -> [d] -> 128, BN on every layer, the output's with a
      scale and no shift.
    - BYOL projector and predictor (Grill et al. 2020): d -> [4096] -> 256.
    - SimSiam projector (Chen & He 2021): d -> [2048, 2048] -> 2048, BN (no affine) on the
      output; predictor 2048 -> [512] -> 2048.
    - MoCo v3 (Chen et al. 2021; facebookresearch/moco-v3 ``moco/builder.py``): on a
      ResNet, projector d -> [4096] -> 256 with BN (no affine) on the output, predictor
      256 -> [4096] -> 256 without one (``MoCo_ResNet``); on a ViT, projector
      d -> [4096, 4096] -> 256 and a predictor with the output BN (``MoCo_ViT``).
    - Barlow Twins (Zbontar et al. 2021) and VICReg (Bardes et al. 2022):
      d -> [8192, 8192] -> 8192.
    """
    if in_dim <= 0 or out_dim <= 0 or any(h <= 0 for h in hidden_dims):
        raise ValueError(
            f"mlp: dimensions must be positive, got {in_dim}, {list(hidden_dims)}, {out_dim}"
        )
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden_dims]
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], out_dim, bias=last_bias and not last_bn))
    if last_bn:
        norm = nn.BatchNorm1d(out_dim, affine=last_bn_affine)
        if last_bn_affine and not last_bn_center:
            norm.bias.requires_grad_(False)  # stays at its initial zero
        layers.append(norm)
    return nn.Sequential(*layers)
