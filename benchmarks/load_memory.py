"""Peak host memory of loading a DiT from sharded safetensors, against its size on disk.

    PYTHONPATH=$PWD python benchmarks/load_memory.py --preset wan2.1-i2v-14b --dtype bfloat16 \\
        --scratch /tmp/load-memory --out benchmarks/results/load-memory-h100-14b.json

1. Writes random weights (N(0, 0.02) values drawn once and tiled) of the preset (``bindweave.model.presets.PRESETS``) in the official Wan2.1 layout, as
   the release ships them: ``diffusion_pytorch_model-0000i-of-0000N.safetensors`` shards of
   ``--shard-gb`` plus the index and ``config.json``.
2. Loads them in a fresh process per method, so each peak is its own:

   * ``meta-cpu``: ``bindweave.weights.dit_loading.PretrainedWanDiT`` (build on the meta device, read every
     tensor straight into its final CPU tensor);
   * ``meta-cuda``: the same onto the GPU (host memory holds one tensor at a time);
   * ``naive-cpu``: the usual way, for comparison: a CPU model (``to_empty``, no init) plus
     ``safetensors.torch.load_file`` of every shard plus ``load_state_dict``.

Peak = the child's peak resident set (``ru_maxrss``); baseline = its resident set after importing
torch and this package, before loading; for the meta methods also the resident set once the model
is built on the meta device (a fixed cost of torch's meta dispatch, ~0.17 GB, not proportional to
the model). Page cache is not part of a process's resident set. Needs only torch, safetensors and
this repository (no diffusers/transformers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bindweave.model.dit import WanDiT
from bindweave.model.presets import PRESETS
from bindweave.weights.wan_official import bindweave_to_wan_key, wan_config_for

GB = 1e9


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# Writing random weights
# ----------------------------------------------------------------------------------------------


def write_checkpoint(preset: str, dtype: torch.dtype, folder: Path, shard_bytes: int) -> dict:
    from safetensors.torch import save_file

    with torch.device("meta"):
        dit = WanDiT(**PRESETS[preset])
    shapes = {bindweave_to_wan_key(k): tuple(v.shape) for k, v in dit.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    groups, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    start, weight_map = time.perf_counter(), {}
    # N(0, 0.02) values drawn once (128 Mi of them) and tiled over every tensor: random bytes at
    # memcpy speed, so writing 28 GB is bounded by the disk, not by the random number generator.
    pool = torch.empty(1 << 27, dtype=dtype).normal_(0, 0.02, generator=torch.Generator().manual_seed(0))

    def random_tensor(shape: tuple[int, ...], offset: int) -> torch.Tensor:
        flat = torch.empty(math.prod(shape), dtype=dtype)
        for begin in range(0, flat.numel(), pool.numel()):
            n = min(pool.numel(), flat.numel() - begin)
            shift = (offset + begin) % (pool.numel() - n + 1)
            flat[begin:begin + n] = pool[shift:shift + n]
        return flat.view(shape)

    for i, keys in enumerate(groups, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: random_tensor(shapes[k], 7919 * j) for j, k in enumerate(keys)}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del shard
    total = sum(math.prod(s) * dtype.itemsize for s in shapes.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(wan_config_for(dit)))
    disk = sum(f.stat().st_size for f in folder.iterdir())
    return {"shards": len(groups), "tensor_bytes": total, "disk_bytes": disk,
            "parameters": sum(math.prod(s) for s in shapes.values()), "write_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------
# Loading (child processes)
# ----------------------------------------------------------------------------------------------


def load_child(method: str, preset: str, dtype_name: str, folder: str) -> dict:
    dtype = getattr(torch, dtype_name)
    baseline = rss_bytes()
    start = time.perf_counter()
    built = None
    if method.startswith("meta"):
        from bindweave.weights.dit_loading import load_dit

        device = "cuda" if method == "meta-cuda" else "cpu"
        if device == "cuda":
            torch.cuda.init()
        with torch.device("meta"):  # what PretrainedWanDiT does, split to see the build's own cost
            dit = WanDiT(**PRESETS[preset])
        built = rss_bytes()
        load_dit(dit, folder, dtype=dtype, device=device if device == "cuda" else None)
        if device == "cuda":
            torch.cuda.synchronize()
    elif method == "naive-cpu":
        from safetensors.torch import load_file

        from bindweave.weights.dit_loading import dit_key_map

        with torch.device("meta"):
            dit = WanDiT(**PRESETS[preset])
        dit = dit.to_empty(device="cpu").to(dtype)
        state = {}
        for shard in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(str(shard)))
        sources, _ = dit_key_map(state.keys(), "wan")
        dit.load_state_dict({target: state[source] for target, source in sources.items()}, strict=True)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    params = list(dit.parameters())
    loaded = sum(p.numel() * p.element_size() for p in params)
    assert not any(p.is_meta for p in params)
    result = {"method": method, "load_s": round(seconds, 2), "baseline_rss_gb": round(baseline / GB, 3),
              "after_meta_build_rss_gb": round(built / GB, 3) if built else None,
              "peak_rss_gb": round(peak_rss_bytes() / GB, 3), "final_rss_gb": round(rss_bytes() / GB, 3),
              "model_bytes": loaded,
              "device": str(params[0].device), "dtype": str(params[0].dtype)}
    if method == "meta-cuda":
        result["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
    return result


def run_child(method: str, preset: str, dtype: str, folder: Path, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", method, "--preset", preset, "--dtype", dtype,
               "--scratch", str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"method": method, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) * 1024 / GB, 1)
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="wan2.1-i2v-14b", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--scratch", default="/tmp/load-memory", help="folder for the random checkpoint (deleted)")
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--methods", default="meta-cpu,meta-cuda,naive-cpu")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per load")
    parser.add_argument("--out", help="results JSON (written after every method)")
    parser.add_argument("--label", default="", help="free text stored with the results (e.g. the machine kind)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_child(args.child, args.preset, args.dtype, args.scratch)))
        return
    folder = Path(args.scratch)
    shutil.rmtree(folder, ignore_errors=True)
    results = {"benchmark": "load_memory", "label": args.label, "machine": machine(), "preset": args.preset,
               "dtype": args.dtype, "layout": "official Wan2.1 (WanModel keys), sharded safetensors + index",
               "peak": "child ru_maxrss (resident set; page cache excluded)", "runs": []}
    try:
        results["checkpoint"] = write_checkpoint(args.preset, getattr(torch, args.dtype), folder,
                                                 int(args.shard_gb * GB))
        print(json.dumps(results["checkpoint"]), flush=True)
        disk = results["checkpoint"]["disk_bytes"]
        for method in args.methods.split(","):
            if method == "meta-cuda" and not torch.cuda.is_available():
                continue
            run = run_child(method, args.preset, args.dtype, folder, args.timeout)
            if "peak_rss_gb" in run:
                run["peak_over_disk"] = round(run["peak_rss_gb"] * GB / disk, 3)
                above_baseline = run["peak_rss_gb"] - run["baseline_rss_gb"]
                run["peak_minus_baseline_over_disk"] = round(above_baseline * GB / disk, 3)
                if run.get("after_meta_build_rss_gb"):
                    run["peak_minus_built_over_disk"] = round(
                        (run["peak_rss_gb"] - run["after_meta_build_rss_gb"]) * GB / disk, 3)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
