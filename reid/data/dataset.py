"""Torch datasets over record tables, and the identity (P x K) batch sampler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import Dataset

from reid.errors import require
from reid.imageio import decode_image


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


class ImageRecords(Dataset):
    """The photos of a record table with an integer label per individual (``label_of`` maps identity → label)."""

    def __init__(self, records: pd.DataFrame, transform: A.Compose, label_of: Callable[[str], int]) -> None:
        self.photos = Photos(records["path"].tolist(), transform)
        self.labels = np.array([label_of(identity) for identity in records["identity"]], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.photos[index], int(self.labels[index])


def identity_batch_sampler(labels: Sequence[int], individuals_per_batch: int, photos_per_individual: int,
                           batches_per_epoch: int) -> MPerClassSampler:
    """Batches of P distinct individuals with K photos each, from pytorch-metric-learning's MPerClassSampler.

    Within a batch every individual appears exactly K times and no individual appears in two slots, so the
    NT-Xent negatives are always other individuals. Individuals with fewer than K photos are sampled with
    replacement: one photo becomes K differently augmented views of itself.
    """
    n_individuals = len(set(int(label) for label in labels))
    require("data.photos_per_individual", photos_per_individual, photos_per_individual >= 2,
            ">= 2 (positives need a pair)")
    require("data.individuals_per_batch", individuals_per_batch, individuals_per_batch >= 2,
            ">= 2 (negatives need another individual)")
    require("data.individuals_per_batch", individuals_per_batch, individuals_per_batch <= n_individuals,
            f"at most {n_individuals}, the individuals in the training split")
    require("data.batches_per_epoch", batches_per_epoch, batches_per_epoch >= 1, ">= 1")
    batch_size = individuals_per_batch * photos_per_individual
    return MPerClassSampler(np.asarray(labels), m=photos_per_individual, batch_size=batch_size,
                            length_before_new_iter=batch_size * batches_per_epoch)
