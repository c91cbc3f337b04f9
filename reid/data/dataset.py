"""Torch datasets over record tables, the identity (P x K) batch sampler, and the loader of both."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from reid.errors import require
from reid.imageio import decode_image

log = logging.getLogger(__name__)


class Photos(Dataset):
    """Image files (or already decoded RGB arrays) → transformed tensors.

    The one place where a photo becomes an encoder input: training, validation and :class:`reid.inference.Embedder`
    all index this dataset, so decoding and transforming never diverge between them.
    """

    def __init__(self, images: Sequence[str | Path | np.ndarray], transform: A.Compose) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        array = image if isinstance(image, np.ndarray) else decode_image(image)
        return self.transform(image=array)["image"]


class PhotoLoader(DataLoader):
    """A ``DataLoader`` whose worker processes run OpenCV on one thread each.

    Workers decode and augment photos with OpenCV; left alone, each would start a pool of one thread per core, and
    N workers would run N x cores threads that spend their time switching between them. The usual cure,
    ``cv2.setNumThreads(1)`` in each worker, hangs for ever once this process has run OpenCV in parallel (a notebook
    that generated photos or verified matches before training): a forked worker inherits the pool's bookkeeping but
    not its threads. So the pool is shrunk to one thread while the workers fork, then restored: they start with one.
    """

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0:
            return super().__iter__()
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            return super().__iter__()  # forks the workers, the first time (they persist where asked to)
        finally:
            cv2.setNumThreads(threads)


def seed_augmentations(transform: A.BaseCompose, rank: int = 0) -> A.BaseCompose:
    """Seed an albumentations pipeline from torch's generator, which ``seed_everything`` seeds, and the process's
    rank: albumentations (2.x) draws from generators of its own, made from OS entropy, so without this the same seed
    gave different fits; and every DDP rank holds the same torch seed, so without the rank they would draw alike."""
    transform.set_random_seed(int(np.random.SeedSequence([torch.initial_seed(), rank]).generate_state(1)[0]))
    return transform


def seed_worker_augmentations(worker_id: int, rank: int = 0) -> None:
    """``worker_init_fn`` of training loaders (``rank`` bound with :func:`functools.partial`): each worker process
    reseeds its copy of the augmentations from its own torch seed (PyTorch's base seed + worker id) and its rank.
    Forked with the parent's generators, every worker otherwise drew the same augmentations, slot for slot, as the
    others: two workers, half the randomness configured."""
    seed_augmentations(torch.utils.data.get_worker_info().dataset.photos.transform, rank)


class ImageRecords(Dataset):
    """The photos of a record table with their integer labels (its ``label`` column: one integer per individual,
    as :class:`reid.data.datamodule.ReIDDataModule` numbers them once for every table it serves).

    Items are ``(photo, label, index)``: the index lets validation under DDP put the photos gathered from every
    rank back in table order, and drop the duplicates that a ``DistributedSampler`` pads the shards with.
    """

    def __init__(self, records: pd.DataFrame, transform: A.Compose) -> None:
        self.photos = Photos(records["path"].tolist(), transform)
        self.labels = records["label"].to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.photos[index], int(self.labels[index]), index


class IdentitySampler(DistributedSampler):
    """Batches of P distinct individuals with K photos each, for one rank of a (possibly distributed) run.

    Within a batch every individual appears exactly K times and no individual appears in two slots, so the
    NT-Xent negatives are always other individuals. Each photo of an individual is drawn without replacement;
    individuals with fewer than K photos are drawn with replacement: one photo becomes K differently augmented
    views of itself. The sampler yields a flat stream of indices, whole batches in order, for a ``DataLoader``
    with ``batch_size = P * K`` and ``drop_last=True``.

    Why not pytorch-metric-learning's ``MPerClassSampler`` (the same batches, for one process): it draws from numpy's
    global generator and knows nothing of ranks. Under DDP every process would draw the *same* batches, and
    Lightning would wrap it in a ``DistributedSamplerWrapper`` that deals its indices out to the ranks one by
    one (shuffled, for training), which tears the P x K structure apart. So this sampler knows its rank:

    - At each step all ranks draw together from one generator seeded by ``(seed, epoch)``: P x world_size
      distinct individuals, P for each rank, so the ranks train on different individuals in the same step
      (where the training split has fewer than P x world_size individuals, each rank draws its own P, and an
      individual can be in two ranks' batches, never twice in one). Each rank then picks the photos of its
      individuals from its own generator, seeded by ``(seed, epoch, rank)``. The same seed, epoch and world size
      give the same batches, run after run; ``set_epoch`` (Lightning calls it every epoch) gives fresh ones.
    - It is a ``DistributedSampler``: Lightning leaves a loader whose sampler already is one as it is, whatever
      ``Trainer(use_distributed_sampler=...)`` says, so no config has to remember to turn the wrapping off.

    Args:
        labels: the integer label (individual) of every photo of the dataset.
        individuals_per_batch: P, distinct individuals in each batch of each rank.
        photos_per_individual: K, photos of each individual in a batch.
        batches_per_epoch: batches each rank draws per epoch (steps per epoch).
        rank: this process's rank among ``world_size`` (``Trainer.global_rank``).
        world_size: processes taking part (``Trainer.world_size``); 1 without DDP.
        seed: seed of the draws, the same on every rank.
    """

    def __init__(self, labels: Sequence[int], individuals_per_batch: int, photos_per_individual: int,
                 batches_per_epoch: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        individuals = np.unique(labels)
        self.check(labels, individuals_per_batch, photos_per_individual, batches_per_epoch)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of {world_size}")
        super().__init__(labels, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.photos_of = [np.flatnonzero(labels == individual) for individual in individuals]
        short = sum(len(photos) < photos_per_individual for photos in self.photos_of)
        if short and rank == 0:
            log.warning("data.photos_per_individual %d is more than the training photos of %d of the %d individuals: "
                        "their photos repeat within a batch, as positives that differ only by augmentation",
                        photos_per_individual, short, len(individuals))
        self.individuals_per_batch = individuals_per_batch
        self.photos_per_individual = photos_per_individual
        self.batches_per_epoch = batches_per_epoch

    @staticmethod
    def check(labels: Sequence[int], individuals_per_batch: int, photos_per_individual: int,
              batches_per_epoch: int) -> None:
        """Refuse settings no batch can be drawn with. Also called when a fit's data is set up, before Lightning
        builds the training loader: by then its logger has made the run's ``version_N`` folder, which a refusal
        would leave empty."""
        require("data.photos_per_individual", photos_per_individual, photos_per_individual >= 2,
                ">= 2 (positives need a pair)")
        require("data.individuals_per_batch", individuals_per_batch, individuals_per_batch >= 2,
                ">= 2 (negatives need another individual)")
        individuals = len(np.unique(np.asarray(labels)))
        require("data.individuals_per_batch", individuals_per_batch, individuals_per_batch <= individuals,
                f"at most {individuals}, the individuals in the training split")
        require("data.batches_per_epoch", batches_per_epoch, batches_per_epoch >= 1, ">= 1")

    def __len__(self) -> int:
        return self.batches_per_epoch * self.individuals_per_batch * self.photos_per_individual

    def __iter__(self) -> Iterator[int]:
        shared = np.random.default_rng([self.seed, self.epoch])
        own = np.random.default_rng([self.seed, self.epoch, self.rank])
        p, k, n, ranks = self.individuals_per_batch, self.photos_per_individual, len(self.photos_of), self.num_replicas
        for _ in range(self.batches_per_epoch):
            if p * ranks <= n:
                mine = shared.permutation(n)[self.rank * p:(self.rank + 1) * p]
            else:
                mine = [shared.permutation(n)[:p] for _ in range(ranks)][self.rank]
            for individual in mine:
                photos = self.photos_of[individual]
                yield from own.choice(photos, size=k, replace=len(photos) < k).tolist()
