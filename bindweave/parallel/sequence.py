"""Sequence parallelism (Ulysses) and batch/CFG parallelism for the DiT, applied from outside.

Ulysses (DeepSpeed-Ulysses): every rank holds L/P of the video tokens. Per-token work (linears,
norms, RoPE, modulation, cross-attention against the full condition tokens, FFN) needs no
communication; self-attention swaps the split from sequence to heads with one all-to-all, attends
over the full sequence for H/P heads, and swaps back with a second all-to-all:

    (B, L/P, H, Dh) ──all-to-all──▶ (B, L, H/P, Dh) ──attention──▶ ──all-to-all──▶ (B, L/P, H, Dh)

CFG parallelism: the conditional and unconditional halves of the batched CFG call run on different
ranks (:func:`batch_parallel_forward` splits any batch across a group).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from bindweave.model.attention import attention
from bindweave.model.dit import WanDiT


def _all_to_all(x: torch.Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into P chunks along ``scatter_dim``, send chunk r to rank r, and concatenate the
    received chunks along ``gather_dim``. Differentiable (its backward is the reverse all-to-all)."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        world = dist.get_world_size(group)
        inputs = [t.contiguous() for t in x.chunk(world, dim=scatter_dim)]
        outputs = [torch.empty_like(t) for t in inputs]
        dist.all_to_all(outputs, inputs, group=group)
        return torch.cat(outputs, dim=gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, *, group: ProcessGroup
) -> torch.Tensor:
    """Self-attention over a sequence split across ``group``.

    Args:
        q, k, v: this rank's sequence shard (B, L/P, H, Dh); H must be divisible by P.
        key_mask: (B, L) bool over the FULL sequence, or None.

    Returns:
        (B, L/P, H, Dh), equal to this rank's rows of full attention.
    """
    world = dist.get_world_size(group)
    if q.shape[2] % world:
        raise ValueError(f"Ulysses needs the head count ({q.shape[2]}) divisible by the group size ({world}).")
    q, k, v = (_all_to_all(t, group, scatter_dim=2, gather_dim=1) for t in (q, k, v))  # (B, L, H/P, Dh)
    out = attention(q, k, v, key_mask)  # (B, L, H/P, Dh)
    return _all_to_all(out, group, scatter_dim=1, gather_dim=2)  # (B, L/P, H, Dh)


class _GatherSequence(torch.autograd.Function):
    """All-gather sequence shards along dim 1; the backward keeps this rank's shard of the grad."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=1)[rank].contiguous(), None


@contextmanager
def _ulysses_self_attention(dit: WanDiT, group: ProcessGroup) -> Iterator[None]:
    kernels = [block.self_attn.attention_fn for block in dit.blocks]
    try:
        for block in dit.blocks:
            block.self_attn.attention_fn = partial(ulysses_attention, group=group)
        yield
    finally:
        for block, kernel in zip(dit.blocks, kernels):
            block.self_attn.attention_fn = kernel


def sequence_parallel_forward(dit: WanDiT, group: ProcessGroup, *args, run_blocks=None, **kwargs) -> torch.Tensor:
    """``dit(*args, **kwargs)`` with its tokens split across ``group`` (every rank passes the same
    inputs and gets the full output). The token count must be divisible by the group size.
    ``run_blocks(tokens, state)`` replaces ``dit.run_blocks`` on this rank's shard (a step cache).

    Differentiable: each rank's gradients of the parameters (and of the inputs) are its shard's
    share, so their sum over the group is the full gradient (:func:`apply_sequence_parallel` is the
    training form)."""
    with _ulysses_self_attention(dit, group):
        return _sharded_forward(dit, group, *args, run_blocks=run_blocks, **kwargs)


def _sharded_forward(dit: WanDiT, group: ProcessGroup, *args, run_blocks=None, **kwargs) -> torch.Tensor:
    """The DiT's stages with the blocks and the head on this rank's rows; the self-attention kernel
    must already be Ulysses'. The head runs on the shard too, so that no parameter's gradient is
    counted once per rank: everything after the embedding sees only this rank's tokens."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    state = dit.embed(*args, **kwargs)
    length = state.tokens.shape[1]
    if length % world:
        raise ValueError(
            f"{length} video tokens do not split over {world} ranks; choose a size whose token count "
            f"(latent frames × H/16 × W/16) is divisible by the sequence-parallel degree."
        )
    rows = slice(rank * length // world, (rank + 1) * length // world)
    state.cos, state.sin = state.cos[rows], state.sin[rows]  # this shard's positions
    tokens = (run_blocks or dit.run_blocks)(state.tokens[:, rows], state)  # (B, L/P, D); keys use the full token_mask
    out = _GatherSequence.apply(dit.head(tokens, state.time_emb), group)  # (B, L, C_out·pt·ph·pw)
    return dit.unpatchify(out, state)  # (B, C_out, F, H, W)


def apply_sequence_parallel(dit: WanDiT, group: ProcessGroup) -> WanDiT:
    """Make every call of ``dit`` sequence-parallel over ``group``, in place (training: ``model.
    parallelism.sequence_parallel``). Every rank of the group passes the same inputs and gets the
    full output; the summed gradients over the group are the full ones. The Ulysses kernel is
    installed for good (not per call), so activation checkpointing recomputes with it. Apply
    before activation checkpointing, compile and FSDP, as the other wrappers."""
    for block in dit.blocks:
        block.self_attn.attention_fn = partial(ulysses_attention, group=group)
    dit.forward = partial(_sharded_forward, dit, group)  # instance attribute: class and state dict unchanged
    return dit


def _split_batch(value, rank: int, world: int):
    if isinstance(value, torch.Tensor):
        return value.chunk(world, dim=0)[rank]
    if isinstance(value, dict):
        return {k: _split_batch(v, rank, world) for k, v in value.items()}
    return value


def batch_parallel_forward(dit: WanDiT, group: ProcessGroup, *args, **kwargs) -> torch.Tensor:
    """``dit(*args, **kwargs)`` with the batch split across ``group`` and the outputs all-gathered.

    With the CFG-batched call (conditional and unconditional halves stacked), two ranks each run one
    half: CFG parallelism. Every rank passes the same inputs and gets the full output; the batch
    must be divisible by the group size.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    batch = args[0].shape[0]
    if batch % world:
        raise ValueError(f"Batch {batch} does not split over {world} ranks.")
    out = dit(*(_split_batch(a, rank, world) for a in args), **{k: _split_batch(v, rank, world) for k, v in kwargs.items()})
    parts = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=0)
