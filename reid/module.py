"""Lightning pieces: the contrastive training module and the data module that feeds it P x K batches.

Training: each batch holds P individuals with K different photos each (K=2 is SimCLR's two views, except
that the two views are two *photos* of the turtle), augmented, under a contrastive loss on the projection head.
Validation: validation photos (queries) are searched against training photos (gallery) exactly as the service
does, scored by Zindi's MAP@5, and an RSM heatmap of the queries is logged.

Under DDP (``--trainer.strategy ddp``, one process per GPU) each rank draws its own P x K batches
(:class:`reid.data.dataset.IdentitySampler`) and embeds its shard of the validation photos; the shards are gathered
and de-duplicated before scoring, so the validation metrics are those of a single process on the same weights.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from pytorch_metric_learning import losses
from torch.utils.data import DataLoader

from reid.data.dataset import IdentitySampler, ImageRecords
from reid.data.records import read_dataset
from reid.data.splits import SplitMode, assign_splits, split_by_image
from reid.data.transforms import AugmentationSpec, Preprocess
from reid.errors import DatasetError, require
from reid.evaluation import HeldOutCalibration, calibrate_on_held_out_individuals, score_rankings, search_gallery
from reid.inference import CHECKPOINT_KEY, checkpoint_metadata
from reid.model import EmbeddingSource, Encoder
from reid.rsm import compute_rsm, plot_rsm

log = logging.getLogger(__name__)

LossName = Literal["ntxent", "supcon", "subcenter_arcface"]


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
        augmentations: albumentations transforms, ``[{type: Name, **kwargs}]``, run before resize/normalise.
        num_workers: DataLoader worker processes.
        eval_batch_size: batch size when embedding gallery and query photos.
        check_images: open every image header when reading the dataset, to report a broken file up front.
    """

    def __init__(self, root: str, individuals_per_batch: int = 16, photos_per_individual: int = 2,
                 batches_per_epoch: int = 50, split: SplitMode = "auto", val_fraction: float = 0.25, seed: int = 0,
                 augmentations: list[AugmentationSpec] | None = None, num_workers: int = 2,
                 eval_batch_size: int = 64, check_images: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        require("data.num_workers", num_workers, num_workers >= 0, ">= 0")
        require("data.eval_batch_size", eval_batch_size, eval_batch_size >= 1, ">= 1")
        self.root = root
        self.augmentations = list(augmentations or [])
        self.records: pd.DataFrame | None = None

    def _preprocess(self) -> Preprocess:
        """The model owns the preprocessing (it travels in the checkpoint); the data module asks for it."""
        if self.trainer is None or not hasattr(self.trainer.lightning_module, "preprocess"):
            raise RuntimeError("ReIDDataModule needs to be attached to a Trainer running a ReIDModule")
        return self.trainer.lightning_module.preprocess

    def setup(self, stage: str | None = None) -> None:
        if self.records is not None:
            return
        hp = self.hparams
        records = assign_splits(read_dataset(self.root, check_images=hp.check_images), hp.split, hp.val_fraction, hp.seed)
        self.records = records
        self.train_records = records[records["split"] == "train"].reset_index(drop=True)
        self.val_records = records[records["split"] == "val"].reset_index(drop=True)
        if self.train_records.empty or self.val_records.empty:
            raise DatasetError(
                f"{self.root}: the split gives {len(self.train_records)} training and {len(self.val_records)} "
                "validation photos; both must be non-empty (give individuals at least 2 photos, or a split column)"
            )
        self.gallery_records, self.query_records = self._validation_sets(self.train_records, self.val_records)
        # One label index over every identity, so gallery and query labels mean the same individual.
        self.identities = sorted(records["identity"].unique())
        self.label_of = {identity: i for i, identity in enumerate(self.identities)}.__getitem__
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

    def _loader(self, dataset: ImageRecords, **kwargs: Any) -> DataLoader:
        workers = int(self.hparams.num_workers)
        return DataLoader(dataset, num_workers=workers, persistent_workers=workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = ImageRecords(self.train_records, self._preprocess().train_transform(self.augmentations), self.label_of)
        sampler = IdentitySampler(dataset.labels, hp.individuals_per_batch, hp.photos_per_individual,
                                  hp.batches_per_epoch, rank=self.trainer.global_rank,
                                  world_size=self.trainer.world_size, seed=hp.seed)
        return self._loader(dataset, batch_size=hp.individuals_per_batch * hp.photos_per_individual,
                            sampler=sampler, drop_last=True)

    def val_dataloader(self) -> list[DataLoader]:
        """Two loaders: the gallery (index 0) and the queries (index 1), both with the evaluation transform.

        Under DDP Lightning gives each rank a shard of each through a ``DistributedSampler``, padded with repeated
        photos; :meth:`ReIDModule.on_validation_epoch_end` gathers the shards and keeps each photo once.
        """
        transform = self._preprocess().eval_transform()
        size = int(self.hparams.eval_batch_size)
        return [self._loader(ImageRecords(frame, transform, self.label_of), batch_size=size)
                for frame in (self.gallery_records, self.query_records)]


class ReIDModule(L.LightningModule):
    """A timm encoder trained contrastively for re-identification.

    Args:
        backbone: any timm model name (e.g. ``resnet50``, ``mobilenetv2_100``).
        pretrained: ``true`` (timm model hub), ``false``, a local weights file, or ``imagenet-offline``.
        image_size: square input size of the encoder (stored with the checkpoint).
        projection_dim: output size of the SimCLR projection head.
        embedding: retrieval vector: ``backbone`` features (default) or ``projection``.
        loss: ``ntxent`` (SimCLR NT-Xent, label-aware), ``supcon`` (supervised contrastive) or
            ``subcenter_arcface``.
        temperature: NT-Xent / SupCon temperature.
        arcface_margin: sub-center ArcFace margin, in degrees.
        arcface_scale: sub-center ArcFace scale.
        sub_centers: sub-centers per individual for sub-center ArcFace.
        lr: peak learning rate of AdamW (cosine decay after a linear warm-up).
        backbone_lr_scale: the backbone's learning rate relative to ``lr`` (below 1 protects pretrained features).
        weight_decay: AdamW weight decay.
        warmup_fraction: fraction of all steps spent warming the learning rate up.
        channels_last: use the channels-last memory format (faster convolutions on CPU and GPU).
        rsm_individuals: individuals shown in the RSM heatmap logged each validation (0 disables it).
    """

    def __init__(self, backbone: str = "resnet50", pretrained: bool | str = False, image_size: int = 224,
                 projection_dim: int = 128, embedding: EmbeddingSource = "backbone", loss: LossName = "ntxent",
                 temperature: float = 0.1, arcface_margin: float = 28.6, arcface_scale: float = 64.0,
                 sub_centers: int = 3, lr: float = 1e-3, backbone_lr_scale: float = 1.0, weight_decay: float = 1e-4,
                 warmup_fraction: float = 0.05, channels_last: bool = True, rsm_individuals: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        require("model.loss", loss, loss in ("ntxent", "supcon", "subcenter_arcface"),
                "ntxent, supcon or subcenter_arcface")
        require("model.image_size", image_size, image_size >= 16, "at least 16 (pixels)")
        require("model.projection_dim", projection_dim, projection_dim >= 1, ">= 1")
        for key, value in (("temperature", temperature), ("lr", lr), ("arcface_scale", arcface_scale)):
            require(f"model.{key}", value, value > 0, "> 0")
        for key, value in (("backbone_lr_scale", backbone_lr_scale), ("weight_decay", weight_decay),
                           ("arcface_margin", arcface_margin), ("rsm_individuals", rsm_individuals)):
            require(f"model.{key}", value, value >= 0, ">= 0")
        require("model.sub_centers", sub_centers, sub_centers >= 1, ">= 1")
        require("model.warmup_fraction", warmup_fraction, 0 <= warmup_fraction < 1, "in [0, 1)")
        self.encoder = Encoder(backbone, pretrained, projection_dim, embedding, image_size=image_size)
        self.preprocess: Preprocess = self.encoder.preprocess(image_size)
        self.criterion: torch.nn.Module | None = None
        #: per validation loader, (embeddings, labels, dataset indices) of each batch this rank embedded
        self._validation: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        #: the new_turtle threshold fitted at the latest validation; saved with the checkpoint of that validation
        self.calibration: HeldOutCalibration | None = None
        if loss != "subcenter_arcface":
            self.criterion = self._make_criterion(num_classes=0)

    def _make_criterion(self, num_classes: int) -> torch.nn.Module:
        hp = self.hparams
        if hp.loss == "ntxent":
            # pytorch-metric-learning's NT-Xent is label-aware: every same-individual pair in the batch is a
            # positive, so two photos of one turtle are never pushed apart as negatives.
            return losses.NTXentLoss(temperature=hp.temperature)
        if hp.loss == "supcon":
            return losses.SupConLoss(temperature=hp.temperature)
        return losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=hp.projection_dim,
                                           margin=hp.arcface_margin, scale=hp.arcface_scale, sub_centers=hp.sub_centers)

    def setup(self, stage: str) -> None:
        if self.criterion is None:
            # ArcFace learns one weight per individual, so it can only be built once the data is known.
            self.criterion = self._make_criterion(num_classes=len(self.trainer.datamodule.identities))
        if self.hparams.channels_last:
            # Here, before DDP wraps the model: its gradient buckets take the strides the weights have then.
            self.encoder.to(memory_format=torch.channels_last)

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        _, projections = self.encoder(self._images(images))
        loss = self.criterion(projections.float(), labels)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels), sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        images, labels, indices = batch
        self._validation.setdefault(dataloader_idx, []).append((self.encoder.embed(self._images(images)), labels, indices))

    def _gathered(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
        """One validation loader's embeddings and labels from every rank, each photo once, in dataset order.

        Under DDP each rank embedded a shard padded with repeats (Lightning's ``DistributedSampler``); keeping the
        first copy of each dataset index gives exactly the photos, in the order, that one process embeds.
        The tensors stay on the device until gathered: NCCL gathers GPU tensors only.
        """
        embeddings, labels, indices = (self.all_gather(torch.cat(column)) for column in zip(*batches))
        # one process: all_gather returns the tensors as they are; DDP: (world_size, n, ...) -> (world_size * n, ...)
        embeddings = embeddings.reshape(-1, embeddings.shape[-1]).cpu().numpy()
        _, first = np.unique(indices.reshape(-1).cpu().numpy(), return_index=True)
        return embeddings[first], labels.reshape(-1).cpu().numpy()[first]

    def _log_metric(self, name: str, value: float, prog_bar: bool = False) -> None:
        """Log a validation metric that every rank computed alike from the gathered photos.

        ``sync_dist`` tells Lightning the ranks agree (every rank needs the value: ``ModelCheckpoint`` monitors it on
        each); ``max`` over equal numbers gives them back exactly, where a mean could round the last bit.
        """
        self.log(name, value, prog_bar=prog_bar, sync_dist=True, reduce_fx="max")

    def on_validation_epoch_end(self) -> None:
        outputs, self._validation = self._validation, {}
        if self.trainer.sanity_checking or len(outputs) < 2:
            return
        (gallery, gallery_labels), (queries, query_labels) = self._gathered(outputs[0]), self._gathered(outputs[1])
        names = self.trainer.datamodule.identities
        gallery_ids = [names[i] for i in gallery_labels]
        query_ids = [names[i] for i in query_labels]
        result = score_rankings(search_gallery(gallery, gallery_ids, queries), query_ids, known=set(gallery_ids))
        self._log_metric("val_map5", result.metrics["map5"], prog_bar=True)
        self._log_metric("val_top1", result.metrics["top1"], prog_bar=True)
        self._log_metric("val_top5", result.metrics["top5"])
        self.calibration = calibrate_on_held_out_individuals(gallery, gallery_ids, queries, query_ids,
                                                             seed=int(self.trainer.datamodule.hparams.seed))
        if self.calibration is not None:
            self._log_metric("val_open_balanced_accuracy", self.calibration.metrics["balanced_accuracy"])
            self._log_metric("val_open_auroc", self.calibration.metrics["auroc"])
        # Trainer.log_dir is a broadcast from rank 0 under DDP: every rank must ask, or rank 0 waits forever.
        log_dir = self.trainer.log_dir if self.hparams.rsm_individuals > 0 else None
        if not self.trainer.is_global_zero:
            return
        if self.calibration is None:
            log.warning("validation has fewer than 2 individuals with both gallery photos and queries: no new_turtle "
                        "threshold can be fitted; this checkpoint will never answer new_turtle until `reid calibrate`")
        if self.hparams.rsm_individuals > 0:
            self._log_rsm(queries, query_ids, log_dir)

    def _log_rsm(self, embeddings: np.ndarray, identities: list[str], log_dir: str | None) -> None:
        """Log the validation RSM as a figure (TensorBoard) and a PNG in ``log_dir``."""
        rsm = compute_rsm(embeddings, identities, individuals=self.hparams.rsm_individuals, per_individual=8)
        figure = plot_rsm(rsm, title=f"Validation RSM, epoch {self.current_epoch}")
        if isinstance(self.logger, TensorBoardLogger):
            self.logger.experiment.add_figure("val_rsm", figure, global_step=self.global_step)
        if log_dir:
            folder = Path(log_dir) / "rsm"
            folder.mkdir(parents=True, exist_ok=True)
            figure.savefig(folder / f"epoch_{self.current_epoch:03d}.png", dpi=80, bbox_inches="tight")
        plt.close(figure)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        head = list(self.encoder.projection.parameters()) + list(self.criterion.parameters())
        optimizer = torch.optim.AdamW(
            [{"params": self.encoder.backbone.parameters(), "lr": hp.lr * hp.backbone_lr_scale},
             {"params": head, "lr": hp.lr}],
            weight_decay=hp.weight_decay,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * hp.warmup_fraction)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what is needed to embed images later without the config: see :mod:`reid.inference`."""
        hp = self.hparams
        datamodule = getattr(self.trainer, "datamodule", None)
        config = {
            "model": {k: (str(v) if isinstance(v, Path) else v) for k, v in hp.items()},
            "data": dict(datamodule.hparams) if datamodule is not None else {},
        }
        calibration = self.calibration
        checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(
            self.encoder, self.preprocess, hp.backbone, hp.projection_dim, config=config,
            threshold=None if calibration is None else calibration.threshold,
            threshold_origin=None if calibration is None else
            f"reid fit, validation of epoch {self.current_epoch}: {calibration.origin}",
        )
