"""A plain Siamese distance energy with no anti-collapse mechanism: the cautionary baseline.

Minimising ||z(x) - z(y)||^2 alone is solved by a constant embedding (LeCun 2022,
"A Path Towards Autonomous Machine Intelligence", sec. 4.4); the test suite shows it
collapsing where SimCLR and VICReg do not.
"""

from __future__ import annotations

from ssl_models.backbones import Backbone
from ssl_models.heads import mlp
from ssl_models.methods.base import JointEmbedding, ViewEncoding


class SiameseDistance(JointEmbedding):
    name = "siamese"
    anti_collapse = "none"

    def __init__(
        self, backbone: Backbone, proj_hidden_dim: int = 2048, proj_dim: int = 128
    ) -> None:
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, [proj_hidden_dim], proj_dim)

    def encode(self, x):
        return ViewEncoding(self.projector(self.backbone(x)))

    def pair_loss(self, a: ViewEncoding, b: ViewEncoding):
        return self.pair_energy(a, b).mean()

    def pair_energy(self, a: ViewEncoding, b: ViewEncoding):
        return (a.embedding - b.embedding).pow(2).sum(dim=1)
