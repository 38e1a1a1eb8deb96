"""DiT block offloading for sampling: the transformer blocks live in CPU memory and visit the GPU
a group at a time, the next group copied on a side stream while the current one computes.

Applied from outside the model with diffusers' public ``diffusers.hooks.apply_group_offloading``
(block level) to the DiT's ``blocks`` only: the embedders, the timestep modulation and the head (a
few hundred MB for Wan-14B) stay on the device, so the sampler's staged calls (``embed_context``
once per video, ``embed`` / ``run_blocks`` / ``unembed`` per step, a step cache's first block)
need nothing else. The blocks are held by a small :class:`BlockStack` whose forward runs them:
diffusers records the order in which the groups run during the first call (a full DiT call) and
from then on prefetches group i+1 while group i runs; the stack's own one-element buffer is the
top-level group diffusers starts the chain from.

What it costs: each step copies every block's weights host → device once (28 GB for the 14B DiT in
bf16), hidden behind the compute where the link is fast enough; pinned host memory for them. The
videos are the same as without it (weights are copied, not changed).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bindweave.model.dit import DiTState, WanDiT

log = logging.getLogger(__name__)

RunBlocks = Callable[[torch.Tensor, DiTState], torch.Tensor]


@dataclass
class DiTOffloadConfig:
    """``model.sampling.dit_offload`` (off when absent).

    Args:
        group_size: blocks per group copied to the device together (with ``use_stream`` diffusers
            moves one block at a time and ignores larger groups).
        use_stream: copy the next group on a side CUDA stream while the current one runs (needs
            a GPU; on the CPU the option is dropped with a message, as there is nothing to copy).
    """

    group_size: int = 1
    use_stream: bool = True

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"dit_offload.group_size must be >= 1, got {self.group_size}.")


class BlockStack(nn.Module):
    """The DiT's ``blocks`` under one module whose forward runs them (``run(tokens, state)``), so
    diffusers' hooks see every DiT call as one forward. Not part of any state dict."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks
        self.register_buffer("anchor", torch.zeros(1), persistent=False)  # diffusers' top-level group

    def forward(self, run: RunBlocks, tokens: torch.Tensor, state: DiTState) -> torch.Tensor:
        return run(tokens, state)  # (B, L, D)


_STACKS: "weakref.WeakKeyDictionary[WanDiT, tuple[BlockStack, DiTOffloadConfig]]" = weakref.WeakKeyDictionary()


def apply_dit_offload(dit: WanDiT, device: torch.device, config: DiTOffloadConfig) -> BlockStack:
    """Offload ``dit.blocks`` to the CPU, onloaded to ``device`` group by group (once per DiT;
    a second call with the same settings returns the same stack). Returns the stack to call."""
    if dit in _STACKS:
        stack, applied = _STACKS[dit]
        if applied != config:
            raise ValueError(f"The DiT is already offloaded with {applied}; build the model again to use {config}.")
        return stack
    from diffusers.hooks import apply_group_offloading

    use_stream = config.use_stream
    if use_stream and device.type != "cuda":
        log.warning("dit_offload.use_stream needs a CUDA device; the DiT runs on %s, so blocks load without a side stream.",
                    device)
        use_stream = False
    stack = BlockStack(dit.blocks)
    stack.anchor = stack.anchor.to(device)
    apply_group_offloading(stack, onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                           num_blocks_per_group=1 if use_stream else config.group_size, use_stream=use_stream)
    _STACKS[dit] = (stack, config)
    return stack


def offloaded_run_blocks(dit: WanDiT, run: RunBlocks) -> RunBlocks:
    """``run`` (a ``run_blocks(tokens, state)``) through the DiT's block stack if it is offloaded, else ``run``."""
    if dit not in _STACKS:
        return run
    stack = _STACKS[dit][0]
    return lambda tokens, state: stack(run, tokens, state)
