"""Every published default, pinned with the file it comes from: changing one fails here.

Each row: (what, the value in this project, the value in the authors' code, the source).
"""

from __future__ import annotations

import inspect

import pytest

from pipelines.config import OptimConfig
from pipelines.train.optim import LARS
from ssl_models import functional as F_ssl
from ssl_models.methods import METHODS, method_options

PUBLISHED = [
    # optimiser
    (
        "LARS trust coefficient (config default)",
        OptimConfig().lars_eta,
        0.001,
        "google-research/simclr lars_optimizer.py EETA_DEFAULT; facebookresearch/barlowtwins main.py LARS(eta=0.001)",
    ),
    (
        "LARS trust coefficient (class default)",
        inspect.signature(LARS).parameters["eta"].default,
        0.001,
        "google-research/simclr lars_optimizer.py EETA_DEFAULT",
    ),
    (
        "Barlow Twins biases/BN learning rate relative to the weights'",
        METHODS["barlow_twins"].bias_lr_ratio,
        0.0048 / 0.2,
        "facebookresearch/barlowtwins main.py --learning-rate-biases 0.0048, --learning-rate-weights 0.2",
    ),
    # SimCLR
    (
        "SimCLR temperature",
        method_options("simclr")["temperature"],
        0.1,
        "google-research/simclr run.py --temperature 0.1",
    ),
    (
        "SimCLR projection output dim",
        method_options("simclr")["proj_dim"],
        128,
        "google-research/simclr run.py --proj_out_dim 128",
    ),
    (
        "SimCLR projection hidden dim (None: the backbone's feature dim)",
        method_options("simclr")["proj_hidden_dim"],
        None,
        "google-research/simclr model_util.py projection_head mid_dim = hiddens.shape[-1]",
    ),
    # MoCo v3
    (
        "MoCo v3 temperature (None: 1.0 on a ResNet, 0.2 on a ViT)",
        method_options("mocov3")["temperature"],
        None,
        "facebookresearch/moco-v3 main_moco.py --moco-t 1.0; CONFIG.md ViT --moco-t=.2",
    ),
    (
        "MoCo v3 momentum",
        method_options("mocov3")["base_momentum"],
        0.99,
        "main_moco.py --moco-m 0.99",
    ),
    (
        "MoCo v3 output dim",
        method_options("mocov3")["proj_dim"],
        256,
        "main_moco.py --moco-dim 256",
    ),
    (
        "MoCo v3 MLP hidden dim",
        method_options("mocov3")["proj_hidden_dim"],
        4096,
        "main_moco.py --moco-mlp-dim 4096",
    ),
    # BYOL
    (
        "BYOL base EMA",
        method_options("byol")["base_momentum"],
        0.99,
        "deepmind-research byol/configs/byol.py _EMA_PRESETS (300 epochs: 0.99; 1000: 0.996)",
    ),
    (
        "BYOL projector hidden",
        method_options("byol")["proj_hidden_dim"],
        4096,
        "byol/configs/byol.py mlp_hidden_size 4096",
    ),
    (
        "BYOL projection dim",
        method_options("byol")["proj_dim"],
        256,
        "byol/configs/byol.py projection_size 256",
    ),
    # SimSiam
    (
        "SimSiam dim",
        method_options("simsiam")["proj_dim"],
        2048,
        "facebookresearch/simsiam main_simsiam.py --dim 2048",
    ),
    (
        "SimSiam predictor dim",
        method_options("simsiam")["pred_hidden_dim"],
        512,
        "main_simsiam.py --pred-dim 512",
    ),
    # Barlow Twins
    (
        "Barlow Twins lambda",
        method_options("barlow_twins")["lambda_offdiag"],
        0.0051,
        "facebookresearch/barlowtwins main.py --lambd 0.0051",
    ),
    (
        "Barlow Twins lambda (loss function default)",
        inspect.signature(F_ssl.barlow_twins).parameters["lambda_offdiag"].default,
        0.0051,
        "facebookresearch/barlowtwins main.py --lambd 0.0051",
    ),
    (
        "Barlow Twins projector",
        method_options("barlow_twins")["proj_dim"],
        8192,
        "barlowtwins main.py --projector 8192-8192-8192",
    ),
    # VICReg
    (
        "VICReg sim coeff",
        method_options("vicreg")["sim_coeff"],
        25.0,
        "facebookresearch/vicreg main_vicreg.py --sim-coeff 25.0",
    ),
    (
        "VICReg std coeff",
        method_options("vicreg")["std_coeff"],
        25.0,
        "main_vicreg.py --std-coeff 25.0",
    ),
    (
        "VICReg cov coeff",
        method_options("vicreg")["cov_coeff"],
        1.0,
        "main_vicreg.py --cov-coeff 1.0",
    ),
    (
        "VICReg projector",
        method_options("vicreg")["proj_dim"],
        8192,
        "main_vicreg.py --mlp 8192-8192-8192",
    ),
]


@pytest.mark.parametrize(
    ("what", "ours", "published", "source"), PUBLISHED, ids=[r[0] for r in PUBLISHED]
)
def test_published_default(what, ours, published, source):
    assert ours == pytest.approx(published) if published is not None else ours is None, (
        f"{what}: {ours!r} here, {published!r} in {source}"
    )
