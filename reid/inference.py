"""Load a trained encoder from its checkpoint and embed images with it.

A checkpoint written by :class:`reid.module.ReIDModule` carries, under the ``"reid"`` key, everything needed to
embed an image the same way later (backbone name, preprocessing, embedding choice, the calibrated new_turtle
threshold, the training config and the package version), so no config file has to travel beside it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import reid
from reid.data.dataset import PhotoLoader, Photos
from reid.data.transforms import EvalViews, Preprocess
from reid.errors import CheckpointError, require
from reid.fileio import atomic_target
from reid.metrics import THRESHOLD_OBJECTIVES, ThresholdObjective
from reid.model import Encoder, embed_views
from reid.onnx_backend import BACKENDS, Backend, OnnxEncoder
from reid.verification import CHECKPOINT_FIELD as VERIFICATION_FIELD
from reid.verification import Verification
from reid.weights import load_tensors

CHECKPOINT_KEY = "reid"
#: DataLoader workers decoding files for bulk embedding: enough to keep a CPU forward pass fed on a laptop or a
#: small server without starting more processes than cores.
BULK_WORKERS = 4


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file (tensors and plain values only: no code from the file is executed)."""
    path = Path(path).expanduser()
    if path.is_dir():
        # the places `reid fit` writes to, not a walk of the whole tree (the folder might be a home or "/")
        found = sorted((found for pattern in ("*.ckpt", "checkpoints/*.ckpt", "*/checkpoints/*.ckpt",
                                              "lightning_logs/*/checkpoints/*.ckpt")
                        for found in path.glob(pattern)), key=lambda found: (found.name == "best.ckpt", found))
        raise CheckpointError(f"checkpoint {path} is a folder: give the checkpoint file"
                              + (f", e.g. {found[-1]}" if found else " (reid fit writes .../checkpoints/best.ckpt)"))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    checkpoint = load_tensors(path, lambda reason: CheckpointError(f"cannot read checkpoint {path}: {reason}"))
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a turtle-reid checkpoint (no '{CHECKPOINT_KEY}' metadata); "
                              "train one with `reid fit`")
    return checkpoint


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of the encoder weights: identifies which model made an embedding.

    Hashing weights rather than the file keeps the fingerprint stable when only metadata (such as the
    calibrated threshold) is rewritten.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def checkpoint_metadata(encoder: Encoder, preprocess: Preprocess, backbone: str, projection_dim: int,
                        config: dict[str, Any] | None = None, threshold: float | None = None,
                        threshold_origin: str | None = None, runner_up_weight: float = 0.0,
                        threshold_objective: ThresholdObjective = "map5") -> dict[str, Any]:
    """The ``reid`` entry of a checkpoint: everything :meth:`Embedder.from_checkpoint` needs, as plain values."""
    return {
        "format": 1,
        "version": reid.__version__,
        "backbone": backbone,
        "projection_dim": int(projection_dim),
        "embedding": encoder.embedding,
        "embedding_dim": int(encoder.embedding_dim),
        "preprocess": preprocess.to_dict(),
        "threshold": threshold,
        "threshold_origin": threshold_origin,
        "runner_up_weight": float(runner_up_weight),
        "threshold_objective": threshold_objective,
        "config": config or {},
    }


def export_encoder(path: str | Path, backbone: str, pretrained: bool | str, image_size: int,
                   projection_dim: int = 128, embedding: str = "backbone") -> Path:
    """Write an untrained encoder (e.g. frozen ImageNet features) as a checkpoint every command accepts.

    This is how a baseline is evaluated, enrolled or served exactly like a fine-tuned model.
    """
    encoder = Encoder(backbone, pretrained, projection_dim, embedding, image_size=image_size)
    meta = checkpoint_metadata(encoder, encoder.preprocess(image_size), backbone, projection_dim,
                               config={"model": {"backbone": backbone, "pretrained": str(pretrained),
                                                 "image_size": image_size, "embedding": embedding}})
    path = Path(path).expanduser()
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    with atomic_target(path) as temporary:
        torch.save({"state_dict": state, CHECKPOINT_KEY: meta}, temporary)
    return path


def write_checkpoint_metadata(path: str | Path, **updates: Any) -> None:
    """Update values in a checkpoint's ``reid`` metadata (e.g. the calibrated threshold), atomically."""
    path = Path(path).expanduser()
    checkpoint = read_checkpoint(path)
    checkpoint[CHECKPOINT_KEY].update(updates)
    with atomic_target(path) as temporary:
        torch.save(checkpoint, temporary)


def _rgb_array(image: Any) -> np.ndarray:
    """An in-memory photo as the ``H x W x 3`` uint8 RGB array the transform takes. A PIL image is converted as the
    file decoder converts a file (:func:`reid.imageio.rgb_array_of`); an array of another shape or type is refused: a
    float array in [0, 1] would otherwise be read as 0-255, an almost black photo, without a word."""
    from PIL import Image

    from reid.imageio import rgb_array_of

    if isinstance(image, Image.Image):
        return rgb_array_of(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"embed takes image file paths, PIL images or RGB arrays, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"embed takes H x W x 3 uint8 RGB arrays (what reid.imageio.decode_image returns), got a "
                         f"{image.dtype} array of shape {image.shape}: convert it, e.g. with "
                         "PIL.Image.fromarray(...).convert('RGB'), or pass a PIL image")
    return image


