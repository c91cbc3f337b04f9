"""The encoder: a timm backbone and a SimCLR projection head; its starting weights come from :mod:`reid.weights`.

Retrieval uses the L2-normalised *backbone* feature by default (SimCLR's finding: the representation before
the projection head transfers better); ``embedding: projection`` uses the head's output instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from reid.data.transforms import Preprocess
from reid.errors import ConfigError
from reid.weights import create_backbone

EmbeddingSource = Literal["backbone", "projection"]


def embed_views(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """One L2-normalised embedding a photo from its ``B x V x 3 x H x W`` views (:class:`Preprocess`'s crops): the
    normalised mean of the views' embeddings, all views going through ``embed`` in one batch. A single view is
    returned as ``embed`` gave it, so checkpoints without crops embed exactly as before."""
    batch, views = images.shape[:2]
    embeddings = embed(images.flatten(0, 1))
    if views == 1:
        return embeddings
    return F.normalize(embeddings.reshape(batch, views, -1).mean(dim=1), dim=1)


class Encoder(nn.Module):
    """timm backbone → pooled features (the retrieval embedding) → SimCLR projection head (for the loss).

    ``image_size`` is the input size the encoder will see: ViT-like backbones are built for it (see
    :func:`reid.weights.create_backbone`); ``None`` keeps timm's default.
    """

    def __init__(self, backbone: str = "resnet50", pretrained: bool | str = False, projection_dim: int = 128,
                 embedding: EmbeddingSource = "backbone", image_size: int | None = None) -> None:
        super().__init__()
        if embedding not in ("backbone", "projection"):
            raise ConfigError(f"model.embedding must be 'backbone' or 'projection', got {embedding!r}")
        self.backbone = create_backbone(backbone, pretrained, image_size)
        # timm: models with a pre-logits head (LCNet, MobileNetV3) output head_hidden_size, others num_features.
        features = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        # SimCLR (Chen et al., 2020) head: Linear-ReLU-Linear; the loss sees its output, retrieval does not.
        self.projection = nn.Sequential(
            nn.Linear(features, features), nn.ReLU(inplace=True), nn.Linear(features, projection_dim)
        )
        self.embedding = embedding
        self.embedding_dim = projection_dim if embedding == "projection" else features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (backbone features, projections) for a batch."""
        features = self.backbone(images)
        return features, self.projection(features)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The L2-normalised retrieval embedding: what the gallery stores and queries compare against."""
        features, projections = self(images)
        vectors = projections if self.embedding == "projection" else features
        return F.normalize(vectors.float(), dim=1)

    def preprocess(self, image_size: int, crops: tuple[float, ...] = ()) -> Preprocess:
        """The evaluation transform for this backbone: its own mean/std (timm's pretrained_cfg) at ``image_size``.

        :meth:`Preprocess.of_backbone` gives the same from the backbone's name without building it (tested).
        """
        config = timm.data.resolve_data_config({}, model=self.backbone)
        return Preprocess(int(image_size), tuple(config["mean"]), tuple(config["std"]), tuple(crops))
