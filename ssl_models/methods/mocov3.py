"""MoCo v3 (Chen, Xie & He 2021): contrastive against an EMA encoder's keys, plus a predictor.

Heads and temperature follow facebookresearch/moco-v3 by backbone family: ``MoCo_ResNet``
(``moco/builder.py``: 2-layer projector, 2-layer predictor without an output BN; ``main_moco.py``
``--moco-t`` default 1.0) for convolutional backbones, ``MoCo_ViT`` (3-layer projector,
predictor with the output BN; CONFIG.md ``--moco-t=.2``) for ViTs.
"""

from __future__ import annotations

from torch import nn

from ssl_models import functional as F_ssl
from ssl_models.backbones import Backbone, is_vit
from ssl_models.distributed import gather_no_grad, rank
from ssl_models.ema import EMATeacher
from ssl_models.heads import mlp
from ssl_models.methods.base import JointEmbedding, ViewEncoding, cosine_energy


class MoCoV3(JointEmbedding):
    name = "mocov3"
    anti_collapse = "negatives"

    def __init__(
        self,
        backbone: Backbone,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        temperature: float | None = None,
        base_momentum: float = 0.99,
        gather: bool = True,
        proj_layers: int | None = None,
    ) -> None:
        """``temperature`` and ``proj_layers`` None: the authors' value for the backbone's
        family (ResNet: 1.0 and 2; ViT: 0.2 and 3)."""
        super().__init__(backbone)
        vit = is_vit(backbone)
        layers = proj_layers or (3 if vit else 2)
        if layers < 1:
            raise ValueError(f"mocov3: proj_layers={proj_layers!r} must be >= 1")
        self.projector = mlp(
            backbone.feature_dim,
            [proj_hidden_dim] * (layers - 1),
            proj_dim,
            last_bn=True,
            last_bn_affine=False,
        )
        self.predictor = mlp(
            proj_dim, [pred_hidden_dim], proj_dim, last_bn=vit, last_bn_affine=False
        )
        temperature = temperature if temperature is not None else (0.2 if vit else 1.0)
        self.teacher = EMATeacher(nn.Sequential(backbone, self.projector), base_momentum)
        self.temperature = temperature
        self.gather = gather

    def encode(self, x):
        z = self.projector(self.backbone(x))
        return ViewEncoding(z, prediction=self.predictor(z), target=self.teacher(x))

    def directed_loss(self, query: ViewEncoding, target: ViewEncoding):
        keys = gather_no_grad(target.target) if self.gather else target.target
        offset = rank() * query.prediction.shape[0] if self.gather else 0
        return F_ssl.info_nce(query.prediction, keys, self.temperature, offset)

    def pair_loss(self, a: ViewEncoding, b: ViewEncoding):
        return self.directed_loss(a, b) + self.directed_loss(b, a)

    def pair_energy(self, a: ViewEncoding, b: ViewEncoding):
        return cosine_energy(a.prediction, b.target)

    def update_teacher(self, progress: float) -> None:
        self.teacher.update(nn.Sequential(self.backbone, self.projector), progress)
