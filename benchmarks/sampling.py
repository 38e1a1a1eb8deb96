"""End-to-end sampling time of one video, split between encoders, DiT steps and VAE decode.

The Wan2.1-1.3B-shaped BindWeave (36-channel DiT, 30 blocks) at 480x832, 81 frames, 4 references,
50 flow steps with batched CFG, with full-size random-weight encoders built from their real
architectures (Qwen2.5-VL-7B, umt5-xxl encoder, CLIP ViT-H/14 vision tower, Wan VAE) — so the
split is what a user with the real weights sees. Timing synchronises around each phase of
``bindweave.inference.sampler.sample_videos`` (the encoders' ``encode_features``, the DiT calls, the VAE
decode); the target of issue #6 is encoders + VAE under 10% of the total. Run twice: encoders
resident on the GPU, then ``offload_encoders`` (encoders go back to the CPU after encoding); each
phase reports the GPU memory allocated when it starts and its peak.

Usage:
    python benchmarks/sampling.py            # GPU: writes results/sampling-<card>.json
    python benchmarks/sampling.py --smoke    # CPU, tiny parts, seconds
    # issue #22: the 14B DiT, a few steps (a per-step time), resident vs every memory option (peaks per phase):
    python benchmarks/sampling.py --dit wan2.1-i2v-14b --steps 5 --runs resident low_memory --out results/x.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from bindweave.model.dit import CrossAttentionBranch, WanDiT
from bindweave.model.presets import wan_dit_preset
from bindweave.training.module import BindWeave
from bindweave.inference.dit_offload import DiTOffloadConfig
from bindweave.inference.sampler import SamplingConfig, sample_videos
from conditioners import IdentityConditioner, MultiReferenceConditioner, RelationalConditioner
from encoders import CLIPVisionEncoder, FrozenEncoder, MLLMEncoder, T5TextEncoder, WanVAE
from encoders.clip import TINY_CLIP_CONFIG
from encoders.mllm import TINY_MLLM_CONFIG
from encoders.text import TINY_T5_CONFIG
from encoders.vae import TINY_VAE_CONFIG

RESULTS = Path(__file__).parent / "results"

# Real architectures, random weights (configs as the released checkpoints ship them).
QWEN25_VL_7B = {
    "model_type": "qwen2_5_vl",
    "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "out_hidden_size": 3584},
}
UMT5_XXL = {"model_type": "umt5", "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.0,
            "feed_forward_proj": "gated-gelu", "vocab_size": 256384}
CLIP_VIT_H = {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                                                 "patch_size": 14}}
WAN_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
           "temperal_downsample": [False, True, True]}


def build(smoke: bool, preset: str = "wan2.1-i2v-1.3b", steps: int = 50) -> tuple[BindWeave, SamplingConfig, dict]:
    if smoke:
        dit = partial(WanDiT, in_channels=12, out_channels=4, dim=32, ffn_dim=64, num_heads=2, num_layers=2,
                      freq_dim=32, branches=[CrossAttentionBranch("text", 32), CrossAttentionBranch("image", 32, "norm_mlp")])
        parts = dict(mllm=TINY_MLLM_CONFIG, t5=TINY_T5_CONFIG, clip=TINY_CLIP_CONFIG, vae=TINY_VAE_CONFIG, dtype="float32",
                     image_size=56, max_length=32)
        sampling = SamplingConfig(num_steps=3, num_frames=5, height=32, width=32)
    else:
        FrozenEncoder.random_init_device = None  # draw the 7B + 5.7B random weights on the GPU (speed only)
        dit = partial(wan_dit_preset, preset)
        parts = dict(mllm=QWEN25_VL_7B, t5=UMT5_XXL, clip=CLIP_VIT_H, vae=WAN_VAE, dtype="bfloat16", image_size=448,
                     max_length=512)
        sampling = SamplingConfig(num_steps=steps, guidance_scale=5.0, shift=3.0, num_frames=81, height=480, width=832)
    dtype = parts["dtype"]
    module = BindWeave(
        dit=dit,
        vae=partial(WanVAE, tiny_config=parts["vae"], dtype="float32" if smoke else "bfloat16"),
        relational=RelationalConditioner(
            text_encoder=partial(T5TextEncoder, tiny_config=parts["t5"], max_length=parts["max_length"], dtype=dtype),
            mllm=partial(MLLMEncoder, tiny_config=parts["mllm"], image_size=parts["image_size"], dtype=dtype),
        ),
        identity=IdentityConditioner(image_encoder=partial(CLIPVisionEncoder, tiny_config=parts["clip"], dtype=dtype)),
        multi_reference=MultiReferenceConditioner(max_references=4),
        sampling=sampling,
    )
    return module, sampling, parts


@contextmanager
def timed(device: torch.device, into: dict, key: str):
    """Accumulate the wall time of the block (synchronised on CUDA) under ``into[key]``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
    into[key] = into.get(key, 0.0) + time.perf_counter() - start


def gib(value: int) -> float:
    return round(value / 2**30, 2)


RUNS = {
    "resident": {},
    "offload_encoders": {"offload_encoders": True},
    # Issue #22's 24 GB recipe: encoders take turns on the GPU, DiT blocks visit it one at a time, tiled decode.
    "low_memory": {"offload_encoders": True, "dit_offload": DiTOffloadConfig(), "vae_tiling": True},
}


