"""Learning-rate schedule as a callback: linear warm-up, then cosine or linear decay.

The learning rate of step ``s`` is a pure function of ``s`` (:func:`lr_factor`) times each param
group's base rate, set before every optimizer step. Nothing is stateful, so a run resumed from a
checkpoint continues the schedule exactly (the step count comes from the trainer, the base rate
is kept in the optimizer's state as ``initial_lr``). Works with any optimizer and config:

    trainer:
      callbacks:
        - class_path: callbacks.LRSchedule
          init_args: {warmup_steps: 300, total_steps: 2000, decay: cosine, min_factor: 0.05}
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import Callback


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "cosine", min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, then
    ``cosine`` or ``linear`` decay to ``min_factor`` at ``total_steps`` (held after), or ``constant``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_factor + (1 - min_factor) * shape


class LRSchedule(Callback):
    """Set every param group's learning rate to ``initial_lr × lr_factor(step)`` before each step.

    Args:
        warmup_steps: steps of linear warm-up.
        total_steps: the step at which the decay ends (the run's whole length, over all its
            resumed chunks); None: the trainer's ``max_steps``.
        decay: ``cosine``, ``linear`` or ``constant`` after the warm-up.
        min_factor: the final learning rate as a fraction of the base one.
    """

    def __init__(self, warmup_steps: int = 0, total_steps: int | None = None,
                 decay: Literal["cosine", "linear", "constant"] = "cosine", min_factor: float = 0.0) -> None:
        if warmup_steps < 0 or (total_steps is not None and total_steps < 1):
            raise ValueError(f"LRSchedule: warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}.")
        if decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"LRSchedule: decay must be cosine, linear or constant, got {decay!r}.")
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"LRSchedule: min_factor must be in [0, 1], got {min_factor}.")
        self.warmup_steps, self.total_steps, self.decay, self.min_factor = warmup_steps, total_steps, decay, min_factor

    def factor(self, trainer: L.Trainer, step: int) -> float:
        total = self.total_steps if self.total_steps is not None else trainer.max_steps
        if total is None or total < 0:
            raise ValueError("LRSchedule needs total_steps or the trainer's max_steps.")
        return lr_factor(step, self.warmup_steps, total, self.decay, self.min_factor)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        factor = self.factor(trainer, trainer.global_step)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])  # saved with the optimizer: resume keeps it
                group["lr"] = group["initial_lr"] * factor
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
