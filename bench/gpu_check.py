"""The GPU check (issue 10), one step per process: ``scripts/gpu_check.sh`` runs them in turn and prints the summary.

Steps (each appends one JSON line to ``--results``; exit 1 when it failed):

- ``photos``: synthetic multi-view photos written to local disk, in parallel shards, as JPEG files (quality 90:
  what cameras write, and what Turtle Recall's photos are), so loading them costs a real decode.
- ``train``: the ResNet50 recipe (``configs/turtle_resnet50.yaml``: bf16-mixed, channels_last, its augmentations,
  P x K batches, its workers) at 224 px for a bounded number of steps, twice: through the real data pipeline
  (files, decode, augment, DataLoader workers, copy to the GPU) and on one batch already on the GPU (no loading
  at all). The ratio says whether loading keeps up; peak GPU memory for each. Random weights: the machine has no
  network, and the speed does not depend on them.
- ``embed``: inference images/s of the recipe's encoder on a batch already on the device, bf16 autocast and fp32.
- ``search``: exact top-k search of a million embeddings of the recipe's size (2048, ResNet50's pooled features):
  FAISS on the GPU through :class:`reid.gallery.Gallery` when FAISS sees a GPU, checked against ``torch.mm`` +
  ``topk`` on the device; without a FAISS GPU build, ``torch.mm`` + ``topk`` alone, labelled so.
- ``record``: one line for a step run outside Python (the DDP test).
- ``summary``: the table of every line; exit 1 if any step failed.

``--smoke`` (or ``REID_GPU_CHECK_SMOKE=1``) shrinks every size so the whole check runs on a CPU in a few minutes::

    .venv/bin/python bench/gpu_check.py photos --smoke --root /tmp/check/photos --results /tmp/check/results.jsonl
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "turtle_resnet50.yaml"
EMBEDDING_DIM = 2048  # ResNet50's pooled features: the recipe's retrieval embedding (model.embedding: backbone)
TOP_K = 10


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the real check, or the smoke test that proves the script on a CPU."""

    individuals: int
    photos_each: int
    photo_px: int
    image_size: int
    individuals_per_batch: int | None  # None: the recipe's
    num_workers: int | None  # None: the recipe's
    warmup_steps: int
    timed_steps: int
    embed_batch: int
    embed_batches: int
    gallery: int
    queries: int


FULL = Sizes(individuals=240, photos_each=8, photo_px=320, image_size=224, individuals_per_batch=None,
             num_workers=None, warmup_steps=15, timed_steps=100, embed_batch=256, embed_batches=20,
             gallery=1_000_000, queries=1000)
SMOKE = Sizes(individuals=12, photos_each=3, photo_px=96, image_size=64, individuals_per_batch=4, num_workers=1,
              warmup_steps=1, timed_steps=3, embed_batch=8, embed_batches=2, gallery=20_000, queries=50)

Figures = dict[str, str]


def _synth_shard(job: tuple[Path, int, int, int, int]) -> None:
    from reid.data.synth import generate_synthetic_dataset

    out, first, count, photos_each, size = job
    generate_synthetic_dataset(out, individuals=count, images_per_individual=photos_each, seed=0, image_size=size,
                               first_individual=first, progress=False, image_format="jpeg")


def photos(args: argparse.Namespace, sizes: Sizes) -> tuple[Figures, str]:
    """Synthetic photos in shards of individuals, one process each, then one labels.csv over all of them."""
    root: Path = args.root
    workers = max(1, min(os.cpu_count() or 1, 16))
    per_shard = -(-sizes.individuals // workers)
    jobs = [(root / f"shard_{first:05d}", first, min(per_shard, sizes.individuals - first), sizes.photos_each,
             sizes.photo_px) for first in range(0, sizes.individuals, per_shard)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_synth_shard, jobs))
    rows = []
    for shard, *_ in jobs:
        with (shard / "labels.csv").open(newline="") as f:
            rows += [{**row, "path": f"{shard.name}/{row['path']}"} for row in csv.DictReader(f)]
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"photos": f"{len(rows)} ({sizes.individuals} individuals, {sizes.photo_px} px JPEG)"}, \
        f"{workers} processes, {root}"