def run(smoke: bool, preset: str = "wan2.1-i2v-1.3b", steps: int = 50, runs: list[str] = ("resident", "offload_encoders")) -> dict:
    device = torch.device("cpu" if smoke else "cuda")
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    if not smoke:
        torch.set_default_dtype(torch.bfloat16)  # the DiT built in bf16: a 14B one in fp32 (56 GB) would not fit beside the encoders
    try:
        with torch.device(device):
            module, sampling, parts = build(smoke, preset, steps)
            module.configure_model()
    finally:
        torch.set_default_dtype(default_dtype)
    module.to(device)
    b, n, h, w = 1, 4, sampling.height, sampling.width
    batch = {
        "prompt": ["the woman in the first picture walks her dog from the second picture along the beach at sunset"],
        "references": torch.rand(b, n, 3, h, w, device=device) * 2 - 1,
        "num_references": [n],
        "seed": [0],
    }
    # Wrap the three phases; everything else (scheduler, assembly, CFG arithmetic) counts as "other".
    # On CUDA each phase also records the memory allocated when it starts and its peak.
    encode, dit_forward, decode = module.model.encode_features, module.dit.forward, module.vae.decode
    times: dict[str, float] = {}
    memory: dict[str, float] = {}  # per phase: allocated at its first call, peak over its calls

    inside: set[str] = set()  # a phase's calls nested in the same phase (forward -> run_blocks) count once

    def phase(key: str, fn, *a, **k):
        if key in inside:
            return fn(*a, **k)
        if cuda and f"{key}_start_gib" not in memory:
            memory[f"{key}_start_gib"] = gib(torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        inside.add(key)
        try:
            with timed(device, times, key):
                out = fn(*a, **k)
        finally:
            inside.discard(key)
        if cuda:
            memory[f"{key}_peak_gib"] = max(memory.get(f"{key}_peak_gib", 0.0), gib(torch.cuda.max_memory_allocated()))
        return out

    module.model.encode_features = partial(phase, "encoders", encode)
    module.dit.forward = partial(phase, "dit", dit_forward)
    for stage in ("embed", "run_blocks", "unembed"):  # the staged calls of dit_offload and the step cache
        setattr(module.dit, stage, partial(phase, "dit", getattr(module.dit, stage)))
    module.vae.decode = partial(phase, "vae_decode", decode)
    results = {}
    # Encoders resident (the default), then offloaded to the CPU after encoding (sampling.offload_encoders),
    # then (``--runs low_memory``) every memory option. Each run's peaks are over its own phases.
    for i, name in enumerate(runs):
        times.clear()
        memory.clear()
        if cuda:
            torch.cuda.empty_cache()
        config = dataclasses.replace(sampling, **RUNS[name])
        with timed(device, times, "total"):
            video = sample_videos(module.model, batch, config)  # (B, F, H, W, 3) uint8
        if i == 0:
            first = video
        # The MultiReference conditioner encodes references through the VAE inside encode_features.
        times["other"] = times["total"] - times["encoders"] - times["dit"] - times["vae_decode"]
        results[name] = {
            "seconds": {k: round(v, 3) for k, v in times.items()},
            "share": {k: round(v / times["total"], 4) for k, v in times.items() if k != "total"},
            "encoders_plus_vae_share": round((times["encoders"] + times["vae_decode"]) / times["total"], 4),
            "memory": memory.copy() if cuda else None,
            "options": {k: str(v) for k, v in RUNS[name].items()},
            "max_abs_diff_vs_first_run": int((video.int() - first.int()).abs().max()),
        }
    return {
        "card": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "smoke": smoke,
        "dit": preset,
        "shape": {"frames": sampling.num_frames, "height": h, "width": w, "references": n, "steps": sampling.num_steps,
                  "guidance_scale": sampling.guidance_scale},
        "runs": results,
        "video_shape": list(video.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny parts on the CPU (seconds)")
    parser.add_argument("--dit", default="wan2.1-i2v-1.3b", help="DiT preset (wan2.1-i2v-14b for issue #22)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (fewer: a per-step time to scale)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=["resident", "offload_encoders"])
    parser.add_argument("--out", default=None, help="results JSON (default: results/sampling-<card>.json)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke for the CPU run")
    if "low_memory" in args.runs and args.runs[-1] != "low_memory":
        parser.error("--runs: put low_memory last (its DiT offload stays applied to the model)")
    result = run(args.smoke, args.dit, args.steps, args.runs)
    for name, r in result["runs"].items():
        print(f"\n{name}:")
        print(f"{'phase':<12} {'seconds':>9} {'share':>7} {'start GiB':>10} {'peak GiB':>9}")
        memory = r["memory"] or {}
        for key, seconds in r["seconds"].items():
            share = r["share"].get(key, 1.0)
            start, peak = memory.get(f"{key}_start_gib", ""), memory.get(f"{key}_peak_gib", "")
            print(f"{key:<12} {seconds:>9.2f} {share:>7.1%} {start:>10} {peak:>9}")
        print(f"encoders + VAE decode: {r['encoders_plus_vae_share']:.1%} of the total (target < 10%)")
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        path = Path(args.out) if args.out else RESULTS / f"sampling-{result['card'].replace(' ', '-')}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
