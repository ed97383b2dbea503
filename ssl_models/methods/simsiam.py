"""SimSiam (Chen & He 2021): a predictor and a stop-gradient alone prevent collapse."""

from __future__ import annotations

from ssl_models import functional as F_ssl
from ssl_models.backbones import Backbone
from ssl_models.heads import mlp
from ssl_models.methods.base import JointEmbedding, ViewEncoding, cosine_energy


class SimSiam(JointEmbedding):
    name = "simsiam"
    anti_collapse = "predictor + stop-gradient"

    def __init__(
        self,
        backbone: Backbone,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 2048,
        pred_hidden_dim: int = 512,
    ) -> None:
        super().__init__(backbone)
        # Official code: the output BN has no affine parameters (BatchNorm1d(dim, affine=False)).
        self.projector = mlp(
            backbone.feature_dim,
            [proj_hidden_dim, proj_hidden_dim],
            proj_dim,
            last_bn=True,
            last_bn_affine=False,
        )
        self.predictor = mlp(proj_dim, [pred_hidden_dim], proj_dim)

    def encode(self, x):
        z = self.projector(self.backbone(x))
        return ViewEncoding(z, prediction=self.predictor(z), target=z.detach())

    def directed_loss(self, query: ViewEncoding, target: ViewEncoding):
        return F_ssl.negative_cosine(query.prediction, target.target) / 2

    def pair_loss(self, a: ViewEncoding, b: ViewEncoding):
        # D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2 (Algorithm 1).
        return self.directed_loss(a, b) + self.directed_loss(b, a)

    def pair_energy(self, a: ViewEncoding, b: ViewEncoding):
        return cosine_energy(a.prediction, b.target)
