"""Activation checkpointing and ``torch.compile`` for :class:`~bindweave.model.dit.WanDiT`, applied from outside.

The model code stays single-device and knows nothing of either (torchtitan's ``parallelize.py``
pattern). Both functions work per transformer block, in place, and keep every module's class and
every parameter's name, so state dicts, checkpoints and FSDP wrapping by block are unaffected:

    dit = wan_dit_preset("wan2.1-i2v-14b")
    apply_activation_checkpointing(dit, "selective")  # first AC ...
    apply_compile(dit)                                  # ... then compile (the checkpointed block)

Checkpointing modes (training only; inference under ``torch.no_grad`` is unaffected):

- ``none``: keep every activation autograd wants (fastest, most memory).
- ``full``: keep only each block's input; the whole block's forward runs again in the backward
  (about one extra forward: roughly 4/3 of the step's FLOPs).
- ``selective``: keep the outputs of the attention kernels (the most expensive ops to redo: at
  480p/81 frames self-attention is over half of a 14B block's FLOPs) and recompute the rest
  (linears, norms, RoPE, modulation). Memory close to ``full``, recompute cost only the linears.
  Pass ``save_ops`` to keep other ops too (e.g. :data:`MATMUL_OPS`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

if TYPE_CHECKING:  # pragma: no cover
    from bindweave.model.dit import WanDiT

CheckpointMode = Literal["none", "full", "selective"]

_aten = torch.ops.aten

ATTENTION_OPS: frozenset = frozenset(
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(_aten, name)
)
"""The fused SDPA kernels (every backend): what ``selective`` checkpointing keeps by default."""

MATMUL_OPS: frozenset = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default})
"""Matrix products (what ``nn.Linear`` lowers to), to add to ``save_ops`` for less recompute."""

_AC_MARK = "_bindweave_checkpoint"


def apply_activation_checkpointing(
    dit: WanDiT, mode: CheckpointMode = "full", save_ops: Iterable | None = None
) -> WanDiT:
    """Checkpoint every transformer block of ``dit`` (in place; returns ``dit``).

    Args:
        dit: the model; its ``blocks`` get a checkpointed ``forward``.
        mode: ``none`` (no-op), ``full`` or ``selective`` (see the module docstring).
        save_ops: for ``selective``, the aten ops whose outputs are kept; default
            :data:`ATTENTION_OPS`.
    """
    if mode not in ("none", "full", "selective"):
        raise ValueError(f"Unknown activation checkpointing mode {mode!r}: use 'none', 'full' or 'selective'.")
    if save_ops is not None and mode != "selective":
        raise ValueError(f"save_ops only applies to mode='selective', got mode={mode!r}.")
    if mode == "none":
        return dit
    ops = list(ATTENTION_OPS if save_ops is None else save_ops)
    for index, block in enumerate(dit.blocks):
        if getattr(block, _AC_MARK, None):
            raise ValueError(
                f"Block {index} is already checkpointed ({getattr(block, _AC_MARK)!r}); apply "
                f"activation checkpointing once, on a fresh model."
            )
        _checkpoint_forward(block, ops if mode == "selective" else None)
        setattr(block, _AC_MARK, mode)
    return dit


def _checkpoint_forward(block: torch.nn.Module, save_ops: list | None) -> None:
    """Replace ``block.forward`` by a non-reentrant checkpoint of the original bound method."""
    inner = block.forward

    def context_fn():
        return create_selective_checkpoint_contexts(save_ops)

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        if save_ops is None:
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    block.forward = forward  # instance attribute: class, names and state dict stay as they were


def apply_compile(
    dit: WanDiT,
    *,
    dynamic: bool | None = None,
    fullgraph: bool = True,
    mode: str | None = None,
    backend: str = "inductor",
) -> WanDiT:
    """``torch.compile`` every transformer block of ``dit`` separately, and its output head (in place).

    Blocks of one model share their code, so this compiles once per input shape, not once per
    block. The default ``dynamic=None`` specialises to the first shape and, when a size changes,
    recompiles once with that size symbolic: training batches differ in their context lengths
    (prompts and reference counts vary), and ``dynamic=False`` would compile once per length and
    stop at dynamo's recompile limit (8) with ``fullgraph``. Apply activation checkpointing first.

    Args:
        dit: the model.
        dynamic: passed to ``torch.compile``; ``False`` specialises to every shape (one fixed-size
            workload, e.g. a benchmark), ``None`` as above.
        fullgraph: fail on a graph break instead of silently running pieces eagerly.
        mode: ``torch.compile`` mode (``None``, ``"max-autotune-no-cudagraphs"``, ...).
        backend: ``torch.compile`` backend; ``"aot_eager"`` checks tracing without code generation.
    """
    for block in dit.blocks:
        block.compile(dynamic=dynamic, fullgraph=fullgraph, mode=mode, backend=backend)
    # The head's fp32 norm and modulation are a few memory-bound passes over all tokens: fused,
    # they cost one (about 2% of a one-block forward at 480p; nothing against 40 blocks).
    dit.head.compile(dynamic=dynamic, fullgraph=fullgraph, mode=mode, backend=backend)
    return dit
