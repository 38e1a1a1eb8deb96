"""DiT speed and memory on one GPU: this project's WanDiT against diffusers' WanTransformer3DModel.

One run measures, on one card: the dense bf16 GEMM peak (the MFU base), SDPA backends at the
attention shapes, and for each case below forward / forward+backward time, achieved TFLOP/s, MFU
and peak memory of

- ours, eager and ``torch.compile`` per block (``bindweave.parallel.per_block.apply_compile``), training with
  activation checkpointing none / full / selective (``apply_activation_checkpointing``);
- diffusers' ``WanTransformer3DModel`` with the same weights (``bindweave.weights.diffusers_format``), as shipped
  (default SDPA), with SDPA forced to the flash backend, and compiled by its own
  ``compile_repeated_blocks``; training with and without its gradient checkpointing.

Outputs are checked on the GPU: ours and diffusers (bf16) against our fp32 model, and every variant
against our eager bf16 output (forward) or eager gradient (training).

Cases (BindWeave: 36 input channels, 4 reference slots appended in time to the 21 latent frames):

    1.3b-480p       Wan2.1-1.3B (30 blocks), 480x832, 81 frames: latent 25x60x104 -> 39,000 tokens
    14b-block-480p  one Wan2.1-14B block,     480x832:           25x60x104 -> 39,000 tokens
    14b-block-720p  one Wan2.1-14B block,     720x1280:          25x90x160 -> 90,000 tokens

(32,760 and 75,600 tokens without the slots.) Context: diffusers' I2V attention hard-codes 512
text tokens, so the side-by-side runs feed text = 512 T5 tokens, image = 4 x 257 CLIP tokens; ours
is also timed at BindWeave's real text length, 512 T5 + 256 MLLM-connector tokens = 768.

Usage:
    python benchmarks/dit.py                      # GPU, everything, < 10 min on one H100
    python benchmarks/dit.py --smoke              # CPU, tiny shapes, seconds
    python benchmarks/dit.py --table results/dit-NVIDIA-H100-80GB-HBM3.json   # markdown table
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from torch.nn.attention import SDPBackend

from bindweave.model.attention import set_sdpa_backends
from bindweave.weights.diffusers_format import bindweave_to_diffusers, diffusers_config_for
from bindweave.model.dit import CrossAttentionBranch, WanDiT
from bindweave.model.presets import wan_dit_preset
from bindweave.parallel.per_block import apply_activation_checkpointing, apply_compile

# ----------------------------------------------------------------------------------------------
# FLOP model
# ----------------------------------------------------------------------------------------------
#
# A matrix product (M x K) @ (K x N) is 2·M·N·K FLOPs; attention over Lq queries and Lk keys at
# model width D = heads·head_dim is 4·Lq·Lk·D (2·Lq·Lk·D for Q·Kᵀ, 2·Lq·Lk·D for P·V). With L video
# tokens, D the width, F the FFN width, L_b the tokens of cross-attention branch b:
#
#   per block   self-attn q,k,v,o projections     8·L·D²
#               self-attention                     4·L²·D
#               cross-attn q and o projections     4·L·D²
#               cross-attn k,v of each branch      Σ_b 4·L_b·D²
#               cross-attention                    Σ_b 4·L·L_b·D
#               FFN                                4·L·D·F
#   once        patch embedding                    2·L·(C_in·p)·D        (p = pt·ph·pw = 4)
#               text embedder (Linear, Linear)     2·L_t·(C_t·D + D²)
#               image embedder (Linear, Linear)    2·L_i·(C_i² + C_i·D)
#               time embedding and modulation      2·B·(256·D + D² + 6·D²)
#               output head                        2·L·D·(C_out·p)
#
# Training (forward + backward) is 3x the forward: the backward of a matrix product or of attention
# is two such products. Recomputation by activation checkpointing is not counted (model FLOPs), so
# MFU = model FLOPs / time / peak, with the peak the fastest dense bf16 GEMM measured in the run.
# Norms, RoPE, GELU and modulation are left out (memory-bound, a few GFLOPs).


def forward_flops(dit: WanDiT, tokens: int, context_tokens: dict[str, int], batch: int = 1) -> dict[str, float]:
    """Forward FLOPs of ``dit`` (all its blocks) for one batch, by the formula above."""
    D, L = dit.dim, tokens
    F = dit.blocks[0].ffn[0].out_features
    p = math.prod(dit.patch_size)
    per_block = {
        "self_proj": 8 * L * D * D,
        "self_attn": 4 * L * L * D,
        "cross_proj": 4 * L * D * D + sum(4 * n * D * D for n in context_tokens.values()),
        "cross_attn": sum(4 * L * n * D for n in context_tokens.values()),
        "ffn": 4 * L * D * F,
    }
    n_blocks = len(dit.blocks)
    once = 2 * L * dit.in_channels * p * D + 2 * L * D * dit.out_channels * p
    once += 2 * (dit.freq_dim * D + D * D + 6 * D * D)
    for name, n in context_tokens.items():
        c = dit.branches[name].context_dim
        once += 2 * n * (c * D + D * D) if dit.branches[name].embedder == "mlp" else 2 * n * (c * c + c * D)
    out = {k: batch * v * n_blocks for k, v in per_block.items()}
    out["embed_head"] = batch * once
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One model and video size. Latent sizes: frames include the reference slots."""

    name: str
    preset: str
    num_layers: int
    latent: tuple[int, int, int]  # (F with slots, H, W) of the VAE latent
    slots: int = 4
    text_tokens: int = 768  # BindWeave: 512 T5 + 256 MLLM-connector tokens
    text_tokens_diffusers: int = 512  # what diffusers' I2V processor assumes
    image_tokens: int = 4 * 257
    overrides: dict = field(default_factory=dict)
    fp32_reference: bool = True  # run our fp32 model as the numerical reference
    fp32_diffusers: bool = False  # also diffusers in fp32 (conversion parity on this device)
    variants: list = field(default_factory=list)
    iters: int = 5
    budget_s: float = 300.0  # start no variant of this case after this many seconds
    warmup: int = 2  # calls before timing (the first compiles)


@dataclass
class Variant:
    impl: str  # "ours" | "diffusers"
    task: str  # "forward" | "train"
    compiled: bool = False
    ac: str = "none"  # ours: none/full/selective; diffusers: none/full (its gradient checkpointing)
    attention: str | None = None  # diffusers attention backend, None = as shipped
    bindweave_tokens: bool = False  # text at BindWeave's length instead of diffusers' 512
    rope: str | None = None  # "complex": the proposed bindweave.model.dit.apply_rope (apply_rope_complex)

    @property
    def label(self) -> str:
        parts = [self.impl, "compiled" if self.compiled else "eager"]
        if self.attention:
            parts.append(self.attention.strip("_"))
        if self.rope:
            parts.append(f"rope={self.rope}")
        if self.task == "train":
            parts.append(f"ac={self.ac}")
        return " ".join(parts)


def _v(spec: str) -> Variant:
    """'impl task [compiled] [ac=...] [attn=...] [bw]' -> Variant (bw: BindWeave's text length)."""
    words = spec.split()
    opts = dict(w.split("=") for w in words[2:] if "=" in w)
    return Variant(words[0], words[1], compiled="compiled" in words, ac=opts.get("ac", "none"),
                   attention=opts.get("attn"), bindweave_tokens="bw" in words, rope=opts.get("rope"))


# In order of importance: a case stops starting variants when its time budget is spent.
VARIANTS_14B_480P = [
    "diffusers forward", "ours forward", "ours forward compiled", "ours forward rope=complex",
    "diffusers forward attn=_native_flash", "ours train", "diffusers train", "ours train rope=complex",
    "ours train bw", "ours train compiled bw", "ours train compiled ac=full bw",
    "ours train compiled ac=selective bw", "diffusers train ac=full", "ours forward compiled bw",
    "diffusers forward compiled", "ours forward bw",
]
VARIANTS_1B_480P = [
    "diffusers forward", "ours forward", "ours forward compiled", "ours forward rope=complex",
    "diffusers train ac=full", "ours train compiled ac=full bw", "ours train compiled ac=selective bw",
    "diffusers forward attn=_native_flash", "diffusers forward compiled",
]
VARIANTS_14B_720P = [
    "diffusers forward", "ours forward", "ours forward compiled", "diffusers train",
    "ours train compiled bw", "ours train compiled ac=full bw", "diffusers train ac=full",
    "ours train compiled ac=selective bw", "diffusers forward attn=_native_flash",
]


def gpu_cases() -> list[Case]:
    return [
        Case("14b-block-480p", "wan2.1-i2v-14b", 1, (25, 60, 104), fp32_diffusers=True, budget_s=175,
             variants=[_v(s) for s in VARIANTS_14B_480P]),
        Case("1.3b-480p", "wan2.1-i2v-1.3b", 30, (25, 60, 104), iters=3, budget_s=185,
             variants=[_v(s) for s in VARIANTS_1B_480P]),
        Case("14b-block-720p", "wan2.1-i2v-14b", 1, (25, 90, 160), iters=3, fp32_reference=False, budget_s=170,
             variants=[_v(s) for s in VARIANTS_14B_720P]),
    ]


def smoke_cases() -> list[Case]:
    tiny = dict(dim=64, ffn_dim=128, num_heads=4, branches=[
        CrossAttentionBranch("text", 48, "mlp"), CrossAttentionBranch("image", 40, "norm_mlp")])
    specs = ["diffusers forward", "ours forward", "ours forward compiled", "diffusers forward attn=_native_math",
             "ours forward rope=complex", "ours train rope=complex", "diffusers forward",
             "ours train", "diffusers train", "ours train bw", "ours train compiled ac=full bw",
             "ours train compiled ac=selective bw", "ours train ac=selective bw", "diffusers train ac=full",
             "diffusers forward compiled", "ours forward attn=math", "ours train compiled attn=math bw"]
    return [Case("tiny-2-blocks", "wan2.1-i2v-1.3b", 2, (3, 4, 8), slots=1, text_tokens=520, image_tokens=2 * 9,
                 overrides=tiny, fp32_diffusers=True, variants=[_v(s) for s in specs], iters=1, warmup=1, budget_s=60)]


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, warmup: int, iters: int) -> dict:
    """Median (and min/max) milliseconds of ``fn`` after ``warmup`` calls; CUDA events on a GPU."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first_s = time.perf_counter() - t0  # includes compilation for compiled variants
    for _ in range(warmup - 1):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return dict(ms=statistics.median(times), ms_min=min(times), ms_max=max(times), iters=iters, first_call_s=first_s)


def peak_memory(fn, device: torch.device) -> dict:
    """Peak allocated GiB during one call of ``fn`` (weights and inputs included), and above the start."""
    if device.type != "cuda":
        return {}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return dict(peak_gib=peak / 2**30, peak_above_start_gib=(peak - base) / 2**30)


def training_memory(model, fwd, grad: torch.Tensor, device: torch.device) -> dict:
    """Peak GiB of one training step, and the activations the forward leaves for the backward.

    ``saved_per_block_gib`` (memory held between forward and backward, over the number of blocks)
    is what scales with depth: a 40-block model holds about 40 times it at the start of the backward.
    """
    if device.type != "cuda":
        return {}
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fwd()
    held = torch.cuda.memory_allocated(device) - base - out.numel() * out.element_size()
    out.backward(grad)
    del out
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    n_blocks = len(model.blocks)
    return dict(peak_gib=peak / 2**30, peak_above_start_gib=(peak - base) / 2**30,
                saved_gib=held / 2**30, saved_per_block_gib=held / 2**30 / n_blocks)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp32 (NaN if either is not finite)."""
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Hardware ceilings: dense GEMM peak, SDPA backends
# ----------------------------------------------------------------------------------------------


def gemm_peak(device: torch.device, smoke: bool) -> dict:
    """bf16 matrix products at a square and at the Wan-14B linear shapes (random data)."""
    shapes = [(256, 256, 256)] if smoke else [
        (8192, 8192, 8192), (39000, 5120, 5120), (39000, 13824, 5120), (39000, 5120, 13824)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {}
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        r = time_fn(lambda: a @ b, device, warmup=3, iters=2 if smoke else 20)
        out[f"{m}x{n}x{k}"] = 2 * m * n * k / (r["ms"] * 1e-3) / 1e12
        del a, b
    free(device)
    return dict(tflops=out, peak_tflops=max(out.values()))


def attention_backends(device: torch.device, smoke: bool) -> dict:
    """TFLOP/s of SDPA backends at the self- and cross-attention shapes of a 14B block (480p, 720p)."""
    if device.type != "cuda" or smoke:
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import torch.nn.functional as F

    heads, head_dim = 40, 128
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    results = {}
    for lq, lk, train in [(39000, 39000, True), (90000, 90000, False), (39000, 1028, False), (39000, 768, False)]:
        # (B, L, H, Dh) transposed to (B, H, L, Dh): the layout bindweave.model.attention passes to SDPA.
        q = torch.randn(1, lq, heads, head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(1, lk, heads, head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
                for _ in range(2))
        flops = 4 * lq * lk * heads * head_dim
        for name, backend in backends.items():
            if name == "cudnn" and lq != 39000:  # the default picks cuDNN (see env.sdpa_default_choice)
                continue
            key = f"{lq}x{lk}/{name}"
            try:
                ctx = sdpa_kernel(backend) if backend is not None else _nullcontext()
                with ctx:
                    r = time_fn(lambda: F.scaled_dot_product_attention(q, k, v), device, 2, 5)
                    results[key] = dict(fwd_tflops=flops / (r["ms"] * 1e-3) / 1e12, fwd_ms=r["ms"])
                    if train:
                        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                        def step():
                            F.scaled_dot_product_attention(qg, kg, vg).backward(g)

                        g = torch.randn_like(q)
                        r = time_fn(step, device, 2, 5)
                        bwd_ms = r["ms"] - results[key]["fwd_ms"]
                        results[key].update(fwd_bwd_ms=r["ms"], bwd_tflops=2 * flops / (bwd_ms * 1e-3) / 1e12)
            except Exception as e:  # backend not available for these inputs
                results[key] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        del q, k, v
        free(device)
    return results


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def attention_gradient_check(device: torch.device) -> dict:
    """The default SDPA backend's gradients against float64 math, at a non-multiple-of-128 length."""
    if device.type != "cuda":
        return {}
    import torch.nn.functional as F

    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2000, 8, 128, device=device, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    g = torch.randn(1, 8, 2000, 128, device=device, dtype=torch.bfloat16)
    F.scaled_dot_product_attention(q, k, v).backward(g)
    got = [t.grad.clone() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q64, k64, v64).backward(g.double())
    return {f"d{n}_rel_err": rel_err(a, b.grad) for n, a, b in zip("qkv", got, (q64, k64, v64))}


# ----------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------


def build_ours(case: Case, device: torch.device) -> WanDiT:
    """fp32 master model with random weights everywhere (the zero-initialised head too)."""
    torch.manual_seed(0)
    with torch.device(device):
        dit = wan_dit_preset(case.preset, num_layers=case.num_layers, **case.overrides)
    torch.nn.init.normal_(dit.head.proj.weight, std=0.02)  # zero-init would hide any difference
    return dit.eval()


def ours_in(master: WanDiT, dtype: torch.dtype) -> WanDiT:
    """A copy of ``master`` cast whole to ``dtype`` (its LayerNorms compute in fp32 regardless)."""
    return copy.deepcopy(master).to(dtype)


def plain_cast_check(device: torch.device) -> str:
    """Does a WanDiT cast whole to bf16 (``model.to(torch.bfloat16)``) run a forward here?"""
    try:
        torch.manual_seed(0)
        dit = WanDiT(dim=64, ffn_dim=128, num_heads=4, num_layers=1,
                     branches=[CrossAttentionBranch("text", 32)]).to(device, torch.bfloat16)
        with torch.no_grad():
            dit(torch.randn(1, 36, 2, 4, 4, device=device), torch.tensor([500.0], device=device),
                {"text": torch.randn(1, 5, 32, device=device)})
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"



def build_diffusers(ours_fp32: WanDiT, dtype: torch.dtype, device: torch.device):
    """diffusers' model with our weights, cast the way ``from_pretrained(torch_dtype=...)`` does."""
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(**diffusers_config_for(ours_fp32))
    model.load_state_dict(bindweave_to_diffusers(ours_fp32.state_dict()))
    keep = set(model._keep_in_fp32_modules or [])
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model.eval()


@dataclass
class Inputs:
    x: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor
    grad: torch.Tensor

    def to(self, dtype: torch.dtype) -> "Inputs":
        return Inputs(*(v.to(dtype) if v.is_floating_point() and i != 1 else v
                        for i, v in enumerate((self.x, self.t, self.text, self.image, self.grad))))


def make_inputs(dit: WanDiT, case: Case, text_tokens: int, device: torch.device, dtype: torch.dtype) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(1234)
    frames, h, w = case.latent
    shape = (1, dit.in_channels, frames, h, w)
    text = torch.randn(1, text_tokens, dit.branches["text"].context_dim, generator=g)
    image = torch.randn(1, case.image_tokens, dit.branches["image"].context_dim, generator=g)
    return Inputs(
        x=torch.randn(*shape, generator=g).to(device, dtype),
        t=torch.tensor([731.0], device=device),
        text=text.to(device, dtype),
        image=image.to(device, dtype),
        grad=torch.randn(1, dit.out_channels, frames, h, w, generator=g).to(device, dtype),
    )


def forward_fn(model, impl: str, inp: Inputs):
    if impl == "ours":
        return lambda: model(inp.x, inp.t, {"text": inp.text, "image": inp.image})
    return lambda: model(inp.x, inp.t, encoder_hidden_states=inp.text,
                         encoder_hidden_states_image=inp.image, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------


GRAD_PARAM = {"ours": "blocks.0.ffn.0.weight", "diffusers": "blocks.0.ffn.net.0.proj.weight"}


def run_case(case: Case, device: torch.device, peak_tflops: float, args, deadline: float) -> dict:
    dtype = torch.bfloat16
    master = build_ours(case, device)
    frames, h, w = case.latent
    tokens = frames * h * w // math.prod(master.patch_size)
    tokens_no_slots = (frames - case.slots) * h * w // math.prod(master.patch_size)
    ctx_d = {"text": case.text_tokens_diffusers, "image": case.image_tokens}
    ctx_b = {"text": case.text_tokens, "image": case.image_tokens}
    result = dict(
        case=case.name, preset=case.preset, num_layers=case.num_layers, latent=list(case.latent),
        tokens=tokens, tokens_without_slots=tokens_no_slots, text_tokens=case.text_tokens,
        text_tokens_diffusers=case.text_tokens_diffusers, image_tokens=case.image_tokens,
        params=sum(p.numel() for p in master.parameters()),
        flops_forward={"diffusers_shape": forward_flops(master, tokens, ctx_d),
                       "bindweave_shape": forward_flops(master, tokens, ctx_b)},
        parity={}, variants=[],
    )
    deadline = min(deadline, time.perf_counter() + case.budget_s)
    log(f"== {case.name}: {tokens} tokens ({tokens_no_slots} without slots), "
        f"{result['params'] / 1e6:.0f}M params, forward {result['flops_forward']['bindweave_shape']['total'] / 1e12:.1f} TFLOP")

    inputs = {False: make_inputs(master, case, case.text_tokens_diffusers, device, dtype),
              True: make_inputs(master, case, case.text_tokens, device, dtype)}

    # -- parity: ours and diffusers in bf16 against our fp32 model, same weights -------------------
    ours = ours_in(master, dtype).requires_grad_(False)
    diff = build_diffusers(master, dtype, device).requires_grad_(False)
    ref_out: dict = {}
    with torch.no_grad():
        out_ours = forward_fn(ours, "ours", inputs[False])()
        out_diff = forward_fn(diff, "diffusers", inputs[False])()
        ref_out[False] = out_ours
        parity = dict(ours_vs_diffusers_bf16=rel_err(out_ours, out_diff))
        if case.fp32_reference:
            master.requires_grad_(False)
            out32 = forward_fn(master, "ours", inputs[False].to(torch.float32))()
            parity.update(ours_bf16_vs_fp32=rel_err(out_ours, out32), diffusers_bf16_vs_fp32=rel_err(out_diff, out32))
            ref_out["fp32"] = out32
            if case.fp32_diffusers:
                diff32 = build_diffusers(master, torch.float32, device)
                parity.update(ours_fp32_vs_diffusers_fp32=rel_err(
                    out32, forward_fn(diff32, "diffusers", inputs[False].to(torch.float32))()))
                del diff32
            del out32
        del out_diff
    # bf16 through a transformer: a few 1e-3 per block is rounding; the implementations must agree
    # about as well as each agrees with fp32.
    tol = 5e-2
    parity["pass"] = bool(parity["ours_vs_diffusers_bf16"] < tol and all(
        v < tol for k, v in parity.items() if k.endswith("vs_fp32")))
    result["parity"] = parity
    log(f"   parity: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in parity.items()))
    del master
    free(device)

    ref_grad: dict[bool, torch.Tensor] = {}
    for v in case.variants:
        row = dict(asdict(v), label=v.label,
                   text_tokens=case.text_tokens if v.bindweave_tokens else case.text_tokens_diffusers)
        if time.perf_counter() > deadline:
            row["skipped"] = "time budget"
            result["variants"].append(row)
            log(f"   {v.label:<40} skipped (time budget)")
            continue
        try:
            row.update(run_variant(v, case, ours, diff, inputs[v.bindweave_tokens], ref_out, ref_grad,
                                   device, args))
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
        finally:
            set_sdpa_backends(None)
            restore_diffusers_backend()
        free(device)
        flops = result["flops_forward"]["bindweave_shape" if v.bindweave_tokens else "diffusers_shape"]["total"]
        if "ms" in row:
            flops *= 3 if v.task == "train" else 1
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            row["mfu"] = row["tflops"] / peak_tflops
        result["variants"].append(row)
        log("   " + format_row(row))
    del ours, diff
    free(device)
    # Speed-up against diffusers as shipped (eager, default SDPA) on the same task, as a ratio of
    # achieved TFLOP/s (= the time ratio at equal shapes; ours' training runs at BindWeave's 768 text
    # tokens, diffusers' at 512: 0.4% more FLOPs for a 14B block). Checkpointing is matched: none
    # with none, full and selective with diffusers' gradient checkpointing (full).
    base = {(r["task"], r["ac"]): r["tflops"] for r in result["variants"]
            if r["impl"] == "diffusers" and not r["compiled"] and not r["attention"] and "tflops" in r}
    for r in result["variants"]:
        ref = base.get((r["task"], "none" if r["ac"] == "none" else "full"))
        if ref and "tflops" in r:
            r["speedup_vs_diffusers"] = r["tflops"] / ref
    return result


def restore_diffusers_backend() -> None:
    """``ModelMixin.set_attention_backend`` also sets a process-wide default; put it back."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    except ImportError:
        return
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def apply_rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Proposed ``bindweave.model.dit.apply_rope``: the same fp32 rotation as one complex product.

    Three passes over q/k (upcast, multiply, downcast) instead of about ten (upcast, four products,
    two sums, stack, downcast); same arithmetic in fp32. Measured as ``rope=complex`` variants.
    """
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * torch.complex(cos, sin)  # (B, L, H, Dh/2)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)  # (B, L, H, Dh)


def run_variant(v: Variant, case: Case, ours, diff, inp: Inputs, ref_out, ref_grad, device, args) -> dict:
    import bindweave.model.dit as dit_module

    original_rope = dit_module.apply_rope
    if v.rope == "complex":
        dit_module.apply_rope = apply_rope_complex
    try:
        return _run_variant(v, case, ours, diff, inp, ref_out, ref_grad, device, args)
    finally:
        dit_module.apply_rope = original_rope


def _run_variant(v: Variant, case: Case, ours, diff, inp: Inputs, ref_out, ref_grad, device, args) -> dict:
    torch._dynamo.reset()
    base = ours if v.impl == "ours" else diff
    model = copy.deepcopy(base)
    out: dict = {}
    if v.impl == "ours":
        if v.attention:
            set_sdpa_backends(_OURS_BACKENDS[v.attention])
        if v.task == "train":
            apply_activation_checkpointing(model, v.ac)
        if v.compiled:
            apply_compile(model, backend=args.compile_backend)
    else:
        if v.attention:
            model.set_attention_backend(v.attention)
        if v.task == "train" and v.ac == "full":
            model.enable_gradient_checkpointing()
        if v.compiled:
            model.compile_repeated_blocks(fullgraph=True, dynamic=False, backend=args.compile_backend)
    fwd = forward_fn(model, v.impl, inp)
    iters = case.iters
    if v.task == "forward":
        def fn():
            with torch.no_grad():
                return fwd()

        out.update(time_fn(fn, device, warmup=case.warmup, iters=iters))
        out.update(peak_memory(fn, device))
        y = fn()
        ref = ref_out.get(v.bindweave_tokens)
        if ref is None:
            ref_out[v.bindweave_tokens] = y
        else:
            out["rel_err_vs_ours_eager"] = rel_err(y, ref)
        if not v.bindweave_tokens and "fp32" in ref_out:
            out["rel_err_vs_fp32"] = rel_err(y, ref_out["fp32"])
    else:
        model.train().requires_grad_(True)
        param = dict(model.named_parameters())[GRAD_PARAM[v.impl]]

        def fn():
            model.zero_grad(set_to_none=True)
            fwd().backward(inp.grad)

        out.update(time_fn(fn, device, warmup=case.warmup, iters=iters))
        out.update(training_memory(model, fwd, inp.grad, device))
        grad = param.grad.detach().clone()
        ref = ref_grad.get(v.bindweave_tokens)
        if ref is None and v.impl == "ours":
            ref_grad[v.bindweave_tokens] = grad
            out["grad_reference"] = True
        elif ref is not None:
            out["grad_rel_err_vs_reference"] = rel_err(grad, ref)
    if args.profile and case.name == args.profile_case:
        out["profile"] = profile_groups(fn, device)
    del model
    return out


_OURS_BACKENDS = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "math": [SDPBackend.MATH],
}
"""``attn=`` of our variants: the priority order given to ``bindweave.model.attention.set_sdpa_backends``."""


def profile_groups(fn, device: torch.device) -> dict:
    """Device time of one call split into GEMM / attention / Triton-fused / other kernels (ms)."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    groups: dict[str, float] = {}
    top = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if not t or e.key.startswith("aten::") or e.key.startswith("Torch-Compiled") or "ProfilerStep" in e.key:
            continue
        name = e.key.lower()
        if name.startswith("triton"):  # before attention: fused kernels are named after the ops they feed
            g = "triton_fused"
        elif any(s in name for s in ("fmha", "flash", "sdpa", "attention", "cudnn_generated")):
            g = "attention"
        elif any(s in name for s in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")):
            g = "gemm"
        else:
            g = "other"
        groups[g] = groups.get(g, 0.0) + t / 1e3
        top.append((t / 1e3, e.key[:90]))
    top.sort(reverse=True)
    return dict(groups_ms=groups, top_kernels_ms=[[round(t, 3), k] for t, k in top[:12]])


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def format_row(r: dict) -> str:
    head = f"{r['label']:<40} {r['task']:<7} text={r['text_tokens']:<4}"
    if "skipped" in r:
        return f"{head} skipped ({r['skipped']})"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    s = f"{head} {r['ms']:9.2f} ms  {r['tflops']:6.1f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%"
    if "peak_gib" in r:
        s += f"  peak {r['peak_gib']:6.2f} GiB"
    if "speedup_vs_diffusers" in r:
        s += f"  x{r['speedup_vs_diffusers']:.2f}"
    if "saved_gib" in r:
        s += f"  held {r['saved_gib']:.2f} GiB"
    for k, name in (("rel_err_vs_ours_eager", "err"), ("grad_rel_err_vs_reference", "grad err"),
                    ("rel_err_vs_fp32", "err vs fp32")):
        if k in r:
            s += f"  {name} {r[k]:.1e}"
    s += f"  (first call {r['first_call_s']:.1f} s)"
    return s


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [
        f"Card: **{env['device']}**, torch {env['torch']}, diffusers {env.get('diffusers')}, cuDNN "
        f"{env.get('cudnn')}; dense bf16 GEMM peak measured in the run: "
        f"**{results['gemm']['peak_tflops']:.0f} TFLOP/s** (the MFU base).", ""]
    for c in results["cases"]:
        if "error" in c:
            lines += [f"### {c['case']}: error {c['error']}", ""]
            continue
        p = c["parity"]
        lines += [
            f"### {c['case']}: {c['tokens']:,} video tokens ({c['tokens_without_slots']:,} without the "
            f"4 reference slots), image {c['image_tokens']} tokens, text {c['text_tokens_diffusers']} "
            f"(side by side) / {c['text_tokens']} (BindWeave)",
            "",
            "Parity (rel. L2 error of the output): " + ", ".join(
                f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items()),
            "",
            "| variant | task | text tokens | ms | TFLOP/s | MFU | peak GiB | held fwd→bwd GiB | vs diffusers "
            "| err vs fp32 | err vs ours eager |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in c["variants"]:
            cells = [r["label"], r["task"], str(r["text_tokens"])]
            if "ms" not in r:
                cells += [r.get("error") or f"skipped ({r.get('skipped')})"] + [""] * 7
            else:
                err = r.get("rel_err_vs_ours_eager", r.get("grad_rel_err_vs_reference"))
                fp32 = r.get("rel_err_vs_fp32")
                cells += [f"{r['ms']:.1f}", f"{r['tflops']:.0f}", f"{100 * r['mfu']:.1f}%",
                          f"{r.get('peak_gib', float('nan')):.1f}",
                          f"{r['saved_gib']:.2f}" if "saved_gib" in r else "",
                          f"{r['speedup_vs_diffusers']:.2f}x" if "speedup_vs_diffusers" in r else "",
                          f"{fp32:.1e}" if fp32 is not None else "",
                          f"{err:.1e}" if err is not None else "ref"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    env = dict(torch=torch.__version__, python=platform.python_version(), device=str(device))
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
        env["capability"] = list(torch.cuda.get_device_capability(device))
        try:  # what F.scaled_dot_product_attention picks for bf16 (B, H, L, 128) inputs
            q = torch.randn(1, 40, 1024, 128, device=device, dtype=torch.bfloat16)
            mask = torch.ones(1, 1, 1, 1024, device=device, dtype=torch.bool)
            env["sdpa_default_choice"] = {
                "no_mask": SDPBackend(torch._fused_sdp_choice(q, q, q)).name,
                "key_mask": SDPBackend(torch._fused_sdp_choice(q, q, q, attn_mask=mask)).name}
        except Exception as e:  # private API
            env["sdpa_default_choice"] = repr(e)
    return env


def card_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds)")
    parser.add_argument("--cases", nargs="*", help="run only these cases (names as printed)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/dit-<card>.json; smoke: none)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no variant after this many seconds")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (smoke: aot_eager)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="kernel-time split of ours on --profile-case")
    parser.add_argument("--profile-case", default="14b-block-480p")
    parser.add_argument("--table", help="print the markdown table of a results JSON and exit")
    args = parser.parse_args(argv)

    if args.table:
        with open(args.table) as f:
            print(markdown(json.load(f)))
        return {}

    start = time.perf_counter()
    deadline = start + args.budget_s
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: use --smoke for the CPU run")
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    torch._dynamo.config.cache_size_limit = 64
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    cases = smoke_cases() if args.smoke else gpu_cases()
    if args.cases:
        cases = [c for c in cases if c.name in args.cases]

    results = dict(env=environment(device), argv=sys.argv[1:])
    log(f"env: {results['env']}")
    results["gemm"] = gemm_peak(device, args.smoke)
    log(f"GEMM bf16 TFLOP/s: {results['gemm']['tflops']}")
    results["attention"] = attention_backends(device, args.smoke)
    for k, r in results["attention"].items():
        log(f"SDPA {k}: {r}")
    results["attention_grad_check"] = attention_gradient_check(device)
    log(f"SDPA default-backend gradients vs float64: {results['attention_grad_check']}")

    results["plain_bf16_cast"] = plain_cast_check(device)
    log(f"WanDiT cast whole to bf16 runs a forward: {results['plain_bf16_cast']}")

    results["cases"] = []
    for case in cases:
        try:
            results["cases"].append(run_case(case, device, results["gemm"]["peak_tflops"], args, deadline))
        except Exception as e:
            traceback.print_exc()
            results["cases"].append(dict(case=case.name, error=f"{type(e).__name__}: {e}"))
        free(device)
    results["wall_s"] = time.perf_counter() - start

    print()
    print(markdown(results))
    out = args.out
    if out is None and not args.smoke:
        out = os.path.join(os.path.dirname(__file__), "results", f"dit-{card_slug(results['env']['device'])}.json")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        log(f"wrote {out}")
    log(f"total {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
