"""The Lightning data module: a dataset read, split, and served as P x K training batches and validation loaders.

Training: each batch holds P individuals with K different photos each (K=2 is SimCLR's two views, except that the
two views are two *photos* of the turtle), augmented, then resized and normalised exactly as the model embeds.
Validation: the gallery (training photos) and the queries (validation photos), with the evaluation transform.

The preprocessing is the model's (timm's pretrained config of the backbone, at the model's input size): ``reid fit``
links ``model.backbone`` and ``model.image_size`` into this module, which resolves it from them alone.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from reid.data.dataset import (IdentitySampler, ImageRecords, PhotoLoader, seed_augmentations,
                               seed_worker_augmentations)
from reid.data.records import read_dataset
from reid.data.splits import SplitMode, assign_splits, split_by_image
from reid.data.transforms import AugmentationSpec, Preprocess
from reid.errors import DatasetError, require

log = logging.getLogger(__name__)


class ReIDDataModule(L.LightningDataModule):
    """Reads a dataset, splits it, and serves P x K training batches plus gallery/query validation loaders.

    Args:
        root: dataset folder (labels.csv, Zindi folder, or one sub-folder per individual).
        individuals_per_batch: P, distinct individuals in each training batch.
        photos_per_individual: K, different photos of each individual in a batch (2 = the SimCLR recipe).
        batches_per_epoch: training batches per epoch (the sampler draws with fresh randomness each epoch).
        split: ``auto`` (the dataset's split column if any, else by image), ``column``, ``image`` or ``individual``.
        val_fraction: share of photos (or individuals) held out when splitting here.
        seed: seed of the split and of the training batches (each epoch, and each DDP rank, draws its own from it).
        augmentations: albumentations transforms, ``[{type: Name, **kwargs}]``, run before the resize.
        num_workers: DataLoader worker processes.
        eval_batch_size: batch size when embedding gallery and query photos.
        check_images: open every image header when reading the dataset, to report a broken file up front.
        backbone: the model's timm backbone, whose pretrained config gives the mean and std (``reid fit`` links it
            from ``model.backbone``).
        image_size: the model's training input size (linked from ``model.image_size``).
        test_image_size: the size validation embeds at (linked from ``model.test_image_size``; ``None``:
            ``image_size``), the one the checkpoint is then used at.
        test_crops: the centre crops validation embeds beside each photo (linked from ``model.test_crops``).
    """

    def __init__(self, root: str, individuals_per_batch: int = 16, photos_per_individual: int = 2,
                 batches_per_epoch: int = 50, split: SplitMode = "auto", val_fraction: float = 0.25, seed: int = 0,
                 augmentations: list[AugmentationSpec] | None = None, num_workers: int = 2,
                 eval_batch_size: int = 64, check_images: bool = True, *, backbone: str, image_size: int,
                 test_image_size: int | None = None, test_crops: list[float] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        require("data.num_workers", num_workers, num_workers >= 0, ">= 0")
        require("data.eval_batch_size", eval_batch_size, eval_batch_size >= 1, ">= 1")
        require("data.image_size", image_size, image_size >= 16, "at least 16 (pixels)")
        if test_image_size is not None:
            require("data.test_image_size", test_image_size, test_image_size >= 16, "at least 16 (pixels)")
        self.root = root
        self.augmentations = list(augmentations or [])
        self.records: pd.DataFrame | None = None

    def preprocess(self) -> Preprocess:
        """The model's evaluation transform, what its checkpoint stores: the attached model's own during a fit or a
        validation, so that the photos that pick ``best.ckpt`` and fit its threshold are embedded exactly as the
        checkpoint will embed them; without a model (a data module on its own), resolved from ``backbone`` and the
        test size without building one (equal, tested)."""
        module = None if self.trainer is None else self.trainer.lightning_module
        if module is not None and isinstance(getattr(module, "preprocess", None), Preprocess):
            return module.preprocess
        hp = self.hparams
        return Preprocess.of_backbone(hp.backbone, hp.test_image_size or hp.image_size, tuple(hp.test_crops or ()))

    def setup(self, stage: str | None = None) -> None:
        if self.records is not None:
            return
        hp = self.hparams
        dataset = read_dataset(self.root, check_images=hp.check_images)
        records = assign_splits(dataset, hp.split, hp.val_fraction, hp.seed)
        # One integer label per individual over every identity (its index in sorted order), so gallery and query
        # labels mean the same individual; the loss, the sampler and validation read these integers.
        labels, identities = pd.factorize(records["identity"], sort=True)
        self.identities: list[str] = identities.tolist()
        self.records = records = records.assign(label=labels)
        self.train_records = records[records["split"] == "train"].reset_index(drop=True)
        self.val_records = records[records["split"] == "val"].reset_index(drop=True)
        if self.train_records.empty or self.val_records.empty:
            found = ", ".join(f"{count} {name or 'with none'}" for name, count in dataset["split"].value_counts().items())
            fix = (f"its split column has {found}: mark some "
                   "photos val (and train), or --data.split image to draw the validation photos and ignore the column"
                   if hp.split == "column" or (hp.split == "auto" and (dataset["split"] != "").any()) else
                   "give individuals at least 2 photos, or a split column")
            raise DatasetError(
                f"{self.root}: the split gives {len(self.train_records)} training and {len(self.val_records)} "
                f"validation photos; both must be non-empty ({fix})"
            )
        self.gallery_records, self.query_records = self._validation_sets(self.train_records, self.val_records)
        if self.query_records.empty:
            raise DatasetError(f"{self.root}: validation has no query photo: every validation individual has a single "
                               "photo, which joins the gallery (give them at least 2 photos, or mark some as val)")
        self.validation_records = self._interleaved(self.gallery_records, self.query_records)
        if stage == "fit":
            IdentitySampler.check(self.train_records["label"], hp.individuals_per_batch, hp.photos_per_individual,
                                  hp.batches_per_epoch)
        log.info("training on %d photos of %d individuals; validating %d photos of %d individuals",
                 len(self.train_records), self.train_records["identity"].nunique(),
                 len(self.val_records), self.val_records["identity"].nunique())

    def _validation_sets(self, train: pd.DataFrame, val: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Gallery and query photos for validation.

        Validation individuals that have no training photo (an open-set split) are *enrolled*: about half of
        their photos join the gallery and the rest are queries. Validation then measures what the service
        does, identifying individuals enrolled without retraining, instead of asking for the impossible.
        """
        unseen = val[~val["identity"].isin(set(train["identity"]))]
        if unseen.empty:
            return train, val
        enrolled = split_by_image(unseen, 0.5, int(self.hparams.seed)) == "train"
        log.info("validation: %d individuals unseen in training are enrolled with %d photos and queried with %d",
                 unseen["identity"].nunique(), int(enrolled.sum()), int((~enrolled).sum()))
        gallery = pd.concat([train, unseen[enrolled]], ignore_index=True)
        queries = val.drop(index=unseen.index[enrolled.to_numpy()]).reset_index(drop=True)
        return gallery, queries

    @staticmethod
    def _interleaved(gallery: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
        """Gallery and query photos in one table, marked by a ``query`` column, interleaved in proportion so that
        any first batches (``limit_val_batches``, ``fast_dev_run``) hold both: a gallery-first table cut short
        would hold no query to score."""
        both = pd.concat([gallery.assign(query=False), queries.assign(query=True)], ignore_index=True)
        position = np.concatenate([np.arange(len(gallery)) / len(gallery), np.arange(len(queries)) / len(queries)])
        return both.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)

    def _loader(self, dataset: ImageRecords, **kwargs: Any) -> PhotoLoader:
        workers = int(self.hparams.num_workers)
        # Pinned batches copy to a GPU asynchronously; on a CPU-only machine pinning would only cost time.
        return PhotoLoader(dataset, num_workers=workers, persistent_workers=workers > 0,
                           pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> PhotoLoader:
        """P x K batches for this rank; one process's batches when no Trainer is attached (a plain training loop)."""
        hp = self.hparams
        preprocess = Preprocess.of_backbone(hp.backbone, hp.image_size)
        rank, world_size = (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)
        dataset = ImageRecords(self.train_records,
                               seed_augmentations(preprocess.train_transform(self.augmentations), rank))
        sampler = IdentitySampler(dataset.labels, hp.individuals_per_batch, hp.photos_per_individual,
                                  hp.batches_per_epoch, rank=rank, world_size=world_size, seed=hp.seed)
        return self._loader(dataset, batch_size=hp.individuals_per_batch * hp.photos_per_individual,
                            sampler=sampler, drop_last=True,
                            worker_init_fn=functools.partial(seed_worker_augmentations, rank=rank))

    def val_dataloader(self) -> PhotoLoader:
        """One loader of :attr:`validation_records` (gallery and query photos interleaved, its ``query`` column
        telling them apart) with the evaluation transform. One loader, not one each: Lightning reports epoch-level
        metrics under every loader, and `reid validate` printed each score twice.

        Under DDP Lightning gives each rank a shard through a ``DistributedSampler``, padded with repeated photos;
        :meth:`reid.module.ReIDModule.on_validation_epoch_end` gathers the shards, keeps each photo once and splits
        them by that column.
        """
        return self._loader(ImageRecords(self.validation_records, self.preprocess().eval_transform()),
                            batch_size=int(self.hparams.eval_batch_size))
