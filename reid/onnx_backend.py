"""ONNX Runtime as a CPU inference backend for the encoder: same weights, same embeddings, less time per photo.

The encoder's ``embed`` (backbone, pooling, L2 normalisation) is exported once per weights fingerprint and input
size with ``torch.onnx.export`` and cached, so only the first start pays for the export (~1-2 s). ONNX Runtime's
intra-op threads spin while they wait for work by default, which steals the CPU from PyTorch code in the same
process (local-feature matching, the service's other requests): spinning is turned off.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from reid.errors import ConfigError
from reid.fileio import atomic_target

log = logging.getLogger(__name__)

Backend = Literal["torch", "onnx"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnx")
#: Environment variable naming the folder of exported encoders.
ONNX_CACHE_ENV = "REID_ONNX_CACHE"


def onnx_cache_dir() -> Path:
    """Where exported encoders are kept: ``$REID_ONNX_CACHE``, else ``~/.cache/turtle-reid/onnx``."""
    return Path(os.environ.get(ONNX_CACHE_ENV) or Path.home() / ".cache" / "turtle-reid" / "onnx")


class _Embed(torch.nn.Module):
    """The graph to export: what ``Encoder.embed`` computes, as a module's forward."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(images)


def _export(encoder: torch.nn.Module, image_size: int, target: Path) -> None:
    example = torch.zeros(2, 3, image_size, image_size)
    with atomic_target(target) as temporary, warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo's, which needs onnxscript and handles
        # timm's models less reliably; it still exports every backbone this project uses.
        warnings.simplefilter("ignore")
        torch.onnx.export(_Embed(encoder).eval(), (example,), str(temporary), input_names=["images"],
                          output_names=["embeddings"], dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                          dynamo=False)


class OnnxEncoder:
    """``embed(batch) -> embeddings`` through ONNX Runtime, for an encoder identified by its weights fingerprint."""

    def __init__(self, encoder: torch.nn.Module, image_size: int, fingerprint: str,
                 cache_dir: Path | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise ConfigError("backend onnx needs onnxruntime: pip install onnxruntime") from error
        path = (cache_dir or onnx_cache_dir()) / f"{fingerprint}-{image_size}px.onnx"
        if not path.is_file():
            log.info("exporting the encoder to ONNX: %s", path)
            _export(encoder, image_size, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = self.session.run(None, {"images": images.numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
