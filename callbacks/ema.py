"""EMA of the weights with Lightning's public :class:`~lightning.pytorch.callbacks.WeightAveraging`.

Lightning keeps the average, swaps it in for validation, writes it as the checkpoint's
``state_dict`` (the raw weights under ``current_model_state``, restored on resume) and copies it
into the model when training ends. So ``bindweave weights export`` of a checkpoint, a ``predict``
from one, and sampling after ``fit`` all use the EMA weights. This adds torch's fused
multi-tensor EMA (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`) with a warm-up of the decay
(``min(decay, (1 + t) / (10 + t))`` at update t: without it a 0.999 average of a 2,000-step run keeps
14 % of the random initial weights; docs/results.md, ninth session), keeps the average
on the training device, and on resume fills back the frozen encoders' weights (BindWeave checkpoints
leave them out) so the average loads strictly.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(WeightAveraging):
    """Exponential moving average of the model's weights (decay per optimizer step).

    Args:
        decay: EMA decay once warmed up (0.999: an average over about the last 1,000 steps).
        warmup: ramp the decay as ``min(decay, (1 + t) / (10 + t))`` over the updates t (False: ``decay`` from the start).
        start_step: first optimizer step (0-based) that updates the average; before it the average
            follows the weights.
        device: where the average lives (default: the training device).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, start_step: int = 0, device: str | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}.")
        super().__init__(device=device, use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay, self.warmup, self.start_step = decay, warmup, start_step
        self._raw_at_end: dict[str, torch.Tensor] | None = None
        self._updated_at = 0  # the optimizer step (global_step) of the last update
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor] | None] | None = None  # (average, weights) views

    def decay_at(self, update: int) -> float:
        """The decay of the ``update``-th update of the average (0: the first, which copies the weights)."""
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._pairs = None  # views of this fit's tensors, taken at the first update
        if stage == "fit" and self._device is None:
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        """Update the average once per optimizer step, with no device-to-host sync.

        ``AveragedModel.update_parameters`` reads its on-device update count twice a step
        (``bool(n_averaged == 0)``, ``n_averaged > 0``): each read waits for the GPU to finish the
        step, so the host cannot queue the next one meanwhile. Here the count comes from the host's
        step counter and the update is torch's fused EMA (:func:`get_ema_multi_avg_fn`) itself."""
        average = self._average_model
        if average is None or trainer.global_step <= self._updated_at:
            return  # no optimizer step since the last update (gradient accumulation, or none yet)
        self._updated_at = trainer.global_step
        update = trainer.global_step - 1 - self.start_step  # < 0 before start_step: the average follows the weights
        if self._pairs is None:  # views of the same storage all fit long: ~800 fewer host ops a step than rebuilding them
            averaged = [p.detach() for p in average.module.parameters()]
            current = [p.detach() for p in pl_module.parameters()]
            if any(a.device != c.device for a, c in zip(averaged, current, strict=True)):
                current = None  # an average kept elsewhere (device=...): copy the weights over each step
            self._pairs = (averaged, current)
        averaged, current = self._pairs
        if current is None:
            current = [p.detach().to(a.device) for p, a in zip(pl_module.parameters(), averaged)]
        with torch.no_grad():
            if update <= 0:  # the first update copies (as AveragedModel's first does)
                for a, c in zip(averaged, current):
                    a.copy_(c)
            else:
                get_ema_multi_avg_fn(self.decay_at(update))(averaged, current, None)
            for a, c in zip(average.module.buffers(), pl_module.buffers(), strict=True):  # use_buffers=False: copied
                a.copy_(c.detach().to(a.device))
            average.n_averaged.fill_(max(update + 1, 0))  # on the device, asynchronous; read by no one here

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The model takes the average now; a checkpoint written after this (a last.ckpt at the end of
        # fit) must still hold the raw weights as `current_model_state`, or a resume would continue
        # from the average.
        self._raw_at_end = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        raw = self._raw_at_end
        if raw is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = raw

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # BindWeave checkpoints leave out the frozen encoders: take them from the raw model state.
        current = checkpoint.get("current_model_state")
        if current is not None:
            own = pl_module.state_dict()
            checkpoint["state_dict"] = {**{k: v for k, v in own.items() if k not in checkpoint["state_dict"]},
                                        **checkpoint["state_dict"]}
            checkpoint["current_model_state"] = {**{k: v for k, v in own.items() if k not in current}, **current}
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