class Embedder:
    """An encoder in eval mode plus its preprocessing: images in, L2-normalised float32 vectors out."""

    def __init__(self, encoder: Encoder, preprocess: Preprocess, threshold: float | None = None,
                 name: str = "", fingerprint: str = "", device: str | None = None,
                 threshold_origin: str | None = None, verification: Verification | None = None,
                 backend: Backend = "torch", runner_up_weight: float = 0.0,
                 threshold_objective: ThresholdObjective = "map5") -> None:
        require("backend", backend, backend in BACKENDS, " or ".join(BACKENDS))
        self.device = torch.device("cpu" if backend == "onnx" else
                                   device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = encoder.eval().to(self.device)
        if backend == "onnx":  # the export is cached by fingerprint: an encoder built in Python gets one too
            fingerprint = fingerprint or weights_fingerprint(self.encoder.state_dict())
        #: the forward pass every embedding goes through: the encoder itself, or its ONNX Runtime export
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            OnnxEncoder(self.encoder, preprocess.image_size, fingerprint).embed if backend == "onnx"
            else self.encoder.embed)
        self.backend = backend
        self.preprocess = preprocess
        #: each thread's own eval transform, built once: building one cost a small query ~1 ms, and albumentations'
        #: Compose keeps per-call state (its random generator), so the service's threads must not share one
        self._transforms = threading.local()
        self.threshold = threshold
        #: how the checkpoint's threshold was fitted (by `reid fit` or `reid calibrate`), for users to read
        self.threshold_origin = threshold_origin
        #: how much the runner-up's score raises the threshold's bar (reid.metrics.new_turtle_bar); 0 in checkpoints
        #: written before it existed, whose thresholds were fitted without it
        self.runner_up_weight = runner_up_weight
        #: what the checkpoint's thresholds were fitted to maximise (reid.metrics.ThresholdObjective); what `reid
        #: calibrate` fits for again unless told otherwise ("map5" in checkpoints written before the choice existed)
        self.threshold_objective = threshold_objective
        #: local verification learnt by `reid calibrate --verify` (None: answers rank by similarity alone)
        self.verification = verification
        self.name = name
        self.fingerprint = fingerprint

    def _eval_transform(self) -> EvalViews:
        """This thread's eval transform of :attr:`preprocess`, rebuilt only when the preprocessing is replaced."""
        if getattr(self._transforms, "preprocess", None) != self.preprocess:
            self._transforms.transform = self.preprocess.eval_transform()
            self._transforms.preprocess = self.preprocess
        return self._transforms.transform

    @property
    def dim(self) -> int:
        return self.encoder.embedding_dim

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None, backend: Backend = "torch") -> "Embedder":
        """Rebuild the encoder from a checkpoint alone (no config file, no pretrained download); ``backend`` onnx
        runs it through ONNX Runtime on the CPU (same embeddings, see :mod:`reid.onnx_backend`)."""
        checkpoint = read_checkpoint(path)
        meta = checkpoint[CHECKPOINT_KEY]
        try:
            encoder = Encoder(meta["backbone"], pretrained=False, projection_dim=int(meta["projection_dim"]),
                              embedding=meta["embedding"], image_size=int(meta["preprocess"]["image_size"]))
            prefix = "encoder."
            state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
            encoder.load_state_dict(state, strict=True)
            preprocess = Preprocess.from_dict(meta["preprocess"])
            verification = Verification.from_dict(meta.get(VERIFICATION_FIELD))
            objective = meta.get("threshold_objective", "map5")
            if objective not in THRESHOLD_OBJECTIVES:
                raise ValueError(f"threshold_objective {objective!r} is none of {', '.join(THRESHOLD_OBJECTIVES)}")
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} is incomplete or does not match its metadata: {error}") from error
        threshold = meta.get("threshold")
        return cls(encoder, preprocess, threshold=None if threshold is None else float(threshold),
                   name=f"{meta['backbone']}@{Path(path).name}", fingerprint=weights_fingerprint(state),
                   device=device, threshold_origin=meta.get("threshold_origin"), verification=verification,
                   backend=backend, runner_up_weight=float(meta.get("runner_up_weight", 0.0)),
                   threshold_objective=objective)

    @torch.inference_mode()
    def embed(self, images: Sequence[str | Path | np.ndarray | Any], batch_size: int = 32,
              progress: bool = False) -> np.ndarray:
        """Embed image files, PIL images or decoded ``H x W x 3`` uint8 RGB arrays; returns ``N x dim`` float32, rows
        L2-normalised.

        Files are decoded and transformed by DataLoader workers while the model runs, once there is more than one
        batch (bulk embedding of large photos is decode-bound, and a worker costs a process start). Decoded arrays
        (the service's queries) skip the DataLoader altogether: building one cost more than a small photo's
        transform.
        """
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        images = [_rgb_array(image) if not isinstance(image, (str, Path)) else image for image in images]
        photos = Photos(images, self._eval_transform())
        batches: Iterable[torch.Tensor]
        if all(isinstance(image, np.ndarray) for image in images):
            # numpy stacks the transposed tensors in one thread; torch.stack hands the same copy to its OpenMP pool,
            # which waits for busy cores: 4.2 ms against numpy's 0.2 ms for one 224 px photo while a training run
            # held both cores (BENCHMARKS.md, identify overhead)
            batches = (torch.from_numpy(np.stack([photos[i].numpy()
                                                  for i in range(start, min(start + batch_size, len(photos)))]))
                       for start in range(0, len(photos), batch_size))
        else:
            workers = min(BULK_WORKERS, os.cpu_count() or 1) if len(images) > batch_size else 0
            batches = PhotoLoader(photos, batch_size=batch_size, num_workers=workers)
        total = -(-len(images) // batch_size)
        chunks = [embed_views(self.forward, batch.to(self.device)).cpu().numpy()
                  for batch in tqdm(batches, total=total, desc="embedding", unit="batch", disable=not progress)]
        return np.concatenate(chunks).astype(np.float32)
