"""Peak memory of one BindWeavePipeline call under each memory option, on a tiny and a mid-size model.

    python benchmarks/pipeline_memory.py                    # every size x option, CPU, a table
    python benchmarks/pipeline_memory.py --device cuda      # the same on a GPU
    python benchmarks/pipeline_memory.py --size mid --option bf16   # one measurement (JSON line)

Each measurement runs in its own process. On a GPU it reports ``torch.cuda.max_memory_allocated``
during the call (and what is allocated before it); on a CPU the resident set: the kernel's peak
(VmHWM, reset through /proc/self/clear_refs just before the call) and VmRSS before it. The models
have random weights (no downloads); ``mid`` has Wan2.1's VAE architecture at base width 48 and a
150M-parameter DiT. The call generates 2 videos (tiny: 9 frames of 64x64; mid: 5 frames of 256x256; 2 references
each) in 2 steps with CFG.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "baseline": {},
    "bf16": {"dtype": "bfloat16"},
    "offload": {"offload_encoders": True},
    "tiling": {"vae_tiling": True},
    "slicing": {"vae_slicing": True},
    "all": {"dtype": "bfloat16", "offload_encoders": True, "vae_tiling": True, "vae_slicing": True},
}


def mid_config() -> dict:
    text = {"model_type": "umt5", "d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 4, "num_heads": 8,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.0}
    mllm = {"model_type": "qwen2_5_vl",
            "text_config": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
                            "num_attention_heads": 8, "num_key_value_heads": 4,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}},
            "vision_config": {"depth": 4, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "patch_size": 14,
                              "spatial_merge_size": 2, "temporal_patch_size": 1, "window_size": 112,
                              "fullatt_block_indexes": [3]}}
    return {
        "dit": {"class_path": "bindweave.model.dit.WanDiT", "init_args": {
            "in_channels": 36, "out_channels": 16, "dim": 1024, "ffn_dim": 4096, "num_heads": 8, "num_layers": 8,
            "branches": [{"name": "text", "context_dim": 512, "embedder": "mlp"},
                         {"name": "image", "context_dim": 512, "embedder": "norm_mlp"}]}},
        "vae": {"class_path": "encoders.WanVAE", "init_args": {"dtype": "float32", "tiny_config": {
            "base_dim": 48, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "temperal_downsample": [False, True, True]}}},
        "relational": {"class_path": "conditioners.RelationalConditioner", "init_args": {
            "text_encoder": {"class_path": "encoders.T5TextEncoder",
                             "init_args": {"dtype": "float32", "max_length": 64, "tiny_config": text}},
            "mllm": {"class_path": "encoders.MLLMEncoder",
                     "init_args": {"dtype": "float32", "image_size": 224, "tiny_config": mllm}}}},
        "identity": {"class_path": "conditioners.IdentityConditioner", "init_args": {"image_encoder": {
            "class_path": "encoders.CLIPVisionEncoder", "init_args": {"dtype": "float32", "tiny_config": {
                "embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 512, "head_width": 64,
                                                 "patch_size": 16}}}}}},
        "multi_reference": {"class_path": "conditioners.MultiReferenceConditioner", "init_args": {"max_references": 4}},
        "sampling": {"num_steps": 2, "guidance_scale": 5.0, "shift": 3.0, "num_frames": 5, "height": 256, "width": 256},
    }


def tiny_config() -> dict:
    import yaml

    config = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"])
    config["sampling"].update(num_steps=2, num_frames=9, height=64, width=64)
    return config


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(size: str, option: str, device: str) -> dict:
    import torch
    from lightning.pytorch.cli import instantiate_module

    from bindweave.training.module import BindWeave
    from bindweave.inference.sampler import sample_videos
    from bindweave.inference.pipeline import BindWeavePipeline
    from bindweave.inference.requests import load_reference
    from bindweave.data.synthetic import COLOURS, _draw

    settings = dict(OPTIONS[option])
    dtype = settings.pop("dtype", None)
    config = mid_config() if size == "mid" else tiny_config()
    torch.manual_seed(0)
    module = instantiate_module(BindWeave, config)
    module.configure_model()
    pipe = BindWeavePipeline.from_module(module, replace(module.sampling, **settings)).to(device, dtype)
    if settings.get("vae_tiling"):  # tiles smaller than the frame, so tiling happens at this size
        s = pipe.sampling.height // 2
        module.vae.vae.enable_tiling(s, s, s * 3 // 4, s * 3 // 4)
    s = pipe.sampling
    refs = torch.full((2, 3, s.height, s.width), 255.0)
    for i, colour in enumerate(("red", "blue")):
        _draw(refs[i], "circle", COLOURS[colour], s.height / 2, s.width / 2, s.height / 2)
    refs = refs / 127.5 - 1
    batch = {"prompt": ["the red circle moves left and the blue circle moves up"] * 2,
             "references": refs[None].repeat(2, 1, 1, 1, 1).to(device), "num_references": [2, 2], "seed": [0, 1]}
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
    start = time.perf_counter()
    frames = sample_videos(pipe.model, batch, pipe.sampling)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    params = sum(p.numel() for p in module.parameters())
    return {"size": size, "option": option, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "params_M": round(params / 1e6, 1), "before_MiB": round(before / 2**20), "peak_MiB": round(peak / 2**20),
            "seconds": round(seconds, 1), "frames": list(frames.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "mid"])
    parser.add_argument("--option", choices=list(OPTIONS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.size and args.option:
        print(json.dumps(measure(args.size, args.option, args.device)), flush=True)
        return
    rows = []
    for size in ([args.size] if args.size else ["tiny", "mid"]):
        for option in ([args.option] if args.option else list(OPTIONS)):
            out = subprocess.run([sys.executable, __file__, "--size", size, "--option", option, "--device", args.device],
                                 capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"size": size, "option": option, "error": out.stderr[-300:]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| size | option | device | params (M) | before (MiB) | peak (MiB) | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['option']} | error: {r['error']!r} | | | | |")
        else:
            print(f"| {r['size']} | {r['option']} | {r['device']} | {r['params_M']} | {r['before_MiB']} | "
                  f"{r['peak_MiB']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
