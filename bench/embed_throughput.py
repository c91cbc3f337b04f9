"""Bulk embedding speed: the project's path from files on disk against a raw timm forward on tensors in memory.

``Embedder.embed(paths)`` is what ``reid enroll``, ``evaluate``, ``predict`` and ``rsm`` run: decode (EXIF-aware),
resize, normalise, forward, L2-normalise. The raw baseline is the timm backbone alone, same batch size and input
size, on a batch already in memory: the model's own speed. Both are timed in this run, raw first and last (their
mean is the baseline, so drift in the machine's load shows as a gap between the two raw figures). Run by hand:

    .venv/bin/python bench/embed_throughput.py --images ../shared/data/turtles_dev/images

``--test-crops F ...`` times the project path again with those centre crops embedded beside each photo
(``model.test_crops``, test-time zoom) in the same run, for the price of the option.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from reid.data.records import IMAGE_EXTENSIONS
from reid.inference import Embedder, export_encoder
from reid.onnx_backend import BACKENDS


@torch.inference_mode()
def raw_forward(embedder: Embedder, count: int, batch_size: int) -> float:
    """Images/s of the timm backbone on a random batch already in memory."""
    size = embedder.preprocess.image_size
    batch = torch.randn(batch_size, 3, size, size)
    backbone = embedder.encoder.backbone
    backbone(batch)  # warm-up
    started = time.perf_counter()
    done = 0
    while done < count:
        backbone(batch)
        done += batch_size
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="a folder of photos (searched recursively)")
    parser.add_argument("--checkpoint", type=Path,
                        help="encoder (default: ImageNet MobileNetV2 at 224 px, frozen, made offline)")
    parser.add_argument("--count", type=int, default=256, help="photos to embed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="how the project path runs it")
    parser.add_argument("--test-crops", type=float, nargs="+", help="also time the path with these centre crops")
    args = parser.parse_args()
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[: args.count]
    if not paths:
        sys.exit(f"no images under {args.images}")

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or export_encoder(Path(tmp) / "frozen.ckpt", "mobilenetv2_100",
                                                       "imagenet-offline", image_size=224)
        embedder = Embedder.from_checkpoint(checkpoint, device="cpu", backend=args.backend)
    embedder.embed([str(p) for p in paths[: args.batch_size]], batch_size=args.batch_size)  # warm-up
    raw_before = raw_forward(embedder, len(paths), args.batch_size)
    started = time.perf_counter()
    embedder.embed([str(p) for p in paths], batch_size=args.batch_size)
    project = len(paths) / (time.perf_counter() - started)
    if args.test_crops:
        zoomed = replace(embedder.preprocess, crops=tuple(args.test_crops))
        plain, embedder.preprocess = embedder.preprocess, zoomed
        started = time.perf_counter()
        embedder.embed([str(p) for p in paths], batch_size=args.batch_size)
        with_crops = len(paths) / (time.perf_counter() - started)
        embedder.preprocess = plain
    raw_after = raw_forward(embedder, len(paths), args.batch_size)
    raw = (raw_before + raw_after) / 2

    print("## Bulk embedding: files on disk against the raw forward\n")
    print(f"```bash\n{shlex.join(['.venv/bin/python', *sys.argv])}\n```\n")
    print(f"`{embedder.name}` at {embedder.preprocess.image_size} px, batch {args.batch_size}, {len(paths)} photos, "
          f"{torch.get_num_threads()} torch threads.\n")
    print("| path | images/s |\n|---|---|")
    print(f"| raw timm forward, tensors in memory (before / after) | {raw_before:.1f} / {raw_after:.1f} |")
    print(f"| `Embedder.embed(paths)` ({args.backend}): decode + preprocess + forward | {project:.1f} |")
    if args.test_crops:
        print(f"| `Embedder.embed(paths)` with centre crops {args.test_crops} beside each photo | {with_crops:.1f} |")
    print(f"\nratio: **{project / raw:.2f}x** the raw forward")
    if args.test_crops:
        print(f"test-time zoom: **{project / with_crops:.2f}x** the time of the path without it")


if __name__ == "__main__":
    main()
