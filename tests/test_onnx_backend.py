"""The ONNX Runtime backend gives the embeddings the torch path gives, everywhere a user can pick it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reid.cli import main
from reid.data.records import read_dataset
from reid.errors import ConfigError
from reid.inference import Embedder, export_encoder
from reid.onnx_backend import ONNX_CACHE_ENV


@pytest.fixture
def checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(ONNX_CACHE_ENV, str(tmp_path / "onnx-cache"))
    torch.manual_seed(0)
    return export_encoder(tmp_path / "tiny.ckpt", "lcnet_050", False, 48)


def test_onnx_embeddings_match_torch_and_the_export_is_cached(checkpoint: Path, tmp_path: Path,
                                                               synth_dataset: Path) -> None:
    paths = read_dataset(synth_dataset)["path"].tolist()[:40]  # more than one batch: the DataLoader path too
    reference = Embedder.from_checkpoint(checkpoint).embed(paths, batch_size=16)
    onnx = Embedder.from_checkpoint(checkpoint, backend="onnx")
    embedded = onnx.embed(paths, batch_size=16)
    assert embedded.shape == reference.shape and embedded.dtype == np.float32
    assert np.min(np.sum(embedded * reference, axis=1)) >= 0.9999
    assert np.allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)
    assert onnx.backend == "onnx" and onnx.fingerprint == Embedder.from_checkpoint(checkpoint).fingerprint

    exported = list((tmp_path / "onnx-cache").glob("*.onnx"))
    assert [path.name for path in exported] == [f"{onnx.fingerprint}-48px.onnx"]
    written = exported[0].stat().st_mtime_ns
    Embedder.from_checkpoint(checkpoint, backend="onnx")
    assert exported[0].stat().st_mtime_ns == written, "a second start reuses the export"


def _rounded(report: object) -> object:
    """The report with floats to 5 decimals: thresholds may differ in the 7th, as float32 sums do."""
    if isinstance(report, dict):
        return {key: _rounded(value) for key, value in report.items()}
    if isinstance(report, list):
        return [_rounded(value) for value in report]
    return round(report, 5) if isinstance(report, float) else report


def test_cli_backend_flag_and_a_wrong_backend(checkpoint: Path, synth_dataset: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--json"]
    assert main(arguments) == 0
    torch_report = json.loads(capsys.readouterr().out)
    assert main([*arguments, "--backend", "onnx"]) == 0
    assert _rounded(json.loads(capsys.readouterr().out)) == _rounded(torch_report), "same embeddings, same scores"
    with pytest.raises(ConfigError, match="backend must be torch or onnx, got 'tensorrt'"):
        Embedder.from_checkpoint(checkpoint, backend="tensorrt")  # type: ignore[arg-type]
