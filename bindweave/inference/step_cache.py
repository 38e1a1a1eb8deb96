"""Step caching for sampling: skip most of a DiT call when its first block says little changed.

First-block cache (ParaAttention's FBCache, the idea of TeaCache and MagCache): consecutive
denoising steps feed the DiT nearly the same input, and how much the *first* block's residual
(output − input) moved since the last full step predicts how much the whole DiT's output would
move. Per DiT call::

    h1 = blocks[0](x)                                   # always run
    r1 = h1 − x                                         # first-block residual
    δ  = Σ|r1 − r1_full| / Σ|r1_full|   per sample, max over the batch
    δ < threshold:  out = h1 + R_full                   # skip blocks[1:], reuse their residual
    else:           out = blocks[1:](h1); R_full = out − h1; r1_full = r1

``r1_full`` and ``R_full`` are those of the last *full* step, so the error cannot creep in unseen
over a run of skips: δ grows until a full step resets it. A skipped step costs the embedders, one
block and the head (about 1/40 of a full step for a 40-block model) plus one host sync for the
decision.

Correct under batched CFG and across ranks: one decision per step for the whole batch (both CFG
halves, every request), agreed by all ranks (:class:`FirstBlockCache` sums the per-sample sums
over a sequence-parallel group, takes the maximum over a batch-parallel one). The cache is keyed by
the token shape: a call with other shapes (another request's reference count or size) starts over
with a full step; :func:`bindweave.inference.sampler.sample_videos` makes a fresh cache per video.

It drives the DiT's public stages (``embed`` / ``run_blocks`` / ``unembed``): nothing in the model
knows about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from bindweave.model.dit import DiTState, WanDiT


@dataclass
class StepCacheConfig:
    """``model.sampling.step_cache`` (off when absent).

    Args:
        kind: ``first_block`` (the only kind so far: see :mod:`bindweave.inference.step_cache`).
        threshold: skip the DiT's remaining blocks while the first block's residual has moved by
            less than this (relative L1 since the last full step). 0 never skips (identical
            videos); FBCache uses 0.05–0.1 for Wan; larger skips more and drifts more.
        warmup_steps: the first steps of a video always run in full (the layout forms there).
        max_skips: at most this many skipped steps in a row (None: no limit).
    """

    kind: Literal["first_block"] = "first_block"
    threshold: float = 0.05
    warmup_steps: int = 1
    max_skips: int | None = None

    def __post_init__(self) -> None:
        if self.kind != "first_block":
            raise ValueError(f"Unknown step_cache kind {self.kind!r}: use 'first_block'.")
        if self.threshold < 0:
            raise ValueError(f"step_cache.threshold must be >= 0, got {self.threshold}.")
        if self.warmup_steps < 1:
            raise ValueError(f"step_cache.warmup_steps must be >= 1 (the first step fills the cache), got {self.warmup_steps}.")
        if self.max_skips is not None and self.max_skips < 0:
            raise ValueError(f"step_cache.max_skips must be >= 0 or null, got {self.max_skips}.")


class FirstBlockCache:
    """The first-block cache of one video: ``run_blocks(dit, tokens, state)`` replaces
    ``dit.run_blocks(tokens, state)`` in a DiT call.

    Args:
        config: threshold and limits.
        sequence_group: ranks that hold sequence shards of the same tokens (Ulysses): the sums
            behind δ are summed over it.
        batch_group: ranks that hold different samples of the batch (CFG parallelism): δ is the
            maximum over it.

    ``steps`` lists, per call, whether it ran in full (True) or skipped (False).
    """

    def __init__(self, config: StepCacheConfig, sequence_group=None, batch_group=None) -> None:
        self.config = config
        self.sequence_group, self.batch_group = sequence_group, batch_group
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new video)."""
        self.key: tuple | None = None
        self.first_residual: torch.Tensor | None = None  # r1 of the last full step
        self.rest_residual: torch.Tensor | None = None  # R of the last full step
        self.skips_in_row = 0
        self.steps: list[bool] = []
        self.deltas: list[float] = []

    @property
    def skipped(self) -> int:
        return self.steps.count(False)

    def change(self, first_residual: torch.Tensor) -> float:
        """δ: per-sample relative L1 change of the first block's residual, max over the batch and ranks."""
        dims = tuple(range(1, first_residual.ndim))
        sums = torch.stack([  # (B, 2): Σ|r1 − r1_full|, Σ|r1_full| per sample, accumulated in fp32
            torch.linalg.vector_norm((first_residual - self.first_residual).float(), ord=1, dim=dims),
            torch.linalg.vector_norm(self.first_residual.float(), ord=1, dim=dims),
        ], dim=1)
        if self.sequence_group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.sequence_group)
        delta = (sums[:, 0] / sums[:, 1].clamp_min(1e-12)).max()
        if self.batch_group is not None:
            dist.all_reduce(delta, op=dist.ReduceOp.MAX, group=self.batch_group)
        return float(delta)  # the one host sync of a cached step

    def run_blocks(self, dit: WanDiT, tokens: torch.Tensor, state: DiTState) -> torch.Tensor:
        """``dit.run_blocks(tokens, state)``, or the first block plus the cached residual of the rest."""
        key = (tuple(tokens.shape), tokens.dtype, tokens.device, state.grid)
        if key != self.key:
            self.reset()
            self.key = key
        first = dit.run_blocks(tokens, state, 0, 1)  # (B, L, D)
        first_residual = first - tokens  # (B, L, D)
        config = self.config
        skip = False
        if self.first_residual is not None and len(self.steps) >= config.warmup_steps and (
                config.max_skips is None or self.skips_in_row < config.max_skips):
            delta = self.change(first_residual)
            self.deltas.append(delta)
            skip = delta < config.threshold
        if skip:
            self.skips_in_row += 1
            self.steps.append(False)
            return first + self.rest_residual  # (B, L, D)
        out = dit.run_blocks(first, state, 1)  # (B, L, D)
        self.first_residual, self.rest_residual = first_residual, out - first
        self.skips_in_row = 0
        self.steps.append(True)
        return out
