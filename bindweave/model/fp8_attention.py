"""FP8 attention for sampling: a Triton flash-attention forward with Q and K in float8 (SageAttention's scheme).

``fp8_attention(q, k, v, key_mask)`` takes what :func:`bindweave.model.attention.attention` takes
((B, L, H, Dh) bf16/fp16, an optional (B, Lk) key mask) and returns the same (B, Lq, H, Dh). It is
inference only (no backward) and CUDA only (FP8 tensor cores: compute capability 8.9+); callers go
through :func:`bindweave.model.attention.attention` with ``set_attention_backend("fp8")``, which
falls back to SDPA where this cannot run.

Quantization (one Triton pass per tensor, then the attention kernel):

* K is *smoothed* first: its mean over tokens is subtracted per (batch, head, channel). That
  shifts every score of a query row by the same amount, so the softmax is unchanged, and it
  removes the large shared offset of K that would otherwise eat the FP8 range.
* Q per (batch, head, ``block_m`` rows) and K per (batch, head, ``block_n`` rows) get one scale
  each (amax / 448, float8_e4m3fn), the tiles the kernel works on, so ``QKᵀ`` is rescaled by one
  scalar per tile (with the softmax scale folded in).
* ``pv="fp8"``: V is smoothed the same way (its mean added back to the output, since each row of
  P sums to one), scaled per channel and stored transposed (Hopper's FP8 MMA wants the second
  operand K-major); P is multiplied by 256 before its FP8 cast (free: folded into the exponent)
  so small probabilities do not underflow. ``pv="bf16"``: P·V in the input dtype, V read as is.

:func:`reference_fp8_attention` is the same quantization in plain torch followed by SDPA on the
dequantized tensors: the error a quantization scheme costs, on any device.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from bindweave.dtypes import fp8_device_unsupported

try:
    import triton
    import triton.language as tl
except ImportError:  # the SDPA fallback says so
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
P_SHIFT = 8.0
"""P·V in FP8: probabilities are exp2(s - max + 8) = 256·p, in [0, 256] (inside e4m3's 448); the
factor cancels in the row sum."""
_TINY = 1e-12


def fp8_attention_unsupported(q: torch.Tensor) -> str | None:
    """Why the FP8 kernel cannot run for ``q`` here, or None when it can."""
    if triton is None:
        return "FP8 attention needs triton (pip install triton)"
    return fp8_device_unsupported(q.device, "FP8 attention kernels") or fp8_shape_unsupported(q)


def fp8_shape_unsupported(q: torch.Tensor) -> str | None:
    """Why the kernel cannot take this head size / dtype, or None."""
    head_dim = q.shape[-1]
    if head_dim not in (16, 32, 64, 128, 256):
        return f"FP8 attention supports head sizes 16, 32, 64, 128, 256; got {head_dim}"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"FP8 attention takes bf16/fp16 inputs; got {q.dtype}"
    return None


# ---------------------------------------------------------------------------------------------
# Pure torch reference: the same quantization, dequantized, through SDPA.
# ---------------------------------------------------------------------------------------------

def _fake_quant_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (B, H, L, D) float32 → quantized to FP8 per (B, H, ``block`` rows) and dequantized."""
    B, H, L, D = x.shape
    n = -(-L // block)
    blocks = F.pad(x, (0, 0, 0, n * block - L)).view(B, H, n, block, D)
    scale = blocks.abs().amax(dim=(3, 4), keepdim=True).clamp_min(_TINY) / FP8_MAX  # (B, H, n, 1, 1)
    deq = (blocks / scale).to(FP8).float() * scale  # (B, H, n, block, D)
    return deq.view(B, H, n * block, D)[:, :, :L]


def reference_fp8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    block_m: int = 128, block_n: int = 128, pv: Literal["fp8", "bf16"] = "fp8",
) -> torch.Tensor:
    """The kernel's quantization of Q, K (and V for ``pv="fp8"``), dequantized, then float32 SDPA.

    Same arguments and result shape as :func:`fp8_attention`; P's own FP8 rounding is not modelled.
    """
    dtype = q.dtype
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, L, D)
    k = k - k.mean(dim=2, keepdim=True)  # smoothing: the softmax is unchanged
    q, k = _fake_quant_blocks(q, block_m), _fake_quant_blocks(k, block_n)
    if pv == "fp8":
        v_mean = v.mean(dim=2, keepdim=True)  # (B, H, 1, D)
        scale = (v - v_mean).abs().amax(dim=2, keepdim=True).clamp_min(_TINY) / FP8_MAX  # per channel
        v = ((v - v_mean) / scale).to(FP8).float() * scale + v_mean
    mask = None
    if key_mask is not None:
        has_any = key_mask.any(dim=-1)  # (B,)
        mask = (key_mask | ~has_any[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, D)
    if key_mask is not None:
        out = out * has_any[:, None, None, None]
    return out.transpose(1, 2).to(dtype)  # (B, Lq, H, D)


# ---------------------------------------------------------------------------------------------
# Triton kernels.
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _quantize_kernel(
        X, MEAN, CHANNEL_SCALE, OUT, SCALE,
        stride_xb, stride_xl, stride_xh,
        stride_ob, stride_oh, stride_ol, stride_od,
        H, L, n_blocks,
        D: tl.constexpr, BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr, PER_CHANNEL: tl.constexpr,
    ):
        """One (BLOCK, D) tile of X (B, L, H, D) → OUT (any layout via strides, rows ≥ L zero),
        minus MEAN (B, H, D) if given; scaled by one amax scale per tile (written to SCALE
        (B, H, n_blocks)) or by CHANNEL_SCALE (B, H, D)."""
        pid_l = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid_l * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        valid = (rows < L)[:, None]
        x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xl + cols[None, :],
                    mask=valid, other=0.0).to(tl.float32)  # (BLOCK, D)
        if HAS_MEAN:
            x = tl.where(valid, x - tl.load(MEAN + bh * D + cols)[None, :], 0.0)
        if PER_CHANNEL:
            x = x / tl.load(CHANNEL_SCALE + bh * D + cols)[None, :]
        else:
            scale = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-12) / 448.0
            tl.store(SCALE + bh * n_blocks + pid_l, scale)
            x = x / scale
        out = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + cols[None, :] * stride_od
        tl.store(out, x.to(OUT.dtype.element_ty))

    @triton.jit
    def _attn_step(
        acc, l_i, m_i, q, qk_scale, K, KS, V, BIAS, start, kv_block, Lk,
        stride_kl, stride_vl, stride_vd,
        offs_n, offs_d,
        BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, TAIL: tl.constexpr,
    ):
        cols = start + offs_n  # (BLOCK_N,) key positions
        k = tl.load(K + cols[:, None] * stride_kl + offs_d[None, :])  # (BLOCK_N, D), zero-padded rows
        s = tl.dot(q, tl.trans(k)) * (qk_scale * tl.load(KS + kv_block))  # (BLOCK_M, BLOCK_N), log2 units
        if HAS_BIAS:
            s += tl.load(BIAS + cols)[None, :]
        if TAIL:
            s = tl.where((cols < Lk)[None, :], s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BLOCK_M,)
        alpha = tl.math.exp2(m_i - m_new)
        if PV_FP8:
            p = tl.math.exp2(s - m_new[:, None] + 8.0)  # 256·p: no FP8 underflow for small p
            v = tl.trans(tl.load(V + offs_d[:, None] * stride_vd + cols[None, :] * stride_vl))  # (BLOCK_N, D), K-major
        else:
            p = tl.math.exp2(s - m_new[:, None])
            if TAIL:
                v = tl.load(V + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                            mask=(cols < Lk)[:, None], other=0.0)  # (BLOCK_N, D)
            else:
                v = tl.load(V + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # a fresh accumulator per tile, summed in fp32
        return acc, l_i, m_new

    @triton.jit
    def _attn_kernel(
        Q, QS, K, KS, V, VS, VM, BIAS, O,
        stride_qb, stride_qh, stride_ql,
        stride_kb, stride_kh, stride_kl,
        stride_vb, stride_vh, stride_vl, stride_vd,
        stride_ob, stride_ol, stride_oh,
        H, Lq, Lk, Lk_pad, n_q_blocks, n_k_blocks, sm_scale_log2,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PV_FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """Flash attention forward over pre-quantized Q (B, H, Lq_pad, D) and K (B, H, Lk_pad, D) with
        their tile scales QS/KS; V is (B, H, D, Lk_pad) FP8 with per-channel scale VS and mean VM
        (PV_FP8) or the caller's (B, Lk, H, D); BIAS (B, Lk_pad) is 0 / -1e30 per key."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :])  # (BLOCK_M, D)
        qk_scale = tl.load(QS + bh * n_q_blocks + pid_m) * sm_scale_log2
        K += b * stride_kb + h * stride_kh
        KS += bh * n_k_blocks
        V += b * stride_vb + h * stride_vh
        if HAS_BIAS:
            BIAS += b * Lk_pad
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        full = (Lk // BLOCK_N) * BLOCK_N
        for start in range(0, full, BLOCK_N):
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, qk_scale, K, KS, V, BIAS, start, start // BLOCK_N, Lk,
                                       stride_kl, stride_vl, stride_vd, offs_n, offs_d,
                                       BLOCK_N, PV_FP8, HAS_BIAS, False)
        if full < Lk:
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, qk_scale, K, KS, V, BIAS, full, full // BLOCK_N, Lk,
                                       stride_kl, stride_vl, stride_vd, offs_n, offs_d,
                                       BLOCK_N, PV_FP8, HAS_BIAS, True)
        out = acc / l_i[:, None]  # (BLOCK_M, D)
        if PV_FP8:
            out = out * tl.load(VS + bh * D + offs_d)[None, :] + tl.load(VM + bh * D + offs_d)[None, :]
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=(offs_m < Lq)[:, None])


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------

def _quantize(x: torch.Tensor, block: int, mean: torch.Tensor | None, dtype: torch.dtype, impl: str,
              channel_scale: torch.Tensor | None = None, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, H, D) → (quantized (B, H, L_pad, D), or (B, H, D, L_pad) with ``transpose``; tile
    scales (B, H, n_blocks) float32). L_pad is L rounded up to ``block``; padded rows are zero."""
    B, L, H, D = x.shape
    n = -(-L // block)
    if impl == "torch":
        t = x.transpose(1, 2).float()  # (B, H, L, D)
        if mean is not None:
            t = t - mean[:, :, None, :]
        t = F.pad(t, (0, 0, 0, n * block - L)).view(B, H, n, block, D)
        if channel_scale is not None:
            scale = torch.ones(B, H, n, device=x.device)
            t = t / channel_scale[:, :, None, None, :]
        else:
            scale = t.abs().amax(dim=(3, 4)).clamp_min(_TINY) / FP8_MAX  # (B, H, n)
            t = t / scale[..., None, None]
        t = t.to(dtype).view(B, H, n * block, D)
        return (t.transpose(2, 3).contiguous() if transpose else t), scale
    out = torch.empty((B, H, D, n * block) if transpose else (B, H, n * block, D), device=x.device, dtype=dtype)
    scale = torch.empty(B, H, n, device=x.device, dtype=torch.float32)
    so = out.stride()
    so_l, so_d = (so[3], so[2]) if transpose else (so[2], so[3])
    if x.stride(3) != 1:
        x = x.contiguous()
    _quantize_kernel[(n, B * H)](
        x, mean, channel_scale, out, scale,
        x.stride(0), x.stride(1), x.stride(2),
        so[0], so[1], so_l, so_d,
        H, L, n,
        D=D, BLOCK=block, HAS_MEAN=mean is not None, PER_CHANNEL=channel_scale is not None,
    )
    return out, scale


def fp8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, *,
    pv: Literal["fp8", "bf16"] = "fp8", block_m: int = 128, block_n: int = 128, num_warps: int = 8,
    num_stages: int = 3, quant_dtype: torch.dtype = FP8, quantize_with: Literal["triton", "torch"] = "triton",
) -> torch.Tensor:
    """Attention with Q·Kᵀ (and P·V for ``pv="fp8"``) on FP8 tensor cores; no gradient.

    Args:
        q: queries (B, Lq, H, Dh), bf16 or fp16.
        k: keys (B, Lk, H, Dh).
        v: values (B, Lk, H, Dh).
        key_mask: (B, Lk) bool, True where a key is a real token; a sample whose keys are all masked
            gets zeros, as in :func:`bindweave.model.attention.attention`.
        pv: ``fp8`` (P and V in FP8) or ``bf16`` (P·V in the input dtype).
        block_m: query rows per program and per Q scale.
        block_n: keys per step and per K scale.
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages.
        quant_dtype: the quantized dtype; float16 runs the same kernels without FP8 (for Triton's CPU
            interpreter, whose float8 casts round wrongly).
        quantize_with: ``triton`` (one kernel per tensor) or ``torch`` (plain ops; for tests).

    Returns:
        (B, Lq, H, Dh) in q's dtype.
    """
    if triton is None:
        raise RuntimeError("fp8_attention needs triton (pip install triton).")
    reason = fp8_shape_unsupported(q)
    if reason is not None:
        raise ValueError(reason)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    with torch.no_grad():
        k_mean = torch.mean(k, dim=1, dtype=torch.float32).contiguous()  # (B, H, D)
        q8, q_scale = _quantize(q, block_m, None, quant_dtype, quantize_with)  # (B, H, Lq_pad, D)
        k8, k_scale = _quantize(k, block_n, k_mean, quant_dtype, quantize_with)  # (B, H, Lk_pad, D)
        Lk_pad = k8.shape[2]
        if pv == "fp8":
            v_mean = torch.mean(v, dim=1, dtype=torch.float32)  # (B, H, D)
            v_scale = (torch.maximum(v.amax(dim=1).float() - v_mean, v_mean - v.amin(dim=1).float())
                       .clamp_min(_TINY) / FP8_MAX).contiguous()  # per channel (B, H, D)
            v_mean = v_mean.contiguous()
            v_in, _ = _quantize(v, block_n, v_mean, quant_dtype, quantize_with, channel_scale=v_scale,
                                transpose=True)  # (B, H, D, Lk_pad)
            stride_v = (v_in.stride(0), v_in.stride(1), v_in.stride(3), v_in.stride(2))
        elif pv == "bf16":
            v_in, v_scale, v_mean = v, None, None
            stride_v = (v.stride(0), v.stride(2), v.stride(1), v.stride(3))
        else:
            raise ValueError(f"pv must be 'fp8' or 'bf16', got {pv!r}.")
        has_any = None
        bias = None
        if key_mask is not None:
            has_any = key_mask.any(dim=-1)  # (B,)
            safe = key_mask | ~has_any[:, None]  # a fully masked sample attends everywhere, zeroed below
            bias = torch.full((B, Lk_pad), -1.0e30, device=q.device)
            bias[:, :Lk] = torch.where(safe, 0.0, -1.0e30)
        out = torch.empty_like(q)  # (B, Lq, H, D)
        n_q = q8.shape[2] // block_m
        _attn_kernel[(n_q, B * H)](
            q8, q_scale, k8, k_scale, v_in, v_scale, v_mean, bias, out,
            q8.stride(0), q8.stride(1), q8.stride(2),
            k8.stride(0), k8.stride(1), k8.stride(2),
            *stride_v,
            out.stride(0), out.stride(1), out.stride(2),
            H, Lq, Lk, Lk_pad, n_q, Lk_pad // block_n, (1.0 / math.sqrt(D)) * math.log2(math.e),
            D=D, BLOCK_M=block_m, BLOCK_N=block_n, PV_FP8=pv == "fp8", HAS_BIAS=key_mask is not None,
            num_warps=num_warps, num_stages=num_stages,
        )
        if has_any is not None:
            out = out * has_any[:, None, None, None].to(out.dtype)
    return out


_OP = None


OP_SETTINGS = dict(pv="fp8", block_m=64, block_n=128, num_warps=4, num_stages=3)
"""The settings of the registered op: the fastest of ten measured at the 14B self-attention shape
(39,000 tokens, 40 heads of 128) on an H100, 43.2 ms against cuDNN SDPA's 52.7 ms (1.22x;
``benchmarks/results/attention8-NVIDIA-H100-80GB-HBM3.json``)."""
FP8_MIN_KEYS = 4096
"""Fewer keys than this and ``attention()`` keeps SDPA: at the 768 text tokens of cross-attention
the kernel ran at 0.70x of cuDNN SDPA (same run), as its per-call quantization does not pay off."""


def register_fp8_attention_op() -> None:
    """Register :func:`fp8_attention` (default settings) as the torch op ``bindweave::fp8_attention``,
    opaque to ``torch.compile``; done once, by ``set_attention_backend("fp8")``, not on import."""
    global _OP
    if _OP is not None:
        return
    if hasattr(torch.ops.bindweave, "fp8_attention"):  # registered by an earlier import of this module
        _OP = torch.ops.bindweave.fp8_attention
        return

    @torch.library.custom_op("bindweave::fp8_attention", mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return fp8_attention(q, k, v, key_mask, **OP_SETTINGS)

    @op.register_fake
    def _(q, k, v, key_mask):
        return torch.empty_like(q)

    _OP = op


def fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fp8_attention` with :data:`OP_SETTINGS`, through the registered torch op."""
    register_fp8_attention_op()
    return _OP(q, k, v, key_mask)