def _recipe(sizes: Sizes, root: Path | None = None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The recipe's model and data settings at the check's sizes, and the precision to train in."""
    recipe = yaml.safe_load(RECIPE.read_text())
    model = {**recipe["model"], "pretrained": False, "image_size": sizes.image_size}
    data = {**recipe["data"], "root": str(root), "batches_per_epoch": sizes.warmup_steps + sizes.timed_steps,
            "backbone": model["backbone"], "image_size": model["image_size"]}
    if sizes.individuals_per_batch is not None:
        data["individuals_per_batch"] = sizes.individuals_per_batch
    if sizes.num_workers is not None:
        data["num_workers"] = sizes.num_workers
    # bf16 autocast is several times slower than fp32 on CPUs without AVX-512 BF16 (BENCHMARKS.md)
    precision = recipe["trainer"]["precision"] if torch.cuda.is_available() else "32-true"
    return model, data, precision


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    """Wait for the GPU: its work is queued, so a clock read without this times the queueing."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Throughput(L.Callback):
    """Images/s over the steps after ``warmup`` (the first ones pay for cuDNN autotuning and worker start-up)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.images = 0
        self.started = 0.0
        self.seconds = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == self.warmup:
            _sync()
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self.images += len(batch[1])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync()
        self.seconds = time.perf_counter() - self.started


class SameBatch:
    """One batch, already on the device, ``steps`` times: training with no data loading at all."""

    def __init__(self, batch: tuple[Any, ...], steps: int) -> None:
        self.batch = batch
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return itertools.repeat(self.batch, self.steps)


def _fit(sizes: Sizes, model: dict[str, Any], precision: str, **fit_kwargs: Any) -> tuple[float, int | None]:
    """Train for warmup + timed steps; images/s over the timed ones and peak GPU memory (None on a CPU)."""
    from reid.module import ReIDModule

    meter = Throughput(sizes.warmup_steps)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = L.Trainer(accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1, precision=precision,
                            max_steps=sizes.warmup_steps + sizes.timed_steps, limit_val_batches=0,
                            num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
                            default_root_dir=scratch)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(ReIDModule(**model), **fit_kwargs)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return meter.images / meter.seconds, peak


def train(args: argparse.Namespace, sizes: Sizes) -> tuple[Figures, str]:
    from reid.data.datamodule import ReIDDataModule

    model, data, precision = _recipe(sizes, args.root)
    if args.num_workers is not None:
        data["num_workers"] = args.num_workers
    real, real_peak = _fit(sizes, model, precision, datamodule=ReIDDataModule(**data))
    device = _device()
    p, k, size = int(data["individuals_per_batch"]), int(data["photos_per_individual"]), sizes.image_size
    pixels = torch.randint(0, 256, (p * k, 3, size, size), dtype=torch.uint8, device=device)  # as the loader's
    batch = (pixels.contiguous(memory_format=torch.channels_last),
             torch.arange(p, device=device).repeat_interleave(k), torch.arange(p * k, device=device))
    resident, resident_peak = _fit(sizes, model, precision,
                                   train_dataloaders=SameBatch(batch, sizes.warmup_steps + sizes.timed_steps))
    gib = 2 ** 30
    figures = {
        "real pipeline": f"{real:,.0f} images/s",
        "tensors on the device": f"{resident:,.0f} images/s",
        "real / on-device": f"{real / resident:.2f}",
    }
    if real_peak is not None and resident_peak is not None:
        figures["peak GPU memory"] = f"{real_peak / gib:.1f} / {resident_peak / gib:.1f} GiB"
    note = (f"{model['backbone']} {size} px, {precision}, channels_last={model.get('channels_last', True)}, "
            f"batch {p}x{k}={p * k}, {data['num_workers']} workers, {sizes.timed_steps} timed steps after "
            f"{sizes.warmup_steps}")
    return figures, note


def embed(args: argparse.Namespace, sizes: Sizes) -> tuple[Figures, str]:
    from reid.module import ReIDModule

    model, _, _ = _recipe(sizes)
    device = _device()
    encoder = ReIDModule(**model).encoder.to(device).eval().to(memory_format=torch.channels_last)
    images = torch.randn(sizes.embed_batch, 3, sizes.image_size, sizes.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    figures = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for _ in range(3):
                encoder.embed(images)
            _sync()
            started = time.perf_counter()
            for _ in range(sizes.embed_batches):
                encoder.embed(images)
            _sync()
        figures[name] = f"{sizes.embed_batch * sizes.embed_batches / (time.perf_counter() - started):,.0f} images/s"
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return figures, (f"{model['backbone']} {sizes.image_size} px, batch {sizes.embed_batch}, channels_last, "
                     f"embedding only (no decoding){'; fp32 convolutions may use TF32 (cuDNN default)' if tf32 else ''}")


def _torch_top_k(gallery: torch.Tensor, queries: torch.Tensor, k: int,
                 chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product: the reference any index must agree with."""
    results = [torch.topk(queries[start:start + chunk] @ gallery.T, k, dim=1)
               for start in range(0, len(queries), chunk)]
    return torch.cat([r.values for r in results]), torch.cat([r.indices for r in results])


def search(args: argparse.Namespace, sizes: Sizes) -> tuple[Figures, str]:
    from reid.gallery import Gallery, gpu_available

    device = _device()
    generator = torch.Generator(device).manual_seed(0)
    gallery = F.normalize(torch.randn(sizes.gallery, EMBEDDING_DIM, device=device, generator=generator), dim=1)
    picked = torch.randint(0, sizes.gallery, (sizes.queries,), device=device, generator=generator)
    noise = torch.randn(sizes.queries, EMBEDDING_DIM, device=device, generator=generator)
    queries = F.normalize(gallery[picked] + 0.5 * noise / EMBEDDING_DIM ** 0.5, dim=1)
    _torch_top_k(gallery, queries[:8], TOP_K)  # warm-up (cuBLAS handles)
    _sync()
    started = time.perf_counter()
    _, reference = _torch_top_k(gallery, queries, TOP_K)
    _sync()
    seconds = time.perf_counter() - started
    found = (reference[:, 0] == picked).float().mean().item()
    label = f"torch.mm + topk on the {'GPU' if device.type == 'cuda' else device.type.upper()}"
    figures = {label: f"{sizes.queries / seconds:,.0f} queries/s ({1000 * seconds:.0f} ms for {sizes.queries})"}
    note = (f"exact top-{TOP_K} over {sizes.gallery:,} x {EMBEDDING_DIM} fp32 (matmul precision "
            f"{torch.get_float32_matmul_precision()}); planted neighbour found first for {found:.1%}")
    if not gpu_available():
        return figures, note + "; FAISS sees no GPU (no faiss-gpu build could travel): torch.mm is the reference"
    index = Gallery(EMBEDDING_DIM, "flat", use_gpu=True)
    vectors, query_vectors = gallery.cpu().numpy(), queries.cpu().numpy()
    index.add(np.arange(sizes.gallery), vectors, [f"ind_{i % 10_000}" for i in range(sizes.gallery)])
    index.search_photos(query_vectors[:8], TOP_K)  # the first search copies the index to the GPU
    started = time.perf_counter()
    _, ids = index.search_photos(query_vectors, TOP_K)
    seconds = time.perf_counter() - started
    agree = float((ids == reference.cpu().numpy()).mean())
    figures["FAISS flat on the GPU (reid.gallery)"] = (f"{sizes.queries / seconds:,.0f} queries/s "
                                                       f"({1000 * seconds:.0f} ms); same top-{TOP_K} ids {agree:.2%}")
    return figures, note


def _append(results: Path, line: dict[str, Any]) -> None:
    with results.open("a") as f:
        f.write(json.dumps(line) + "\n")


def record(args: argparse.Namespace) -> None:
    _append(args.results, {"step": args.name, "status": args.status, "figures": {}, "note": args.note,
                           "seconds": args.seconds})


def summary(args: argparse.Namespace) -> int:
    lines = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU visible)"
    print(f"\nGPU check{' (smoke sizes)' if args.smoke else ''}: {device}, torch {torch.__version__}, "
          f"{torch.cuda.device_count()} GPU(s)")
    print("| step | result | figures | notes | s |")
    print("|---|---|---|---|---|")
    for line in lines:
        figures = "; ".join(f"{name}: {value}" for name, value in line["figures"].items())
        print(f"| {line['step']} | {line['status']} | {figures} | {line['note']} | {line['seconds']:.0f} |")
    failed = [line["step"] for line in lines if line["status"] == "failed"]
    print(f"\n{len(lines)} steps, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed or not lines else 0


STEPS: dict[str, Callable[[argparse.Namespace, Sizes], tuple[Figures, str]]] = {
    "photos": photos, "train": train, "embed": embed, "search": search,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=[*STEPS, "record", "summary"])
    parser.add_argument("--results", type=Path, required=True, help="JSON lines, one per step")
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("REID_GPU_CHECK_SMOKE") == "1",
                        help="tiny sizes: proves the check on a CPU")
    parser.add_argument("--root", type=Path, help="photos folder (photos writes it, train reads it)")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers for train (default: the recipe's)")
    parser.add_argument("--name", help="record: the step's name")
    parser.add_argument("--status", choices=["ok", "failed", "skipped"], help="record: its result")
    parser.add_argument("--note", default="", help="record: what happened")
    parser.add_argument("--seconds", type=float, default=0.0, help="record: how long it took")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.step == "summary":
        return summary(args)
    if args.step == "record":
        record(args)
        return 0
    if args.step in ("photos", "train") and args.root is None:
        parser.error(f"{args.step} needs --root")
    started = time.perf_counter()
    try:
        figures, note = STEPS[args.step](args, sizes)
        status = "ok"
    except Exception as error:  # one step's failure is reported in the table; the next steps still run
        traceback.print_exc()
        figures, note, status = {}, f"{type(error).__name__}: {error}"[:300], "failed"
    _append(args.results, {"step": args.step, "status": status, "figures": figures, "note": note,
                           "seconds": time.perf_counter() - started})
    print(json.dumps({"step": args.step, "status": status, "figures": figures, "note": note}), flush=True)
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
