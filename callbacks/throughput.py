"""Training speed in the logs: samples/s, FLOP/s and the share of the GPU's peak, without a sync a step."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from torch.utils.flop_counter import FlopCounterMode


class TrainingThroughput(L.Callback):
    """Logs ``throughput/*`` every ``every_n_steps`` training batches: batches and samples per second,
    FLOP/s and MFU (FLOP/s over the card's dense peak for the run's precision, Lightning's
    ``get_available_flops``; absent where Lightning does not know the card), each a rate over the
    last ``window`` logging points (Lightning's ``Throughput``: none until that many were taken).

    Lightning's ``ThroughputMonitor`` waits for the GPU after every batch to time it, which stops
    the host from queueing the next step while the GPU runs this one; this callback waits once per
    log instead. The FLOPs of a step are counted once, on the batch of step ``count_at``: its
    forward and backward run again under torch's ``FlopCounterMode`` (compiled code run eagerly
    for the count), with the RNG forked and the gradients put back, so training is the same as
    without the callback. Frozen encoders' forwards count, the backward only where gradients flow.

    Args:
        every_n_steps: log every this many training batches (one GPU wait each).
        window: logging points the rates are averaged over.
        count_at: the global step whose batch is counted (after the first steps' setup).
        count_flops: False logs samples/s only (no extra forward and backward).
    """

    def __init__(self, every_n_steps: int = 50, window: int = 4, count_at: int = 2, count_flops: bool = True) -> None:
        if every_n_steps < 1 or window < 2:
            raise ValueError(f"TrainingThroughput: every_n_steps >= 1 and window >= 2, got {every_n_steps} and {window}.")
        self.every_n_steps, self.window, self.count_at, self.count_flops = every_n_steps, window, count_at, count_flops
        self.flops_per_batch: int | None = None
        self.last: dict[str, float] = {}  # the latest logged rates
        self._meter: Throughput | None = None
        self._start = 0.0
        self._batches = self._samples = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        precision = str(trainer.precision)  # "bf16-mixed", "16-mixed", "32-true", ...
        dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32
        peak = get_available_flops(trainer.strategy.root_device, dtype)
        self._meter = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=self.window)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._batches, self._samples = time.perf_counter(), 0, 0
        self._meter.reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.count_flops and self.flops_per_batch is None and trainer.global_step >= self.count_at:
            self.flops_per_batch = count_training_flops(pl_module, batch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._batches += 1
        self._samples += len(batch["prompt"])
        if self._batches % self.every_n_steps:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # once per log: the time is the GPU's, not the host's queueing
        flops = None if self.flops_per_batch is None else self.flops_per_batch * self.every_n_steps  # since the last log
        self._meter.update(time=time.perf_counter() - self._start, batches=self._batches, samples=self._samples, flops=flops)
        self.last = {f"throughput/{k}": float(v) for k, v in self._meter.compute().items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last, step=trainer.global_step)


def count_training_flops(pl_module: L.LightningModule, batch: dict) -> int:
    """FLOPs of one training step on ``batch`` (forward + backward of ``flow_loss``), leaving the
    RNG, the gradients and any accumulated gradient as they were."""
    parameters = [p for p in pl_module.parameters() if p.requires_grad]
    kept = [p.grad for p in parameters]
    for p in parameters:
        p.grad = None
    device = next(pl_module.parameters()).device
    counter = FlopCounterMode(display=False)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.compiler.set_stance("force_eager"), counter, \
                torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            pl_module.flow_loss(batch).backward()
    finally:
        for p, grad in zip(parameters, kept):
            p.grad = grad
    return counter.get_total_flops()
