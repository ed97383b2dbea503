"""SimCLR (Chen et al. 2020): contrastive; the other 2N - 2 views in the batch are negatives."""

from __future__ import annotations

from ssl_models import functional as F_ssl
from ssl_models.backbones import Backbone
from ssl_models.distributed import gather_pair
from ssl_models.heads import mlp
from ssl_models.methods.base import JointEmbedding, ViewEncoding


class SimCLR(JointEmbedding):
    name = "simclr"
    anti_collapse = "negatives"

    def __init__(
        self,
        backbone: Backbone,
        proj_hidden_dim: int | None = None,
        proj_dim: int = 128,
        temperature: float = 0.1,
        gather: bool = True,
    ) -> None:
        """``proj_hidden_dim`` None: the backbone's feature dimension (google-research/simclr
        ``model_util.py``, ``projection_head``: ``mid_dim = hiddens.shape[-1]``); every layer
        has BN, the output's a scale without a shift (``center=False``: no bias)."""
        super().__init__(backbone)
        hidden = proj_hidden_dim or backbone.feature_dim
        self.projector = mlp(
            backbone.feature_dim,
            [hidden],
            proj_dim,
            last_bn=True,
            last_bn_center=False,
        )
        self.temperature = temperature
        self.gather = gather

    def encode(self, x):
        return ViewEncoding(self.projector(self.backbone(x)))

    def pair_loss(self, a: ViewEncoding, b: ViewEncoding):
        z1, z2 = gather_pair(a.embedding, b.embedding, self.gather)
        return F_ssl.nt_xent(z1, z2, self.temperature)
