"""VICReg (Bardes et al. 2022): regularised; variance and covariance terms keep energy high off-pair."""

from __future__ import annotations

from ssl_models import functional as F_ssl
from ssl_models.backbones import Backbone
from ssl_models.distributed import gather_pair
from ssl_models.heads import mlp
from ssl_models.methods.base import JointEmbedding, ViewEncoding


class VICReg(JointEmbedding):
    name = "vicreg"
    anti_collapse = "regulariser"

    def __init__(
        self,
        backbone: Backbone,
        proj_hidden_dim: int = 8192,
        proj_dim: int = 8192,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        gather: bool = True,
    ) -> None:
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, [proj_hidden_dim, proj_hidden_dim], proj_dim)
        self.coeffs = {"sim_coeff": sim_coeff, "std_coeff": std_coeff, "cov_coeff": cov_coeff}
        self.gather = gather

    def encode(self, x):
        return ViewEncoding(self.projector(self.backbone(x)))

    def pair_loss(self, a: ViewEncoding, b: ViewEncoding):
        z1, z2 = gather_pair(a.embedding, b.embedding, self.gather)
        return F_ssl.vicreg(z1, z2, **self.coeffs)

    def pair_energy(self, a: ViewEncoding, b: ViewEncoding):
        return (a.embedding - b.embedding).pow(2).mean(dim=1)
