"""MoCo v3 (Chen, Xie & He 2021): contrastive against an EMA encoder's keys, plus a predictor."""

from __future__ import annotations

from torch import nn

from ssl_models import functional as F_ssl
from ssl_models.backbones import Backbone
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
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        gather: bool = True,
    ) -> None:
        super().__init__(backbone)
        self.projector = mlp(
            backbone.feature_dim,
            [proj_hidden_dim, proj_hidden_dim],
            proj_dim,
            last_bn=True,
            last_bn_affine=False,
        )
        self.predictor = mlp(
            proj_dim, [pred_hidden_dim], proj_dim, last_bn=True, last_bn_affine=False
        )
        self.teacher = EMATeacher(nn.Sequential(backbone, self.projector), base_momentum)
        self.temperature = temperature
        self.gather = gather

    def encode(self, x):
        z = self.projector(self.backbone(x))
        return ViewEncoding(z, prediction=self.predictor(z), target=self.teacher(x))

    def pair_loss(self, a: ViewEncoding, b: ViewEncoding):
        def contrast(q, k):
            keys = gather_no_grad(k) if self.gather else k
            offset = rank() * q.shape[0] if self.gather else 0
            return F_ssl.info_nce(q, keys, self.temperature, offset)

        return contrast(a.prediction, b.target) + contrast(b.prediction, a.target)

    def pair_energy(self, a: ViewEncoding, b: ViewEncoding):
        return cosine_energy(a.prediction, b.target)

    def update_teacher(self, progress: float) -> None:
        self.teacher.update(nn.Sequential(self.backbone, self.projector), progress)
