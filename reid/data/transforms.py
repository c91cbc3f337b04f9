"""Image transforms: one evaluation transform, and training augmentations configured in YAML.

The evaluation transform is defined once by :class:`Preprocess` (size, mean, std), stored in every checkpoint,
and used by validation, evaluation, prediction and the service alike. Training augmentations are albumentations
transforms listed in the config and run *before* the same resize/normalise tail, so train and eval tensors
differ only by the augmentations.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any

import albumentations as A
import timm
from albumentations.pytorch import ToTensorV2

from reid.errors import ConfigError

#: An augmentation is ``{"type": "<albumentations class>", **kwargs}``, e.g. ``{"type": "HorizontalFlip", "p": 0.5}``.
AugmentationSpec = dict[str, Any]


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the encoder's input tensor; travels with the checkpoint (like timm's pretrained_cfg)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def _tail(self) -> list[A.BasicTransform]:
        return [
            A.Resize(self.image_size, self.image_size),
            A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0),
            ToTensorV2(),
        ]

    def eval_transform(self) -> A.Compose:
        """The transform used everywhere an image is embedded for retrieval."""
        return A.Compose(self._tail())

    def train_transform(self, augmentations: list[AugmentationSpec]) -> A.Compose:
        """Augmentations from the config, then the evaluation tail."""
        return A.Compose([build_augmentation(spec, self.image_size) for spec in augmentations] + self._tail())

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, **{k: list(v) for k, v in asdict(self).items() if k != "image_size"}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocess":
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]))

    @classmethod
    def of_backbone(cls, backbone: str, image_size: int) -> "Preprocess":
        """The evaluation transform of a timm backbone at ``image_size``, from its name alone.

        The data module needs the model's preprocessing apart from the model, and building a network to read two
        triples would cost seconds: this resolves the pretrained config that ``timm.create_model`` attaches to the
        model (the registry's, for the name's pretrained tag or the architecture's default one; a Hugging Face hub
        model's own), so it equals :meth:`reid.model.Encoder.preprocess` (tested).
        """
        source, name = timm.models.parse_model_name(backbone)
        if source == "hf-hub":
            pretrained_cfg, _, _ = timm.models.load_model_config_from_hf(name)
        else:
            architecture, tag = timm.models.split_model_name_tag(name)
            pretrained_cfg = timm.models.resolve_pretrained_cfg(architecture, pretrained_cfg=tag or None).to_dict()
        config = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg)
        return cls(int(image_size), tuple(config["mean"]), tuple(config["std"]))


def build_augmentation(spec: AugmentationSpec, image_size: int) -> A.BasicTransform:
    """Instantiate one albumentations transform from its config entry.

    Transforms that need an output ``size`` (``RandomResizedCrop``, ``CenterCrop``...) get the model's image
    size when the config leaves it out, so the size is written in one place.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"data.augmentations: {spec!r} must be a mapping with a 'type' key, e.g. "
                          "{type: HorizontalFlip, p: 0.5}")
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    cls = getattr(A, str(spec["type"]), None)
    if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
        raise ConfigError(f"data.augmentations: unknown albumentations transform {spec['type']!r}")
    if "size" in inspect.signature(cls.__init__).parameters and "size" not in kwargs:
        kwargs["size"] = (image_size, image_size)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"data.augmentations: {spec!r}: {error}") from error
