"""The Lightning module: a timm encoder trained contrastively, its validation, and its checkpoint metadata.

Training: each batch holds P individuals with K different photos each (served by
:class:`reid.data.datamodule.ReIDDataModule`), under a contrastive loss on the projection head.
Validation: validation photos (queries) are searched against training photos (gallery) exactly as the service
does, scored by Zindi's MAP@5, a new_turtle threshold is fitted on held-out individuals, and an RSM heatmap of the
queries is logged. Each checkpoint carries what is needed to embed images later (:mod:`reid.inference`).

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
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from pytorch_metric_learning import losses

from reid.data.transforms import Preprocess
from reid.errors import ConfigError, require
from reid.evaluation import HeldOutCalibration, calibrate_on_held_out_individuals, score_rankings, search_gallery
from reid.inference import CHECKPOINT_KEY, checkpoint_metadata
from reid.metrics import THRESHOLD_OBJECTIVES, ThresholdObjective
from reid.model import EmbeddingSource, Encoder, embed_views
from reid.rsm import compute_rsm, plot_rsm
from reid.weights import check_input_size

log = logging.getLogger(__name__)

LossName = Literal["ntxent", "supcon", "subcenter_arcface"]


def arcface_individuals(checkpoint: dict[str, Any]) -> int | None:
    """How many individuals a training checkpoint's sub-center ArcFace learnt (one set of sub-centers each), or None
    for the losses that learn no per-individual weights: a resume must train on that many."""
    weights = checkpoint.get("state_dict", {}).get("criterion.W")
    if weights is None:
        return None
    return int(weights.shape[1]) // int(checkpoint.get("hyper_parameters", {}).get("sub_centers", 1))


def arcface_resume_error(learnt: int, data: int) -> ConfigError:
    """The refusal of a resume whose ArcFace weights cannot fit the data's individuals (said the same by the CLI, which
    checks before the run's folder is made, and by the module, for fits started from Python)."""
    return ConfigError(f"this checkpoint's sub-center ArcFace learnt {learnt} individuals, and the data has {data}: "
                       "resume on the data it was trained on, or start a new fit from its weights with "
                       "--model.pretrained")


