"""BYOL (Grill et al. 2020): an online predictor chases an EMA target; no negatives."""

from __future__ import annotations

from torch import nn

from ssl_models import functional as F_ssl
from ssl_models.backbones import Backbone
from ssl_models.ema import EMATeacher
from ssl_models.heads import mlp
from ssl_models.methods.base import JointEmbedding, ViewEncoding, cosine_energy


class BYOL(JointEmbedding):
    name = "byol"
    anti_collapse = "EMA teacher"
    recipe = "byol"  # asymmetric blur and solarisation (Grill et al. 2020, table 6)

    def __init__(
        self,
        backbone: Backbone,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        base_momentum: float = 0.99,
    ) -> None:
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, [proj_hidden_dim], proj_dim)
        self.predictor = mlp(proj_dim, [pred_hidden_dim], proj_dim)
        self.teacher = EMATeacher(nn.Sequential(backbone, self.projector), base_momentum)

    def encode(self, x):
        z = self.projector(self.backbone(x))
        return ViewEncoding(z, prediction=self.predictor(z), target=self.teacher(x))

    def directed_loss(self, query: ViewEncoding, target: ViewEncoding):
        # 2 - 2 cos(q, z') (eq. 2).
        return 2 + 2 * F_ssl.negative_cosine(query.prediction, target.target)

    def pair_loss(self, a: ViewEncoding, b: ViewEncoding):
        # Symmetrised (eq. 3).
        return self.directed_loss(a, b) + self.directed_loss(b, a)

    def pair_energy(self, a: ViewEncoding, b: ViewEncoding):
        return 2 * cosine_energy(a.prediction, b.target)

    def update_teacher(self, progress: float) -> None:
        self.teacher.update(nn.Sequential(self.backbone, self.projector), progress)
