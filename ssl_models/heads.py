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
    last_bias: bool = True,
) -> nn.Sequential:
    """Linear-BN-ReLU for each hidden layer, then a final Linear (optionally followed by BN).

    Paper shapes, as used by ``ssl_models.methods``:
    - SimCLR projector (Chen et al. 2020): d -> [2048] -> 128.
    - BYOL projector and predictor (Grill et al. 2020): d -> [4096] -> 256.
    - SimSiam projector (Chen & He 2021): d -> [2048, 2048] -> 2048, BN (no affine) on the
      output; predictor 2048 -> [512] -> 2048.
    - MoCo v3 (Chen et al. 2021): projector d -> [4096, 4096] -> 256 with BN (no affine)
      on the output; predictor 256 -> [4096] -> 256.
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
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)
