"""Int8 weight storage for export folders: half the bytes of bfloat16, read back as floats.

A quantized export stores each large matrix ``W`` (a ``Linear``/``Conv`` weight: at least two
dimensions and :data:`MIN_ELEMENTS` elements) as::

    <key>                int8, W's shape        round(W / scale), in [-127, 127]
    <key>@int8_scale     (W.shape[0], 1, ...)   per output channel: max |W[i]| / 127, in W's dtype

and every other tensor (norms, biases, modulation tables) as it was. :class:`bindweave.weights.loading.Checkpoint`
folds the pairs back together, so loaders see ``<key>`` with W's shape and dtype and read
``int8 * scale``: quantization is a storage format, not a model change (no int8 kernels run).
The error per weight is at most half a step (``scale / 2``, 0.4 % of its row's largest value), plus
the rounding of the result (and of the scales) to the stored dtype.
"""

from __future__ import annotations

import torch

SCALE_SUFFIX = "@int8_scale"
"""Suffix of the key holding a quantized tensor's per-output-channel scales."""

MIN_ELEMENTS = 4096
"""Smaller tensors stay in floating point: the bytes saved are negligible and they are often tables
(adaLN modulation) whose rows are not output channels."""


def should_quantize(tensor: torch.Tensor) -> bool:
    """Whether :func:`quantize_state_dict` stores ``tensor`` as int8 (large float matrices only)."""
    return (tensor.is_floating_point() and tensor.dim() >= 2 and tensor.shape[0] > 1
            and tensor.numel() >= MIN_ELEMENTS)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(q, scale)`` with ``weight ≈ q * scale``; ``scale`` has
    ``weight``'s dtype and shape ``(out, 1, ...)``. All-zero rows get scale 1 (q = 0)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)  # (out, 1, ...)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax)).to(weight.dtype)
    q = torch.round(w / scale.float()).clamp_(-127, 127).to(torch.int8)
    return q, scale


FP8_SCALE_SUFFIX = ".scale_weight"
"""ComfyUI's "scaled fp8" layout of the community's Wan files: ``<module>.weight`` in float8 and
``<module>.scale_weight`` (a float32 scalar or per-row vector) with ``weight ≈ fp8 * scale``; a
``scaled_fp8`` marker tensor and ``<module>.scale_input`` (for FP8 matmuls) come with them."""

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in ``scale``'s dtype (computed in float32); ``q`` is int8 or float8."""
    if q.dtype != torch.int8 and q.dtype not in FP8_DTYPES:
        raise ValueError(f"dequantize expects int8 or float8 values, got {q.dtype}.")
    return (q.float() * scale.float()).to(scale.dtype)


def quantize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every large float matrix (:func:`should_quantize`) as int8 + ``@int8_scale``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(SCALE_SUFFIX):
            raise ValueError(f"{key}: the state dict is already quantized.")
        if should_quantize(tensor):
            out[key], out[key + SCALE_SUFFIX] = quantize(tensor)
        else:
            out[key] = tensor
    return out
