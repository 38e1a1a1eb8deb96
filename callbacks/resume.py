"""Randomness of a training step as a function of the step, so a resumed run draws what an
uninterrupted one would."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from bindweave.data.resume import data_parallel_rank


def step_seed(seed: int, rank: int, step: int, micro_batch: int) -> int:
    """A 63-bit seed for (base seed, data-parallel rank, optimizer step, micro-batch)."""
    return random.Random(f"{seed}/{rank}/{step}/{micro_batch}").getrandbits(63)


class StepSeed(Callback):
    """Seeds torch (CPU and every GPU), numpy and Python's ``random`` before each training batch
    from (seed, data-parallel rank, global step, micro-batch of the step).

    The noise, timesteps and condition dropout of a step then depend on nothing that ran before it,
    so a run resumed from a checkpoint draws exactly what the uninterrupted run drew, with no RNG
    state in the checkpoint, whatever else used the global RNGs in between (validation, sampling
    callbacks, DataLoader start-ups, the resume itself). Saving and restoring RNG states instead
    would have to gather them from every rank and still miss those draws. Ranks of one data-parallel
    group (tensor or sequence parallel) share their batch and draw the same; different ranks draw
    differently (``seed_everything`` alone gives every rank the same stream).

    Pair it with a datamodule that resumes its data exactly (:mod:`bindweave.data.resume`).
    ``tests/test_resume.py``: 4 steps, or 2 + checkpoint + 2, end with equal weights.

    Args:
        seed: base seed; None takes the run's ``seed_everything`` seed (``PL_GLOBAL_SEED``), or 0.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._step: int | None = None
        self._micro_batch = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self._micro_batch = self._micro_batch + 1 if step == self._step else 0  # gradient accumulation
        self._step = step
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        value = step_seed(seed, data_parallel_rank(trainer)[0], step, self._micro_batch)
        torch.manual_seed(value)
        np.random.seed(value % 2**32)
        random.seed(value)
