"""One sampling step of a 14B-shaped release-layout DiT at 480p, 81 frames (issue #20): time and peak memory.

The DiT is ``wan_dit_preset("wan2.1-i2v-14b")`` with random weights in bfloat16 and the release's CLIP
routing (``image`` branch: ``keep_tokens 257, overflow_to text``); the input is the release's
layout: 4 reference slots before the 21 video latent frames (latent 25 x 60 x 104, 36 channels), CFG's
two sides batched (B = 2): 1028 CLIP tokens (1280-d) per side and [MLLM states; T5 padded to 512]
(4096-d, 526 and 532 MLLM tokens as in the shipped singleface case, the shorter side's padding
masked). One step = one DiT call on that batch (the sampler's guided step). Eager first, then
``torch.compile`` per block (``bindweave.parallel.per_block.apply_compile``) if ``--budget-s`` allows.

Usage (GPU): python benchmarks/release_step.py --out results/   # release-step-<card>.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bindweave.model.dit import CrossAttentionBranch
from bindweave.model.presets import wan_dit_preset
from bindweave.parallel.per_block import apply_compile


def inputs(device: torch.device, frames: int = 21, height: int = 60, width: int = 104, slots: int = 4,
           mllm=(526, 532)) -> tuple:
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = dict(device=device, dtype=torch.bfloat16, generator=g)
    x = torch.randn(2, 36, slots + frames, height, width, **bf16)  # (B, C_in, 4 + T, h, w)
    text_len = max(mllm) + 512
    text = torch.randn(2, text_len, 4096, **bf16)  # [MLLM; T5 padded to 512]
    text_mask = torch.zeros(2, text_len, dtype=torch.bool, device=device)
    for i, n in enumerate(mllm):
        text_mask[i, : n + 512] = True
    image = torch.randn(2, 4 * 257, 1280, **bf16)  # 4 references x 257 CLIP tokens
    context = {"text": text, "image": image}
    masks = {"text": text_mask, "image": torch.ones(2, 4 * 257, dtype=torch.bool, device=device)}
    return x, torch.full((2,), 999.0, device=device), context, masks


@torch.no_grad()
def timed(dit, args, repeats: int = 1) -> dict:
    torch.cuda.synchronize()
    start = time.perf_counter()
    dit(*args)  # warm-up (compiles when compiled)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = dit(*args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"first_call_s": round(first, 2), "step_s": [round(t, 3) for t in times],
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "output": list(out.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budget-s", type=float, default=100.0, help="skip the compiled run past this")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda")
    card = torch.cuda.get_device_name().replace(" ", "-")
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
              "model": "wan2.1-i2v-14b, image branch keep_tokens 257 overflow_to text, random weights",
              "input": "B=2 (batched CFG), 36 x (4 slots + 21) x 60 x 104 latent (480p, 81 frames), "
                       "text 1044 x 4096 (526/532 MLLM + 512 T5), image 1028 x 1280"}
    path = Path(args.out) / f"release-step-{card}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(device):
        dit = wan_dit_preset("wan2.1-i2v-14b", branches=[
            CrossAttentionBranch("text", 4096, "mlp"),
            CrossAttentionBranch("image", 1280, "norm_mlp", keep_tokens=257, overflow_to="text")]).to(torch.bfloat16)
    dit.eval()
    result["params_b"] = round(sum(p.numel() for p in dit.parameters()) / 1e9, 2)
    result["build_s"] = round(time.perf_counter() - started, 1)
    result["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    batch = inputs(device)
    result["eager"] = timed(dit, batch, args.repeats)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    if time.perf_counter() - started < args.budget_s * 0.45:
        apply_compile(dit)
        result["compiled"] = timed(dit, batch, args.repeats)
    else:
        result["compiled"] = f"skipped: {time.perf_counter() - started:.0f} s of the {args.budget_s:.0f} s budget used"
    result["total_s"] = round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
