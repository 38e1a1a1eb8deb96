"""A TQDM progress bar that shows the training loss without a device sync every step."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class LossProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, plus the named metrics read only when the bar redraws.

    A metric logged with ``prog_bar=True`` is turned into a Python number by Lightning after every
    step: a device-to-host sync that stops the host from queueing the next step while the GPU runs
    this one. ``BindWeave.training_step`` logs ``train/loss`` for the loggers only; this bar reads it
    from ``trainer.callback_metrics`` when it redraws, every ``refresh_rate`` steps.

    Args:
        refresh_rate: redraw (and read the metrics) every this many steps.
        leave: keep the finished bar of each epoch on screen.
        metrics: ``callback_metrics`` keys shown on the bar.
    """

    def __init__(self, refresh_rate: int = 50, leave: bool = False, metrics: Sequence[str] = ("train/loss",)) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.metrics = tuple(metrics)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        for name in self.metrics:
            value = trainer.callback_metrics.get(name)
            if value is not None:
                items[name] = f"{float(value):.4g}"  # the sync, once a redraw
        return items
