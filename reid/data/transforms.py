"""Image transforms: one evaluation transform, and training augmentations configured in YAML.

The evaluation transform is defined once by :class:`Preprocess` (size, mean, std, test-time zoom crops), stored
in every checkpoint, and used by validation, evaluation, prediction and the service alike. Training augmentations
are albumentations transforms listed in the config and run *before* the same resize, so train and eval tensors
differ only by the augmentations; training batches are normalised on the device (:class:`PixelNormaliser`),
to the same values as the evaluation transform's (tested).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import albumentations as A
import numpy as np
import timm
import torch
from albumentations.pytorch import ToTensorV2

from reid.errors import ConfigError

#: An augmentation is ``{"type": "<albumentations class>", **kwargs}``, e.g. ``{"type": "HorizontalFlip", "p": 0.5}``.
AugmentationSpec = dict[str, Any]


def centre_crop(image: np.ndarray, fraction: float) -> np.ndarray:
    """The middle ``fraction`` of an image's height and width (at least one pixel of each)."""
    height, width = image.shape[:2]
    crop_height, crop_width = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return image[top: top + crop_height, left: left + crop_width]


class EvalViews:
    """The evaluation transform: a photo and its centre crops, each through the resize/normalise tail.

    Called like an albumentations transform (``transform(image=array)["image"]``), so that
    :class:`reid.data.dataset.Photos` serves training and evaluation alike; the result is a ``V x 3 x H x W`` tensor,
    the whole photo first. :func:`reid.model.embed_views` turns it into one embedding.
    """

    def __init__(self, tail: A.Compose, crops: tuple[float, ...]) -> None:
        self.tail, self.crops = tail, crops

    def __call__(self, *, image: np.ndarray) -> dict[str, torch.Tensor]:
        whole = self.tail(image=image)["image"]
        if not self.crops:
            return {"image": whole.unsqueeze(0)}
        crops = [self.tail(image=centre_crop(image, fraction))["image"] for fraction in self.crops]
        # numpy stacks in this thread; torch.stack would wait for its OpenMP pool (reid.inference.Embedder.embed)
        return {"image": torch.from_numpy(np.stack([view.numpy() for view in [whole, *crops]]))}


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the encoder's input tensor; travels with the checkpoint (like timm's pretrained_cfg).

    ``crops`` is test-time zoom: centre crops (fractions of the photo's height and width) embedded beside the whole
    photo, the photo's embedding being the normalised mean of them all. A turtle photographed from afar fills a
    small part of the frame; its crop meets the close-ups of the gallery at their scale. On turtles_dev a crop of
    0.5 raised similarity MAP@5 by 0.023 over five runs (up in 4), but lowered the held-out balanced accuracy of
    verified answers in all five (docs/results.md), so it is off unless configured. It costs one forward pass a crop.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crops: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1 for f in self.crops):
            raise ConfigError(f"test crops must be fractions in (0, 1) of the photo's sides, got {list(self.crops)}")

    def _tail(self, normalise: bool = True) -> list[A.BasicTransform]:
        scale = [A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0)] if normalise else []
        return [A.Resize(self.image_size, self.image_size), *scale, ToTensorV2()]

    def eval_transform(self) -> EvalViews:
        """The transform used everywhere an image is embedded for retrieval: ``V x 3 x H x W`` views."""
        return EvalViews(A.Compose(self._tail()), self.crops)

    def train_transform(self, augmentations: list[AugmentationSpec]) -> A.Compose:
        """Augmentations from the config, then the evaluation tail's resize: ``3 x H x W`` uint8 tensors, which the
        training step normalises on the device (:meth:`pixel_normaliser`).

        Why not normalise in the loader, as evaluation does: a training batch then crosses from the workers to the
        GPU (shared memory, pinning, the host-to-device copy) as a quarter of the bytes of float32, and the
        workers, which limit how fast a GPU trains (BENCHMARKS.md, "GPU check"), skip a pass over every pixel.
        """
        augmented = [build_augmentation(spec, self.image_size) for spec in augmentations]
        return A.Compose(augmented + self._tail(normalise=False))

    def pixel_normaliser(self) -> "PixelNormaliser":
        """The module that normalises the training transform's uint8 batches on their device."""
        return PixelNormaliser(self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, **{k: list(v) for k, v in asdict(self).items() if k != "image_size"}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocess":
        """A checkpoint stored before test-time zoom existed embeds the whole photo alone."""
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]),
                   tuple(float(f) for f in data.get("crops", ())))

    @classmethod
    def of_backbone(cls, backbone: str, image_size: int, crops: tuple[float, ...] = ()) -> "Preprocess":
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
        return cls(int(image_size), tuple(config["mean"]), tuple(config["std"]), tuple(crops))


class PixelNormaliser(torch.nn.Module):
    """uint8 pixels (``N x 3 x H x W``) as float32, normalised as the evaluation transform does.

    The statistics are buffers (not saved in checkpoints), so they move to the GPU with the model once: a tensor
    built from Python numbers at every step would be a host-to-device copy that makes the CPU wait for the GPU.
    """

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("scale", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"PixelNormaliser takes uint8 pixels (the training transform's), got {images.dtype}")
        return (images.float() - self.shift) / self.scale


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
    # albumentations only warns about an argument it does not know and builds the transform with its default:
    # a misspelt `blur_limt` would train silently with another blur than the config says.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"Argument\(s\) .* are not valid for transform")
        try:
            return cls(**kwargs)
        except UserWarning as warning:
            raise ConfigError(f"data.augmentations: {spec!r}: {warning} (a misspelt argument?)") from None
        except (TypeError, ValueError) as error:
            raise ConfigError(f"data.augmentations: {spec!r}: {error}") from error
