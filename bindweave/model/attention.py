"""The one attention entry point of the project, over ``F.scaled_dot_product_attention``.

It runs everywhere SDPA runs (CPU included). On a GPU the SDPA backend is PyTorch's choice unless
:func:`set_sdpa_backends` names a priority order. Measured on an H100 with torch 2.11 and its
bundled cuDNN 9.19 (``benchmarks/README.md``): cuDNN attention runs the 14B self-attention shape
(39,000 tokens, 40 heads of 128) at 590 TFLOP/s forward, 1.6x the flash backend, and PyTorch
already picks it by default there (with or without a key mask), so the default is left alone.
PyTorch prefers cuDNN only on Hopper/Blackwell with a recent cuDNN (older ones gave wrong results
at some sequence lengths); forcing it elsewhere is the user's call.

Keep every attention call going through here so backend choices, masking rules and sequence
parallelism have one home.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_CUDA_BACKENDS: list[SDPBackend] | None = None


def set_sdpa_backends(backends: Sequence[SDPBackend] | None) -> None:
    """Set the SDPA backends tried for CUDA inputs, in priority order; ``None`` restores PyTorch's choice.

    Backends not listed are not used, so end with a general one (``EFFICIENT_ATTENTION``, ``MATH``)
    if some inputs may not suit the first (e.g. a key mask for flash). CPU inputs are unaffected.
    Compiled code is specialised to the setting in force when it was traced; changing it recompiles.

    Example: ``set_sdpa_backends([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])``.
    """
    global _CUDA_BACKENDS
    if backends is not None:
        backends = list(backends)
        if not backends or not all(isinstance(b, SDPBackend) for b in backends):
            raise ValueError(f"Expected a non-empty list of torch.nn.attention.SDPBackend, got {backends!r}.")
    _CUDA_BACKENDS = backends


def get_sdpa_backends() -> list[SDPBackend] | None:
    """The priority order set by :func:`set_sdpa_backends` (``None``: PyTorch's choice)."""
    return None if _CUDA_BACKENDS is None else list(_CUDA_BACKENDS)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    if q.is_cuda and _CUDA_BACKENDS is not None:
        with sdpa_kernel(_CUDA_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head attention with an optional key padding mask.

    Args:
        q: queries (B, Lq, H, Dh).
        k: keys (B, Lk, H, Dh).
        v: values (B, Lk, H, Dh).
        key_mask: (B, Lk) bool, True where a key is a real token; None attends to every key.

    Returns:
        (B, Lq, H, Dh). A sample whose keys are all masked gets zeros (that stream contributes
        nothing) instead of the NaNs a fully masked softmax would give.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
    if key_mask is None:
        out = _sdpa(q, k, v, None)  # (B, H, Lq, Dh)
        return out.transpose(1, 2)
    has_any = key_mask.any(dim=-1)  # (B,)
    # A fully masked row would be NaN: let it attend everywhere, then zero it below.
    safe_mask = key_mask | ~has_any[:, None]  # (B, Lk)
    out = _sdpa(q, k, v, safe_mask[:, None, None, :])
    out = out * has_any[:, None, None, None].to(out.dtype)  # (B, H, Lq, Dh)
    return out.transpose(1, 2)  # (B, Lq, H, Dh)