class ReIDModule(L.LightningModule):
    """A timm encoder trained contrastively for re-identification.

    Args:
        backbone: any timm model name (e.g. ``resnet50``, ``mobilenetv2_100``).
        pretrained: ``true`` (timm model hub), ``false``, a local weights file, or ``imagenet-offline``.
        image_size: square input size of the encoder in training (its random crops are resized to it).
        test_image_size: input size for embedding in validation, evaluation, prediction and serving (stored with the
            checkpoint); ``None``: ``image_size``. Trained on random crops, a CNN sees a turtle's scales larger than
            in the whole photo resized to the same size, and testing at a larger size gives them back their apparent
            size (FixRes, Touvron et al., 2019; timm's ``test_input_size``). Architectures built for one input size
            (ViTs) must keep it equal to ``image_size``.
        test_crops: test-time zoom: centre crops (fractions of the photo's sides, e.g. ``[0.5]``) embedded beside the
            whole photo, wherever a photo is embedded outside training (validation included), and stored with the
            checkpoint; the embedding is the normalised mean of the views (:class:`reid.data.transforms.Preprocess`).
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
        runner_up_weight: how much the second individual's score raises the new_turtle threshold's bar in each
            answer (:func:`reid.metrics.new_turtle_bar`); the threshold fitted at validation, and the one ``verify``
            fits on fused scores, are fitted with it and stored with it. 0: the plain threshold.
        threshold_objective: what those thresholds are fitted to maximise on the held-out folds
            (:data:`reid.metrics.ThresholdObjective`): ``map5``, the Zindi score of whole answers, or
            ``balanced_accuracy``, the new_turtle decision of the first answer; stored with the checkpoint, and
            what ``reid calibrate`` fits for unless told otherwise.
    """

    def __init__(self, backbone: str = "resnet50", pretrained: bool | str = False, image_size: int = 224,
                 test_image_size: int | None = None, test_crops: list[float] | None = None, projection_dim: int = 128,
                 embedding: EmbeddingSource = "backbone", loss: LossName = "ntxent",
                 temperature: float = 0.1, arcface_margin: float = 28.6, arcface_scale: float = 64.0,
                 sub_centers: int = 3, lr: float = 1e-3, backbone_lr_scale: float = 1.0, weight_decay: float = 1e-4,
                 warmup_fraction: float = 0.05, channels_last: bool = True, rsm_individuals: int = 16,
                 runner_up_weight: float = 0.0, threshold_objective: ThresholdObjective = "map5") -> None:
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
        require("model.runner_up_weight", runner_up_weight, 0 <= runner_up_weight <= 1, "in [0, 1]")
        require("model.threshold_objective", threshold_objective, threshold_objective in THRESHOLD_OBJECTIVES,
                " or ".join(THRESHOLD_OBJECTIVES))
        self.encoder = Encoder(backbone, pretrained, projection_dim, embedding, image_size=image_size)
        if test_image_size is not None and test_image_size != image_size:
            # a ViT built for image_size fails here, naming the setting, not at the first validation
            require("model.test_image_size", test_image_size, test_image_size >= 16, "at least 16 (pixels)")
            check_input_size(self.encoder.backbone, test_image_size, lambda failure: ConfigError(
                f"model.test_image_size: {backbone} cannot embed {test_image_size} px photos when built for "
                f"model.image_size {image_size} ({failure}); set test_image_size to image_size, or leave it out"))
        #: how every photo is embedded outside training: saved with the checkpoint, used by evaluate, serve, predict
        try:
            self.preprocess: Preprocess = self.encoder.preprocess(test_image_size or image_size, tuple(test_crops or ()))
        except ConfigError as error:
            raise ConfigError(f"model.test_crops: {error}") from error
        #: training batches arrive as uint8 pixels (a quarter of the bytes to copy to the GPU) and are normalised here
        self.normalise_pixels = self.preprocess.pixel_normaliser()
        self.criterion: torch.nn.Module | None = None
        #: per validation loader, (embeddings, labels, dataset indices) of each batch this rank embedded
        self._validation: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
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
        # channels_last while still uint8 (a quarter of the bytes to reorder); normalising keeps the layout
        _, projections = self.encoder(self.normalise_pixels(self._images(images)))
        loss = self.criterion(projections.float(), labels)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels), sync_dist=True)
        return loss

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The L2-normalised retrieval embeddings of a batch of photos as the evaluation transform makes them
        (``B x 3 x H x W``, or ``B x V x 3 x H x W`` with test crops): what validation and :class:`Embedder` compute,
        for ``model(images)`` and Lightning's ``trainer.predict``."""
        views = images.unsqueeze(1) if images.dim() == 4 else images
        return embed_views(lambda batch: self.encoder.embed(self._images(batch)), views)

    def predict_step(self, batch: tuple[torch.Tensor, ...] | torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Embeddings of a batch from this project's loaders (``(photos, labels, indices)``) or of photos alone."""
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels, indices = batch
        embeddings = self(images)
        self._validation.append((embeddings, labels, indices))

    def _gathered(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The validation embeddings, labels and dataset indices from every rank, each photo once, in dataset order.

        Under DDP each rank embedded a shard padded with repeats (Lightning's ``DistributedSampler``); keeping the
        first copy of each dataset index gives exactly the photos, in the order, that one process embeds.
        The tensors stay on the device until gathered: NCCL gathers GPU tensors only.
        """
        embeddings, labels, indices = (self.all_gather(torch.cat(column)) for column in zip(*batches))
        # one process: all_gather returns the tensors as they are; DDP: (world_size, n, ...) -> (world_size * n, ...)
        embeddings = embeddings.reshape(-1, embeddings.shape[-1]).cpu().numpy()
        kept, first = np.unique(indices.reshape(-1).cpu().numpy(), return_index=True)
        return embeddings[first], labels.reshape(-1).cpu().numpy()[first], kept

    def _log_metric(self, name: str, value: float, prog_bar: bool = False) -> None:
        """Log a validation metric that every rank computed alike from the gathered photos.

        ``sync_dist`` tells Lightning the ranks agree (every rank needs the value: ``ModelCheckpoint`` monitors it on
        each); ``max`` over equal numbers gives them back exactly, where a mean could round the last bit.
        """
        self.log(name, value, prog_bar=prog_bar, sync_dist=True, reduce_fx="max")

    def on_validation_epoch_end(self) -> None:
        batches, self._validation = self._validation, []
        if self.trainer.sanity_checking or not batches:
            return
        embeddings, labels, indices = self._gathered(batches)
        is_query = self.trainer.datamodule.validation_records["query"].to_numpy()[indices]
        if is_query.all() or not is_query.any():  # only when validation was cut to a batch or two
            # an error, not a warning: with no val_map5 the checkpoint callback would stop the fit with a traceback
            raise ConfigError(f"validation embedded {int(is_query.sum())} query and {int((~is_query).sum())} "
                              "gallery photos: scoring needs both; raise --trainer.limit_val_batches or "
                              "--data.eval_batch_size")
        gallery, gallery_labels = embeddings[~is_query], labels[~is_query]
        queries, query_labels = embeddings[is_query], labels[is_query]
        # Scored on the integer labels themselves: the ranking code only compares individuals for equality, and the
        # labels follow the names' sorted order, so the held-out folds are the ones the names would give.
        gallery_ids, query_ids = gallery_labels.tolist(), query_labels.tolist()
        result = score_rankings(search_gallery(gallery, gallery_ids, queries), query_ids, known=set(gallery_ids))
        self._log_metric("val_map5", result.metrics["map5"], prog_bar=True)
        self._log_metric("val_top1", result.metrics["top1"], prog_bar=True)
        self._log_metric("val_top5", result.metrics["top5"])
        self.calibration = calibrate_on_held_out_individuals(gallery, gallery_ids, queries, query_ids,
                                                             seed=int(self.trainer.datamodule.hparams.seed),
                                                             runner_up_weight=self.hparams.runner_up_weight,
                                                             objective=self.hparams.threshold_objective)
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
            names = self.trainer.datamodule.identities  # the heatmap's axes name the individuals
            self._log_rsm(queries, [names[label] for label in query_ids], log_dir)

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

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = self.optimizer_and_scheduler(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_and_scheduler(self, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW with the backbone at ``backbone_lr_scale`` of the head's rate, and a per-step schedule: linear
        warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay. Public so that a plain PyTorch loop
        (bench/training_overhead.py) trains with exactly what Lightning gets."""
        hp = self.hparams
        head = list(self.encoder.projection.parameters()) + list(self.criterion.parameters())
        optimizer = torch.optim.AdamW(
            [{"params": self.encoder.backbone.parameters(), "lr": hp.lr * hp.backbone_lr_scale},
             {"params": head, "lr": hp.lr}],
            weight_decay=hp.weight_decay,
        )
        total = max(1, total_steps)
        warmup = int(total * hp.warmup_fraction)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> ReIDModule:  # type: ignore[override]
        """Lightning's loading, without rebuilding the *starting* weights (``pretrained``): every weight is in the
        checkpoint, and the starting file may be gone, or need a download. ``pretrained=...`` still overrides."""
        kwargs.setdefault("pretrained", False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Sub-center ArcFace's weights (one set per individual) are in the checkpoint, but its criterion is built
        only once the data is known (:meth:`setup`): build it to the checkpoint's size to load them, where the loss is
        not trained on (``load_from_checkpoint``, ``reid validate`` on other data). Resuming a fit needs the
        individuals it was trained on."""
        learnt = arcface_individuals(checkpoint)
        if learnt is None or (self.criterion is not None
                              and self.criterion.W.shape == checkpoint["state_dict"]["criterion.W"].shape):
            return
        if self._trainer is not None and self._trainer.state.fn == "fit":
            raise arcface_resume_error(learnt, self.criterion.W.shape[1] // self.hparams.sub_centers)
        self.criterion = self._make_criterion(num_classes=learnt)

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
            runner_up_weight=hp.runner_up_weight, threshold_objective=hp.threshold_objective,
        )
