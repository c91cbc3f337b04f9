"""`reid fit` under DDP: two CPU processes on the gloo backend train, checkpoint, and score validation exactly as one
process does on the same weights, while each rank draws its own P x K batches.

The run is the real command in a subprocess (Lightning starts the second rank by running that command again), on
loopback alone: MASTER_ADDR 127.0.0.1, a port picked on 127.0.0.1, and gloo (or NCCL's bootstrap) bound to ``lo``.
``REID_TEST_ACCELERATOR=gpu`` runs the same test on two GPUs with NCCL (scripts/gpu_check.sh does, given two).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from reid.data.datamodule import ReIDDataModule
from reid.module import ReIDModule
from tests.test_fit import _fit_args

REPO = Path(__file__).resolve().parents[1]
ACCELERATOR = os.environ.get("REID_TEST_ACCELERATOR", "cpu")
INDIVIDUALS, PHOTOS, P, K, STEPS = 9, 5, 4, 2, 3
METRICS = ("val_map5", "val_top1", "val_top5", "val_open_balanced_accuracy", "val_open_auroc")


class RecordBatches(Callback):
    """Writes the labels of each training batch of this rank to ``<default_root_dir>/batches_rank<R>.json``."""

    def __init__(self) -> None:
        self.labels: list[list[int]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.labels.append(batch[1].tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(trainer.default_root_dir, f"batches_rank{trainer.global_rank}.json").write_text(json.dumps(self.labels))


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 individuals x 5 photos: validation embeds all 45 (the gallery, then the queries), an odd count, so the
    2-process validation shards are padded with a repeated photo that the gathering must drop."""
    from reid.data.synth import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("odd")
    generate_synthetic_dataset(root, individuals=INDIVIDUALS, images_per_individual=PHOTOS, seed=3, image_size=64,
                               progress=False)
    return root


def _loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_ddp_fit(root: Path, data: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # `python -m reid.cli` is `reid` wherever the package is installed (a --target prefix has no script beside python);
    # reid's -v before the command: the second rank runs the command line again, which must be Lightning's alone
    command = [sys.executable, "-m", "reid.cli", "-v", *_fit_args(
        root, data, "--trainer.accelerator", ACCELERATOR, "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_epochs", "1", "--data.individuals_per_batch", str(P), "--data.batches_per_epoch", str(STEPS),
        "--model.backbone", "test_efficientnet", "--data.eval_batch_size", "1",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
        "--trainer.callbacks+=tests.test_ddp.RecordBatches")]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_loopback_port()), "GLOO_SOCKET_IFNAME": "lo",
           "NCCL_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # A session of its own, so a hung run is ended with both of its ranks.
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"2-process fit did not finish in {timeout} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output)


def _logged_validation(log_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    [row] = [row for row in rows if row.get("val_map5")]
    return {name: float(row[name]) for name in METRICS}


@pytest.mark.skipif(ACCELERATOR != "cpu" and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_process_fit_checkpoints_and_validates_like_one_process(tmp_path: Path, odd_dataset: Path) -> None:
    result = _run_ddp_fit(tmp_path, odd_dataset)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout
    log_dir = tmp_path / "lightning_logs" / "version_0"
    best = log_dir / "checkpoints" / "best.ckpt"
    assert best.is_file() and (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert f"best checkpoint: {best}" in result.stdout
    two_processes = _logged_validation(log_dir)
    assert len(list((log_dir / "rsm").glob("*.png"))) == 1  # drawn by rank 0 alone

    # One process, the same weights (the checkpoint saved right after that validation), the same data. Each photo
    # is embedded alone on one thread in both runs (eval_batch_size 1, OMP_NUM_THREADS 1), so the embeddings are
    # bitwise the same and the metrics must be *equal*: any difference is the gathering's.
    data = ReIDDataModule.load_from_checkpoint(best)
    trainer = L.Trainer(accelerator=ACCELERATOR, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_process = trainer.validate(ReIDModule.load_from_checkpoint(best, map_location="cpu"), datamodule=data)[0]
    finally:
        torch.set_num_threads(threads)
    assert (len(data.gallery_records) + len(data.query_records)) % 2 == 1  # the shards were padded
    assert two_processes == {name: one_process[name] for name in METRICS}
    callbacks = torch.load(best, map_location="cpu", weights_only=False)["callbacks"]
    best_score = next(state for name, state in callbacks.items() if name.startswith("ModelCheckpoint"))["best_model_score"]
    assert float(best_score) == one_process["val_map5"]

    # Each rank trained on its own P x K batches: P distinct individuals, K photos each, none shared in a step.
    ranks = [json.loads((tmp_path / f"batches_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(batches) for batches in ranks] == [STEPS, STEPS]
    for step in zip(*ranks):
        counts = [Counter(labels) for labels in step]
        assert all(len(c) == P and set(c.values()) == {K} for c in counts)
        assert not set(counts[0]) & set(counts[1])
