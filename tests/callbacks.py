"""Lightning callbacks that tests hand to `reid fit` by class path (``--trainer.callbacks+=tests.callbacks.X``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class CtrlCInSecondEpoch(Callback):
    """Stands in for a user pressing Ctrl-C once the first epoch was validated: the same exception, where Lightning
    catches it."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001 (Lightning's Trainer and module)
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


class FirstEpochScoresBest(Callback):
    """Makes the first validation the best one whatever the weights score (val_map5 1.0, then 0.0), so a test can
    tell the best checkpoint from the latest one. Runs before ModelCheckpoint, which Lightning puts last."""

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001 (Lightning's Trainer and module)
        import torch

        trainer.callback_metrics["val_map5"] = torch.tensor(1.0 if trainer.current_epoch == 0 else 0.0)
