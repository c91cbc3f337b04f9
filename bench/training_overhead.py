"""What Lightning and the data pipeline cost in training: the LightningModule against a plain PyTorch loop.

Four ways to run the *same* training steps (same encoder, projection head, NT-Xent loss, AdamW with the module's
two learning rates, channels_last, batches of P individuals x K photos drawn by the project's sampler):

* ``lightning, real loading``: ``Trainer.fit(ReIDModule, ReIDDataModule)``, as ``reid fit`` runs it;
* ``plain loop, real loading``: a hand-written loop over the same ``DataLoader`` (files decoded and augmented by
  worker processes while the model trains);
* ``plain loop, tensors in memory`` and ``lightning, tensors in memory``: the same steps over batches decoded
  beforehand, so nothing waits for loading.

Images/s counts the steps after ``--warmup`` steps (the first batches pay for worker start-up and allocator
warm-up). Rounds are interleaved and the medians compared, because the machine is shared. The ratios to read:
Lightning / plain loop (the framework's tax, target >= 0.95) and real loading / in memory (whether the loader
keeps up). Data: the project's synthetic individuals (``reid synth``), generated once into a temporary folder.

    .venv/bin/python bench/training_overhead.py --image-size 128 --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from reid.data.synth import generate_synthetic_dataset
from reid.data.datamodule import ReIDDataModule
from reid.module import ReIDModule

AUGMENTATIONS = [{"type": "Affine", "rotate": [-15, 15], "scale": [0.85, 1.15], "p": 0.8},
                 {"type": "ColorJitter", "brightness": 0.3, "contrast": 0.3, "p": 0.8}]


class StepClock(L.Callback):
    """The time at the end of every training step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: object) -> None:
        self.ends.append(time.perf_counter())


def images_per_second(ends: list[float], warmup: int, batch: int) -> float:
    timed = ends[warmup - 1:]
    return (len(timed) - 1) * batch / (timed[-1] - timed[0])


def make_module(args: argparse.Namespace) -> ReIDModule:
    torch.manual_seed(0)
    return ReIDModule(backbone=args.backbone, pretrained=False, image_size=args.image_size, projection_dim=64,
                      lr=1e-3, backbone_lr_scale=0.3, warmup_fraction=0.1, rsm_individuals=0, channels_last=True)


def make_datamodule(args: argparse.Namespace, root: Path) -> ReIDDataModule:
    return ReIDDataModule(str(root), individuals_per_batch=args.individuals, photos_per_individual=2,
                          batches_per_epoch=args.warmup + args.steps, num_workers=args.workers,
                          augmentations=AUGMENTATIONS, backbone=args.backbone, image_size=args.image_size)


def plain_loop(module: ReIDModule, batches: Iterable, total_steps: int) -> list[float]:
    """The training step of ``ReIDModule`` written out by hand, with the module's own optimiser and schedule."""
    encoder, criterion = module.encoder, module.criterion
    encoder.train().to(memory_format=torch.channels_last)
    optimizer, scheduler = module.optimizer_and_scheduler(total_steps)
    ends = []
    for images, labels, _ in batches:
        _, projections = encoder(module.normalise_pixels(images.contiguous(memory_format=torch.channels_last)))
        loss = criterion(projections.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ends.append(time.perf_counter())
    return ends


def lightning_fit(module: ReIDModule, total_steps: int, datamodule: ReIDDataModule | None = None,
                  batches: list | None = None) -> list[float]:
    clock = StepClock()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, max_steps=total_steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, precision=32, callbacks=[clock])
    if datamodule is not None:
        trainer.fit(module, datamodule=datamodule)
    else:  # batch_size=None: each item already is a batch (a bare list would be read as several loaders)
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return clock.ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--individuals", type=int, default=16, help="P; each batch holds 2 photos of each")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (reid fit's default)")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    total = args.warmup + args.steps
    batch = args.individuals * 2

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        generate_synthetic_dataset(root, individuals=max(args.individuals + 4, 24), images_per_individual=8,
                                   image_size=max(args.image_size, 96), seed=0, progress=False)
        data = make_datamodule(args, root)
        data.setup("fit")
        in_memory = list(data.train_dataloader())  # decoded and augmented once, reused by every round

        variants = {
            "lightning, real loading": lambda: lightning_fit(make_module(args), total, make_datamodule(args, root)),
            "plain loop, real loading": lambda: plain_loop(make_module(args), data.train_dataloader(), total),
            "lightning, tensors in memory": lambda: lightning_fit(make_module(args), total, batches=in_memory),
            "plain loop, tensors in memory": lambda: plain_loop(make_module(args), in_memory, total),
        }
        speeds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                speeds[name].append(images_per_second(run(), args.warmup, batch))

    median = {name: statistics.median(values) for name, values in speeds.items()}
    print(f"{args.backbone} at {args.image_size} px, batch {batch} ({args.individuals} individuals x 2 photos), "
          f"{args.workers} workers, {torch.get_num_threads()} threads, {args.steps} timed steps x {args.rounds} "
          "rounds\n")
    print("| variant | images/s (median) | rounds |")
    print("|---|---|---|")
    for name, values in speeds.items():
        print(f"| {name} | {median[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    print()
    print(f"Lightning / plain loop, real loading: {median['lightning, real loading'] / median['plain loop, real loading']:.3f}")
    print(f"Lightning / plain loop, in memory:    "
          f"{median['lightning, tensors in memory'] / median['plain loop, tensors in memory']:.3f}")
    print(f"real loading / in memory, Lightning:  "
          f"{median['lightning, real loading'] / median['lightning, tensors in memory']:.3f}")


if __name__ == "__main__":
    main()
