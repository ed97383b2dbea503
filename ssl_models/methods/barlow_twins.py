"""Barlow Twins (Zbontar et al. 2021): regularised; the cross-correlation is pulled to identity."""

from __future__ import annotations

from ssl_models import functional as F_ssl
from ssl_models.backbones import Backbone
from ssl_models.distributed import gather_pair
from ssl_models.heads import mlp
from ssl_models.methods.base import JointEmbedding, ViewEncoding


class BarlowTwins(JointEmbedding):
    name = "barlow_twins"
    anti_collapse = "regulariser"
    # facebookresearch/barlowtwins main.py: biases and BN parameters learn at
    # --learning-rate-biases 0.0048 against --learning-rate-weights 0.2.
    bias_lr_ratio = 0.0048 / 0.2

    def __init__(
        self,
        backbone: Backbone,
        proj_hidden_dim: int = 8192,
        proj_dim: int = 8192,
        lambda_offdiag: float = 0.0051,  # facebookresearch/barlowtwins main.py --lambd
        gather: bool = True,
    ) -> None:
        super().__init__(backbone)
        self.projector = mlp(
            backbone.feature_dim, [proj_hidden_dim, proj_hidden_dim], proj_dim, last_bias=False
        )
        self.lambda_offdiag = lambda_offdiag
        self.gather = gather

    def encode(self, x):
        return ViewEncoding(self.projector(self.backbone(x)))

    def pair_loss(self, a: ViewEncoding, b: ViewEncoding):
        z1, z2 = gather_pair(a.embedding, b.embedding, self.gather)
        return F_ssl.barlow_twins(z1, z2, self.lambda_offdiag)

    def pair_energy(self, a: ViewEncoding, b: ViewEncoding):
        # The invariance term per pair: mean squared distance of batch-standardised embeddings.
        s1, s2 = F_ssl.batch_standardise(a.embedding), F_ssl.batch_standardise(b.embedding)
        return (s1 - s2).pow(2).mean(dim=1)
