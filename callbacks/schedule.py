"""Learning-rate schedule as a callback: linear warm-up, then cosine or linear decay.

The learning rate of step ``s`` is a pure function of ``s`` (:func:`lr_factor`) times each param
group's base rate, set before every optimizer step. Nothing is stateful, so a run resumed from a
checkpoint continues the schedule exactly (the step count comes from the trainer, the base rate
is kept in the optimizer's state as ``initial_lr``). Works with any optimizer and config:

    trainer:
      callbacks:
        - class_path: callbacks.LRSchedule
          init_args: {warmup_steps: 300, total_steps: 2000, decay: cosine, min_factor: 0.05}

**A wall-clock budget** instead of a step count (``budget: "00:00:25:00"``, Lightning's
``max_time`` format, or seconds): the callback times ``measure_steps`` steps after the first
``skip_steps`` of the run (compilation, loader start), turns the budget left into a step count at
that rate, and from then on the schedule is the step schedule above with that total, kept in the
checkpoint: resumed chunks (each under its own ``trainer.max_time``) continue it exactly, and
training stops at the total. Until ``refine_until`` of the budget is spent, the total is estimated
again every ``measure_steps`` steps from the rate over the later half of the steps timed. A rate read off
steps 50–200 alone was 8.27 steps/s in an H100 run that averaged 10.4 (its schedule ended after
374 s of a 420-s budget, at 3,271 steps) and 17.68 in one that averaged 15.4 (stopped by its
``max_time`` before its total).
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


def budget_seconds(budget: str | float | int) -> float:
    """Seconds of a budget given as seconds or as Lightning's ``max_time`` string ``DD:HH:MM:SS``."""
    if isinstance(budget, (int, float)) or ":" not in str(budget):  # seconds (a command line gives "600")
        try:
            seconds = float(budget)
        except ValueError:
            raise ValueError(f"LRSchedule: budget must be seconds or 'DD:HH:MM:SS', got {budget!r}.") from None
    else:
        parts = [float(p) for p in str(budget).split(":")]
        if len(parts) != 4:
            raise ValueError(f"LRSchedule: budget must be seconds or 'DD:HH:MM:SS', got {budget!r}.")
        seconds = timedelta(days=parts[0], hours=parts[1], minutes=parts[2], seconds=parts[3]).total_seconds()
    if seconds <= 0:
        raise ValueError(f"LRSchedule: budget must be positive, got {budget!r}.")
    return seconds


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
            resumed chunks); None: the trainer's ``max_steps`` (or the budget's).
        decay: ``cosine``, ``linear`` or ``constant`` after the warm-up.
        min_factor: the final learning rate as a fraction of the base one.
        budget: the run's whole training time (seconds or ``DD:HH:MM:SS``) instead of a step
            count: turned into ``total_steps`` once the step rate is measured; the run stops there.
        skip_steps: budget mode: steps of each run left out before timing (compilation).
        measure_steps: budget mode: steps timed before the first estimate of the total, and between
            its refinements.
        refine_until: budget mode: the fraction of the budget after which the total is fixed (0: the
            first estimate is final).
    """

    def __init__(self, warmup_steps: int = 0, total_steps: int | None = None,
                 decay: Literal["cosine", "linear", "constant"] = "cosine", min_factor: float = 0.0,
                 budget: str | float | None = None, skip_steps: int = 50, measure_steps: int = 150,
                 refine_until: float = 0.25) -> None:
        if warmup_steps < 0 or (total_steps is not None and total_steps < 1):
            raise ValueError(f"LRSchedule: warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}.")
        if decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"LRSchedule: decay must be cosine, linear or constant, got {decay!r}.")
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"LRSchedule: min_factor must be in [0, 1], got {min_factor}.")
        if budget is not None and total_steps is not None:
            raise ValueError("LRSchedule: give total_steps or budget, not both.")
        if skip_steps < 0 or measure_steps < 1:
            raise ValueError(f"LRSchedule: skip_steps must be >= 0 and measure_steps >= 1, got {skip_steps}, {measure_steps}.")
        self.warmup_steps, self.total_steps, self.decay, self.min_factor = warmup_steps, total_steps, decay, min_factor
        self.budget = None if budget is None else budget_seconds(budget)
        if not 0.0 <= refine_until <= 1.0:
            raise ValueError(f"LRSchedule: refine_until must be in [0, 1], got {refine_until}.")
        self.skip_steps, self.measure_steps, self.refine_until = skip_steps, measure_steps, refine_until
        self.final = False  # budget mode: the total is fixed (refine_until of the budget spent)
        self.spent_before = 0.0  # seconds of training in earlier chunks (budget mode)
        self._chunk: tuple[int, float] | None = None  # (step, clock) where this chunk's training began
        self._marks: list[tuple[int, float]] = []  # (step, clock) where the timing began, then of each estimate

    def factor(self, trainer: L.Trainer, step: int) -> float:
        if self.budget is not None:
            if self.total_steps is None:  # not measured yet: warm-up, then the base rate
                return lr_factor(step, self.warmup_steps, step + 1, "constant")
            total = self.total_steps
        else:
            total = self.total_steps if self.total_steps is not None else trainer.max_steps
        if total is None or total < 0:
            raise ValueError("LRSchedule needs total_steps, a budget or the trainer's max_steps.")
        return lr_factor(step, self.warmup_steps, total, self.decay, self.min_factor)

    def spent(self) -> float:
        """Seconds of training under this schedule so far (earlier chunks included)."""
        return self.spent_before + (time.monotonic() - self._chunk[1] if self._chunk else 0.0)

    def _measure(self, trainer: L.Trainer, step: int) -> None:
        """Budget mode: time steps after ``skip_steps``; every ``measure_steps`` steps, estimate the
        total from the rate over the later half of the steps timed in this chunk (a slow start drops
        out), until ``refine_until`` of the budget is spent. Rank 0's estimate and its "final" flag are
        broadcast at the same step on every rank (which step is a function of the step count alone):
        all ranks keep one schedule and stop together."""
        now = time.monotonic()
        if not self._marks:
            if step >= self._chunk[0] + self.skip_steps:
                self._marks = [(step, now)]
            return
        timed = step - self._marks[0][0]
        if timed < self.measure_steps or timed % self.measure_steps:
            return
        since = self._marks[len(self._marks) // 2]
        self._marks.append((step, now))
        rate = (step - since[0]) / max(now - since[1], 1e-9)  # steps per second
        left = max(0.0, self.budget - self.spent())
        first = self.total_steps is None
        total, final = trainer.strategy.broadcast(
            (max(step + 1, step + round(left * rate)), self.spent() >= self.refine_until * self.budget), src=0)
        self.total_steps, self.final = int(total), bool(final)
        if first or self.final:
            rank_zero_info(f"LRSchedule: {rate:.2f} steps/s over steps {since[0]}-{step}; the budget's "
                           f"{left:.0f} s left make {self.total_steps} steps in all"
                           + (" (fixed)" if self.final else " (refined until "
                              f"{self.refine_until:.0%} of the budget is spent)"))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._chunk, self._marks = (trainer.global_step, time.monotonic()), []

    def state_dict(self) -> dict:
        if self.budget is None:
            return {}
        return {"total_steps": self.total_steps, "spent_seconds": self.spent(), "final": self.final}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.budget is not None and state_dict:
            self.total_steps = state_dict["total_steps"]
            self.spent_before = float(state_dict["spent_seconds"])
            self.final = bool(state_dict.get("final", True))  # checkpoints from before refining: fixed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.budget is not None and self.total_steps is not None and trainer.global_step >= self.total_steps:
            trainer.should_stop = True  # the budget's steps are done

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.budget is not None and not self.final and self._chunk is not None:
            self._measure(trainer, trainer.global_step)
        factor = self.factor(trainer, trainer.global_step)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])  # saved with the optimizer: resume keeps it
                group["lr"] = group["initial_lr"] * factor
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
