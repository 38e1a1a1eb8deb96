"""The one attention entry point of the project, over ``F.scaled_dot_product_attention``.

It runs everywhere SDPA runs (CPU included). On a GPU the SDPA backend is PyTorch's choice unless
:func:`set_sdpa_backends` names a priority order. Measured on an H100 with torch 2.11 and its
bundled cuDNN 9.19 (``benchmarks/README.md``): cuDNN attention runs the 14B self-attention shape
(39,000 tokens, 40 heads of 128) at 590 TFLOP/s forward, 1.6x the flash backend, and PyTorch
already picks it by default there (with or without a key mask), so the default is left alone.
PyTorch prefers cuDNN only on Hopper/Blackwell with a recent cuDNN (older ones gave wrong results
at some sequence lengths); forcing it elsewhere is the user's call.

:func:`set_attention_backend` (or the :func:`attention_backend` context) swaps SDPA for the FP8
Triton kernel of :mod:`bindweave.model.fp8_attention` while sampling: it is used only where no
gradient is recorded, the inputs are on a CUDA GPU of compute capability 8.9+ and the head size and
dtype suit it; elsewhere SDPA runs, and one log line per reason says why.

Keep every attention call going through here so backend choices, masking rules and sequence
parallelism have one home.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bindweave.model.fp8_attention import (FP8_MIN_KEYS, fp8_attention_op, fp8_attention_unsupported,
                                           register_fp8_attention_op)

log = logging.getLogger(__name__)

AttentionBackend = Literal["sdpa", "fp8"]
ATTENTION_BACKENDS = ("sdpa", "fp8")

_CUDA_BACKENDS: list[SDPBackend] | None = None
_BACKEND: AttentionBackend = "sdpa"
_WARNED: set[str] = set()


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


def set_attention_backend(backend: AttentionBackend) -> None:
    """``sdpa`` (the default) or ``fp8``: Q·Kᵀ and P·V on FP8 tensor cores
    (:func:`bindweave.model.fp8_attention.fp8_attention`, inference only). Where ``fp8`` cannot run
    for a call (gradients on, CPU inputs, no triton, a GPU before compute capability 8.9, an
    unsupported head size) SDPA runs instead, with one log line per reason."""
    global _BACKEND
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}.")
    if backend == "fp8":
        register_fp8_attention_op()  # before any compiled code can trace a call
    _BACKEND = backend


def get_attention_backend() -> AttentionBackend:
    """The backend set by :func:`set_attention_backend`."""
    return _BACKEND


@contextlib.contextmanager
def attention_backend(backend: AttentionBackend) -> Iterator[None]:
    """:func:`set_attention_backend` for the body of a ``with`` block, then the previous one again."""
    previous = _BACKEND
    set_attention_backend(backend)
    try:
        yield
    finally:
        set_attention_backend(previous)


def _use_fp8(q: torch.Tensor, num_keys: int) -> bool:
    if _BACKEND != "fp8":
        return False
    reason = ("FP8 attention is inference only and gradients are on" if torch.is_grad_enabled()
              else fp8_attention_unsupported(q))
    if reason is not None:
        if reason not in _WARNED:
            _WARNED.add(reason)
            log.warning("attention: %s; using SDPA instead.", reason)
        return False
    return num_keys >= FP8_MIN_KEYS  # short key sets (the text's) stay on SDPA, faster there (no message)


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
    if _use_fp8(q, k.shape[1]):
        return fp8_attention_op(q, k, v, key_mask)  # (B, Lq, H, Dh)
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
