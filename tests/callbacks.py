"""Lightning callbacks that tests hand to `reid fit` by class path (``--trainer.callbacks+=tests.callbacks.X``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class CtrlCInSecondEpoch(Callback):
    """Stands in for a user pressing Ctrl-C once the first epoch was validated: the same exception, where Lightning
    catches it."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001 (Lightning's Trainer and module)
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt
