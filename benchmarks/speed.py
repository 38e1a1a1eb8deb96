"""Sampling speed options on one GPU at the Wan2.1-14B shapes: FP8 linears, step cache, block offload.

One process, one card (issue #22), 480x832, 81 frames, 4 reference slots: 39,000 tokens, text 512
(diffusers' I2V processor assumes it), image 4 x 257 CLIP tokens; batch 1 (a CFG step is batch 2:
twice these times at this size, where the GPU is full):

1. **FP8 per layer**: the three linear shapes of a 14B block (39,000 x 5120 -> 5120, 5120 -> 13824,
   13824 -> 5120): bf16 ``F.linear`` and torchao's row-wise float8 linear, both compiled; relative
   error of each against the fp32 product of the same bf16 inputs.
2. **One 14B block forward**: ours bf16 compiled (``apply_compile``), diffusers compiled
   (``compile_repeated_blocks``, the same weights), ours with FP8 linears compiled
   (``bindweave.inference.fp8.apply_fp8``); error of each against our fp32 block.
3. **Step cache**: a 4-block 14B slice, compiled: a plain call, a full step through
   ``FirstBlockCache`` (threshold 0: every step full, metric computed) and a skipped step
   (the first block plus the cached residual).
4. **Block offload**: the same slice eager, resident against ``dit_offload`` (diffusers group
   offloading, one block per group, side-stream prefetch): time per call and peak memory.
5. **The whole 14B DiT** (``--only whole_dit``; 40 blocks, weights drawn on the GPU block by block
   and kept on the CPU): one CFG-batched call (batch 2) eager, resident, offloaded, and offloaded
   with FP8 attention: time and peak memory (needs ~60 GB of host memory with pinning).
6. **The whole 14B DiT compiled** (``--only whole_dit_compiled``): resident, each block compiled as
   ``parallelism.compile`` does, one CFG-batched call: bf16, then with FP8 linears applied to the
   compiled DiT (the order ``predict`` uses) and FP8 attention; time, peak memory and error against
   the eager bf16 call. A 50-step video's DiT time without the step cache is 50 of these calls.

Usage:
    python benchmarks/speed.py                 # GPU: results/speed-<card>.json
    python benchmarks/speed.py --smoke         # CPU, tiny shapes (fallbacks only), seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit as ditbench  # noqa: E402  (benchmarks/dit.py: models, inputs, timing)

from bindweave.inference.dit_offload import DiTOffloadConfig, apply_dit_offload, offloaded_run_blocks  # noqa: E402
from bindweave.dtypes import fp8_device_unsupported  # noqa: E402
from bindweave.inference.fp8 import apply_fp8  # noqa: E402
from bindweave.model.attention import attention_backend  # noqa: E402
from bindweave.model.fp8_attention import fp8_attention_unsupported  # noqa: E402
from bindweave.inference.step_cache import FirstBlockCache, StepCacheConfig  # noqa: E402
from bindweave.model.presets import wan_dit_preset  # noqa: E402
from bindweave.parallel.per_block import apply_compile  # noqa: E402

RESULTS = Path(__file__).parent / "results"
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def timed(fn, device, warmup=2, iters=5) -> dict:
    r = ditbench.time_fn(fn, device, warmup, iters)
    return {k: round(v, 3) for k, v in r.items()}


def staged(dit, run_blocks):
    def call(x, t, ctx):
        state = dit.embed(x, t, ctx)
        return dit.unembed(run_blocks(state.tokens, state), state)
    return call


@torch.no_grad()  # traced with grad on, torchao's fp8 matmul fails to compile (no derivative of _scaled_mm)
def fp8_layers(device, smoke: bool) -> dict:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    out = {}
    m = 256 if smoke else 39000
    for k, n in [(5120, 5120), (5120, 13824), (13824, 5120)] if not smoke else [(64, 64)]:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        layer = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16).requires_grad_(False)
        ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        bf16 = torch.compile(lambda x: layer(x))
        t_bf16 = timed(lambda: bf16(x), device, 3, 20)
        q = copy.deepcopy(layer)
        quantize_(q, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        fp8 = torch.compile(lambda x: q(x))
        t_fp8 = timed(lambda: fp8(x), device, 3, 20)
        with torch.no_grad():
            err_bf16, err_fp8 = ditbench.rel_err(bf16(x), ref), ditbench.rel_err(fp8(x), ref)
        flops = 2 * m * k * n
        out[f"{m}x{k}->{n}"] = dict(bf16_ms=t_bf16["ms"], fp8_ms=t_fp8["ms"], speedup=round(t_bf16["ms"] / t_fp8["ms"], 3),
                                    bf16_tflops=round(flops / t_bf16["ms"] / 1e9, 1),
                                    fp8_tflops=round(flops / t_fp8["ms"] / 1e9, 1),
                                    bf16_rel_err=err_bf16, fp8_rel_err=err_fp8)
        log(f"linear {m}x{k}->{n}: {out[f'{m}x{k}->{n}']}")
        del x, layer, q, ref
    return out


def block_case(device, smoke: bool, num_layers: int = 1) -> ditbench.Case:
    if smoke:
        return ditbench.smoke_cases()[0]
    return ditbench.Case("14b-480p", "wan2.1-i2v-14b", num_layers, (25, 60, 104))


BLOCK_VARIANTS = ("ours", "diffusers", "fp8", "fp8_attention", "fp8_both")
"""``--block-variants`` of ``one_block``: ours bf16, diffusers bf16, ours with FP8 linears, with FP8
attention, with both (each compiled; on a cold H100 an FP8 variant's first compile took 193 s)."""


def one_block(device, smoke: bool, result: dict, variants: tuple[str, ...] = BLOCK_VARIANTS) -> None:
    case = block_case(device, smoke)
    master = ditbench.build_ours(case, device)
    inp = ditbench.make_inputs(master, case, case.text_tokens_diffusers, device, torch.bfloat16)
    with torch.no_grad():
        ref = ditbench.forward_fn(master, "ours", inp.to(torch.float32))()
    rows = result.setdefault("block", {})
    dynamic = None if smoke else False

    def measure(name, model, impl):
        with torch.no_grad():
            fn = ditbench.forward_fn(model, impl, inp)
            r = timed(fn, device, 2, 3 if smoke else 7)
            out = fn()
            rows[name] = dict(**r, rel_err_vs_fp32=ditbench.rel_err(out, ref), **ditbench.peak_memory(fn, device))
        log(f"block {name}: {rows[name]}")

    if "ours" in variants:
        ours = ditbench.ours_in(master, torch.bfloat16).requires_grad_(False)
        measure("ours bf16 compiled", apply_compile(ours, dynamic=dynamic), "ours")
        del ours
    if "diffusers" in variants:
        diff = ditbench.build_diffusers(master, torch.bfloat16, device).requires_grad_(False)
        diff.compile_repeated_blocks(fullgraph=True, dynamic=dynamic)
        measure("diffusers bf16 compiled", diff, "diffusers")
        del diff
    gc.collect()
    fp8 = ditbench.ours_in(master, torch.bfloat16).requires_grad_(False)
    reason = apply_fp8(fp8)
    result["fp8_unsupported"] = reason
    if reason is None and "fp8" in variants:
        measure("ours fp8 compiled", apply_compile(fp8, dynamic=dynamic), "ours")
    # FP8 attention (model.sampling.attention: fp8): self-attention on the Triton kernel, text and image on SDPA.
    heads = master.num_heads
    probe = torch.empty(1, 16, heads, master.dim // heads, dtype=torch.bfloat16, device=device)  # (B, L, H, Dh)
    attention_reason = fp8_attention_unsupported(probe)
    result["fp8_attention_unsupported"] = attention_reason
    if attention_reason is None:
        with attention_backend("fp8"):
            if "fp8_attention" in variants:
                measure("ours bf16 + fp8 attention compiled",
                        apply_compile(ditbench.ours_in(master, torch.bfloat16).requires_grad_(False), dynamic=dynamic), "ours")
            if reason is None and "fp8_both" in variants:
                both = ditbench.ours_in(master, torch.bfloat16).requires_grad_(False)
                apply_fp8(both)
                measure("ours fp8 + fp8 attention compiled", apply_compile(both, dynamic=dynamic), "ours")
                del both
    del fp8, master, ref
    ditbench.free(device)


def block_slice(device, smoke: bool, result: dict) -> None:
    case = block_case(device, smoke, num_layers=2 if smoke else 4)
    master = ditbench.build_ours(case, device)
    inp = ditbench.make_inputs(master, case, case.text_tokens_diffusers, device, torch.bfloat16)
    args = (inp.x, inp.t, {"text": inp.text, "image": inp.image})
    n = len(master.blocks)
    dit = ditbench.ours_in(master, torch.bfloat16).requires_grad_(False)
    del master
    ditbench.free(device)
    rows = result.setdefault("slice", {"blocks": n})
    iters = 3 if smoke else 5
    with torch.no_grad():
        # Block offload (eager: diffusers' hooks are not compiled): resident, then offloaded.
        rows["eager resident"] = dict(**timed(lambda: dit(*args), device, 2, iters), **ditbench.peak_memory(lambda: dit(*args), device))
        log(f"slice eager resident: {rows['eager resident']}")
        expected = dit(*args)
        offload_dit = copy.deepcopy(dit)
        offload_dit.blocks.to("cpu")
        dit.blocks.to("cpu")  # out of the way of the peak (back for the step-cache part)
        ditbench.free(device)
        apply_dit_offload(offload_dit, device, DiTOffloadConfig(use_stream=device.type == "cuda"))
        call = staged(offload_dit, offloaded_run_blocks(offload_dit, offload_dit.run_blocks))
        rows["eager offloaded"] = dict(**timed(lambda: call(*args), device, 2, iters), **ditbench.peak_memory(lambda: call(*args), device),
                                       rel_err_vs_resident=ditbench.rel_err(call(*args), expected))
        log(f"slice eager offloaded: {rows['eager offloaded']}")
        del offload_dit, call, expected
        dit.blocks.to(device)
        ditbench.free(device)
        # Step cache on the compiled slice: plain, always full (metric computed), always skipped.
        apply_compile(dit, dynamic=None if smoke else False)
        rows["compiled plain"] = timed(lambda: dit(*args), device, 2, iters)
        log(f"slice compiled plain: {rows['compiled plain']}")
        full = FirstBlockCache(StepCacheConfig(threshold=0.0))
        call = staged(dit, lambda tokens, state: full.run_blocks(dit, tokens, state))
        rows["compiled cache full step"] = timed(lambda: call(*args), device, 2, iters)
        log(f"slice compiled cache full: {rows['compiled cache full step']}")
        skip = FirstBlockCache(StepCacheConfig(threshold=float("inf")))
        call = staged(dit, lambda tokens, state: skip.run_blocks(dit, tokens, state))
        rows["compiled cache skipped step"] = timed(lambda: call(*args), device, 2, iters)
        rows["compiled cache skipped step"]["skipped"] = skip.skipped
        rows["compiled cache skipped step"]["calls"] = len(skip.steps)
        log(f"slice compiled cache skipped: {rows['compiled cache skipped step']}")


def whole_dit_model(device, smoke: bool):
    """The 14B DiT (40 blocks; 2 when ``smoke``) with random bf16 weights, its blocks on the CPU, and one
    CFG-batched input (batch 2). Weights are drawn on the device block by block and kept on the CPU,
    so building it needs ~28 GB of host memory, not 56. Returns ``(dit, x, t, ctx, case)``."""
    case = block_case(device, smoke, num_layers=2 if smoke else 40)
    with torch.device("meta"):
        dit = wan_dit_preset(case.preset, num_layers=case.num_layers, **case.overrides)
    generator = torch.Generator(device=device).manual_seed(0)

    def draw(module):  # (all its weights) ~ N(0, 0.02) in bf16, drawn on the device
        module.to_empty(device=device)
        for parameter in module.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator, device=device).mul_(0.02).to(torch.bfloat16)
        return module

    for block in dit.blocks:
        draw(block).to("cpu")  # one block at a time on the device
    for child in dit.children():  # embedders, modulation, head: they stay on the device
        if child is not dit.blocks:
            draw(child)
    dit = dit.eval().requires_grad_(False)
    one = ditbench.make_inputs(dit, case, case.text_tokens_diffusers, device, torch.bfloat16)
    x, t = one.x.expand(2, -1, -1, -1, -1).contiguous(), one.t.expand(2).contiguous()  # CFG: (2, C, F, H, W)
    ctx = {"text": one.text.expand(2, -1, -1).contiguous(), "image": one.image.expand(2, -1, -1).contiguous()}
    return dit, x, t, ctx, case


def whole_dit(device, smoke: bool, result: dict) -> None:
    """The whole 14B DiT (40 blocks, bf16, random weights), one CFG-batched call (batch 2) eager:
    resident on the card, then with its blocks offloaded (``dit_offload``), then offloaded with FP8
    attention: time per call and peak GPU memory (weights included)."""
    dit, x, t, ctx, case = whole_dit_model(device, smoke)
    frames, height, width = case.latent
    rows = result.setdefault("whole_dit", {"blocks": len(dit.blocks), "batch": 2, "tokens_per_sample": frames * height * width // 4})
    iters = 2
    with torch.no_grad():
        if not smoke and torch.cuda.get_device_properties(device).total_memory < 40 * 2**30:
            rows["resident eager"] = "skipped: the bf16 14B DiT does not fit this card"
            expected = None
        else:
            dit.blocks.to(device)
            rows["resident eager"] = dict(**timed(lambda: dit(x, t, ctx), device, 1, iters), **ditbench.peak_memory(lambda: dit(x, t, ctx), device))
            log(f"whole DiT resident eager: {rows['resident eager']}")
            expected = dit(x, t, ctx)
            dit.blocks.to("cpu")
        ditbench.free(device)
        apply_dit_offload(dit, device, DiTOffloadConfig(use_stream=device.type == "cuda"))
        call = staged(dit, offloaded_run_blocks(dit, dit.run_blocks))
        rows["offloaded eager"] = dict(**timed(lambda: call(x, t, ctx), device, 1, iters), **ditbench.peak_memory(lambda: call(x, t, ctx), device))
        if expected is not None:
            rows["offloaded eager"]["rel_err_vs_resident"] = ditbench.rel_err(call(x, t, ctx), expected)
        log(f"whole DiT offloaded eager: {rows['offloaded eager']}")
        probe = torch.empty(1, 16, dit.num_heads, dit.dim // dit.num_heads, dtype=torch.bfloat16, device=device)
        if fp8_attention_unsupported(probe) is None:
            with attention_backend("fp8"):
                rows["offloaded eager + fp8 attention"] = dict(**timed(lambda: call(x, t, ctx), device, 1, iters),
                                                               **ditbench.peak_memory(lambda: call(x, t, ctx), device))
            log(f"whole DiT offloaded + fp8 attention: {rows['offloaded eager + fp8 attention']}")
    del dit, call
    ditbench.free(device)


def whole_dit_compiled(device, smoke: bool, result: dict) -> None:
    """The whole 14B DiT resident and compiled per block (``parallelism.compile``), one CFG-batched call
    (batch 2): bf16, then with sampling's speed options, FP8 linears (applied to the compiled DiT, in
    the order ``predict`` applies them: compile at ``configure_model``, FP8 at the first sampling call)
    and FP8 attention. Time per call, peak memory, error against the eager bf16 call. Needs about the
    41.9 GiB that ``whole_dit``'s resident eager call peaked at on an H100; on the CPU (``smoke``)
    blocks trace with ``aot_eager`` and FP8 falls back."""
    dit, x, t, ctx, case = whole_dit_model(device, smoke)
    frames, height, width = case.latent
    tokens = frames * height * width // 4
    rows = result.setdefault("whole_dit_compiled", {"blocks": len(dit.blocks), "batch": 2, "tokens_per_sample": tokens})
    iters = 2 if smoke else 3
    dit.blocks.to(device)
    with torch.no_grad():
        expected = dit(x, t, ctx)
        apply_compile(dit, dynamic=None if smoke else False, backend="aot_eager" if smoke else "inductor")

        def measure(name):
            rows[name] = dict(**timed(lambda: dit(x, t, ctx), device, 1, iters), **ditbench.peak_memory(lambda: dit(x, t, ctx), device),
                              rel_err_vs_eager_bf16=ditbench.rel_err(dit(x, t, ctx), expected))
            log(f"whole DiT {name}: {rows[name]}")

        measure("compiled bf16")
        rows["fp8_unsupported"] = apply_fp8(dit)
        probe = torch.empty(1, 16, dit.num_heads, dit.dim // dit.num_heads, dtype=torch.bfloat16, device=device)
        rows["fp8_attention_unsupported"] = fp8_attention_unsupported(probe)
        with attention_backend("fp8" if rows["fp8_attention_unsupported"] is None else "sdpa"):
            measure("compiled fp8 linears + fp8 attention")
    del dit, expected
    ditbench.free(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", nargs="+", choices=["fp8_layers", "one_block", "block_slice", "whole_dit", "whole_dit_compiled"], default=None,
                        help="run only these parts (a cold H100 compiled the first 14B block in 189 s)")
    parser.add_argument("--block-variants", nargs="+", choices=BLOCK_VARIANTS, default=list(BLOCK_VARIANTS),
                        help="one_block's variants (all five outlast one 600 s call on a cold card)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    result = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    try:
        import torchao
        result["torchao"] = torchao.__version__
    except ImportError:
        result["torchao"] = None
    import diffusers
    result["diffusers"] = diffusers.__version__
    path = Path(args.out) if args.out else RESULTS / f"speed-{result['card'].replace(' ', '-')}.json"
    steps = [("one_block", lambda d, s, r: one_block(d, s, r, tuple(args.block_variants))), ("block_slice", block_slice),
             ("whole_dit", whole_dit), ("whole_dit_compiled", whole_dit_compiled)]
    if result["torchao"] and device.type == "cuda" and fp8_device_unsupported(device, "FP8 linears") is None:
        steps.insert(0, ("fp8_layers", lambda d, s, r: r.__setitem__("fp8_layers", fp8_layers(d, s))))
    steps = [(name, step) for name, step in steps if args.only is None or name in args.only]
    for name, step in steps:
        try:
            step(device, args.smoke, result)
        except Exception as error:  # keep what the other steps measured
            result.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"[:500]
            traceback.print_exc()
        ditbench.free(device)
        path.parent.mkdir(exist_ok=True, parents=True)
        path.write_text(json.dumps(result, indent=2))
    log(f"wrote {path}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
