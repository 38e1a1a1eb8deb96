"""FP8 linear layers for sampling: the DiT blocks' matrix products in float8 (torchao).

``apply_fp8(dit)`` swaps the weight of every ``nn.Linear`` inside ``dit.blocks`` (attention
projections, cross-attention keys/values, FFN) for torchao's row-wise float8 weight
(``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``): weights are quantized once,
per output row; activations per token at every call; the product runs on the FP8 tensor cores
(Ada and Hopper, compute capability 8.9+). The patch and context embedders, the timestep
embedding and modulation, the norms and the output head keep their precision: they are a small
share of the FLOPs and the places where rounding reaches every token.

Use it with a compiled DiT (``bindweave.parallel.per_block.apply_compile``): eager, the per-call
activation quantization is separate kernels and eats the gain. Where it cannot run (a CPU, an
older GPU, torchao missing or too old for this torch, a DiT not in bf16) it changes nothing and
says why in one line. The model is changed in place: quantize a copy that only samples.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from bindweave.dtypes import fp8_device_unsupported
from bindweave.model.dit import WanDiT

log = logging.getLogger(__name__)

_DONE: "weakref.WeakSet[WanDiT]" = weakref.WeakSet()


def fp8_unsupported(dit: WanDiT) -> str | None:
    """Why FP8 linears cannot run for ``dit`` here, or None when they can."""
    weight = dit.patch_embedding.weight
    reason = fp8_device_unsupported(weight.device, "FP8 linears")
    if reason is not None:
        return reason
    if weight.dtype != torch.bfloat16:
        return f"FP8 linears are set up for a bf16 DiT; this one is {weight.dtype} (use dtype=bfloat16)"
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow  # noqa: F401
    except ImportError as error:  # missing, or built for another torch
        return f"torchao with Float8DynamicActivationFloat8WeightConfig is not importable ({error}); pip install torchao"
    return None


def fp8_linear(module: nn.Module, name: str = "") -> bool:
    """Whether ``module`` is a linear layer ``apply_fp8`` quantizes (FP8 GEMMs need sizes divisible by 16)."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_fp8(dit: WanDiT) -> str | None:
    """Quantize the linear layers of ``dit.blocks`` to row-wise FP8 in place (once per DiT).

    Returns None when done (or done before), else the one-line reason it was not (also logged)."""
    if dit in _DONE:
        return None
    reason = fp8_unsupported(dit)
    if reason is not None:
        log.warning("fp8: %s; sampling in %s instead.", reason, dit.patch_embedding.weight.dtype)
        return reason
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(dit.blocks, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fp8_linear)
    _DONE.add(dit)
    return None
