"""Checkpoints in the run's own folder, whatever the logger."""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose folder defaults to ``<trainer.default_root_dir>/checkpoints``
    (Lightning's default is the logger's versioned folder, which moves with every run).

    A config that layers another ``trainer.default_root_dir`` on top (an ablation, a second seed:
    ``--trainer.default_root_dir outputs/run-seed1``) moves the checkpoints with it, without
    repeating the callback list. ``dirpath`` still wins when given; every other argument is
    ``ModelCheckpoint``'s.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
        super().setup(trainer, pl_module, stage)
