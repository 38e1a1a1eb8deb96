"""Loader throughput: samples/s of ``WebDataModule`` on this machine's CPUs, raw vs cached shards,
against the samples/s one GPU consumes in a 14B training step.

Raw: packed shards of synthetic H.264 clips (854x480 at 24 fps, ~2.7 Mbit/s, and 1280x720 at
30 fps, 5.5 s each) with 1-4 JPEG references; each sample is decoded as in training (81 frames at
16 fps, random start and crop, 480x832 bucket, references fitted and augmented) and batched (batch
1, uint8). Cached: shards with the feature sizes of the paper's model (Wan VAE latent 16x21x60x104
fp32, umt5 512x4096 bf16, Qwen2.5-VL 120 + 256 per reference tokens x 3584 bf16, CLIP n x 257 x
1280 bf16, reference latents 16 x n x 60 x 104 fp32), read and collated.

Both run through the real DataLoader with 0..N worker processes; the first batches (worker start)
are not timed. The GPU side comes from the committed DiT benchmark
(``results/dit-NVIDIA-H100-80GB-HBM3.json``: one Wan2.1-14B block, 480p + 4 reference slots,
forward + backward) x 40 blocks, i.e. the DiT alone; encoders, optimizer and communication only
add to it, so the need is an upper bound.

    python benchmarks/loader.py                                  # ~3 min on 2 cores
    python benchmarks/loader.py --clips 16 --samples 32 --workers 0 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bindweave.cli.data import pack  # noqa: E402
from bindweave.data.datamodule import WebDataModule  # noqa: E402
from bindweave.data.feature_cache import features_to_bytes  # noqa: E402
from bindweave.data.shards import ShardWriter  # noqa: E402

SOURCES = {"480p": (480, 854, 24), "720p": (720, 1280, 30)}
SECONDS = 5.5


def make_clip(path: Path, height: int, width: int, fps: int, seed: int) -> None:
    """A clip that compresses like footage: a blurred noise texture panning, plus grain."""
    rng = np.random.default_rng(seed)
    frames = int(SECONDS * fps)
    pan = int(frames * 1.7) + 8
    texture = Image.fromarray(rng.integers(0, 255, (height + pan, width + pan, 3), dtype=np.uint8))
    texture = np.asarray(texture.filter(ImageFilter.GaussianBlur(1.5))).astype(np.int16)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for i in range(frames):
            y, x = int(i * 1.7), int(i * 1.1)
            frame = texture[y : y + height, x : x + width] + rng.integers(-10, 11, (height, width, 1))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.clip(0, 255).astype(np.uint8), format="rgb24")))
        container.mux(stream.encode())


def make_raw(folder: Path, source: str, clips: int) -> list[str]:
    height, width, fps = SOURCES[source]
    items = []
    for i in range(clips):
        make_clip(folder / f"{source}-{i}.mp4", height, width, fps, seed=i)
        refs = []
        for r in range(1 + i % 4):
            rng = np.random.default_rng(100 * i + r)
            image = Image.fromarray(rng.integers(0, 255, (512, 384, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
            image.save(folder / f"{source}-{i}-ref{r}.jpg", quality=90)
            refs.append(f"{source}-{i}-ref{r}.jpg")
        items.append({"id": f"{source}-{i}", "video": f"{source}-{i}.mp4", "references": refs, "prompt": f"clip {i}"})
    manifest = folder / f"{source}.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in items))
    summary = pack(str(manifest), str(folder / f"raw-{source}"), samples_per_shard=1, num_frames=81, fps=16,
                   workers=os.cpu_count() or 1, progress=False)
    assert summary["samples"] == clips, summary["rejected"]
    return [s["path"] for s in summary["shards"]]


def make_cached(folder: Path, clips: int) -> list[str]:
    """Cached shards with the 14B model's feature shapes (values random: reading cost only)."""
    with ShardWriter(folder / "cached", max_samples=1) as writer:
        for i in range(clips):
            n = 1 + i % 4
            mllm = 120 + 256 * n
            features = {
                "relational": {"t5_tokens": torch.randn(512, 4096).bfloat16(), "t5_mask": torch.ones(512, dtype=torch.bool),
                               "mllm_tokens": torch.randn(mllm, 3584).bfloat16(), "mllm_mask": torch.ones(mllm, dtype=torch.bool)},
                "identity": {"tokens": torch.randn(n, 257, 1280).bfloat16()},
                "multi_reference": {"latents": torch.randn(16, n, 60, 104)},
            }
            record = {"id": f"c{i}", "prompt": f"clip {i}", "num_references": n, "height": 480, "width": 832, "num_frames": 81,
                      "clip_fps": 16.0}
            writer.write(f"c{i}", {"json": json.dumps(record).encode(),
                                   "safetensors": features_to_bytes(torch.randn(16, 21, 60, 104), features)})
    return [str(p) for p in sorted((folder / "cached").glob("shard-*.tar"))]


def measure(shards: list[str], cached: bool, workers: int, samples: int, warmup: int) -> dict:
    module = WebDataModule(urls=shards, cached=cached, num_workers=workers, batch_size=1, samples_per_epoch=10**6,
                           shuffle_buffer=4, check_samples=0)
    module.setup("fit")
    loader = iter(module.train_dataloader())
    start = time.perf_counter()
    for _ in range(warmup):
        next(loader)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(samples):
        batch = next(loader)
    seconds = time.perf_counter() - start
    del loader
    shape = tuple(batch["frames"].shape if "frames" in batch else batch["video_latents"].shape)
    return {"kind": "cached" if cached else "raw", "workers": workers, "samples": samples,
            "samples_per_s": round(samples / seconds, 3), "seconds": round(seconds, 2),
            "warmup_s": round(first, 2), "batch_shape": list(shape)}


def gpu_need() -> dict:
    """Samples/s one H100 consumes training the 14B DiT at 480p (batch 1 per GPU), from the DiT benchmark."""
    path = ROOT / "benchmarks" / "results" / "dit-NVIDIA-H100-80GB-HBM3.json"
    out = {"source": str(path.relative_to(ROOT)), "assumption": (
        "a 14B step at 480p x 81 frames takes ~10-20 s per sample per GPU (one sample per GPU per step); "
        "measured here as 40 x one Wan2.1-14B block forward+backward (39,000 tokens: 21x60x104 latent + 4 reference "
        "slots, 768 text + 1,028 image context tokens, compiled) on an H100, DiT only")}
    if path.exists():
        cases = {c["case"]: c for c in json.loads(path.read_text())["cases"]}
        variants = {v["label"]: v for v in cases["14b-block-480p"]["variants"] if v.get("ms")}
        for label in ("ours compiled ac=full", "ours compiled ac=selective"):
            step = variants[label]["ms"] * 40 / 1000
            out[label] = {"dit_step_s_per_sample": round(step, 1), "samples_per_s_per_gpu": round(1 / step, 4)}
    out["range_10_20_s"] = {"samples_per_s_per_gpu": [0.05, 0.1], "per_8_gpu_node": [0.4, 0.8]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=8, help="clips per source resolution (and cached samples)")
    parser.add_argument("--samples", type=int, default=12, help="timed samples per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first samples per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "loader-cpu.json"))
    args = parser.parse_args()

    random.seed(0)
    torch.manual_seed(0)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        raw = {source: make_raw(folder, source, args.clips) for source in args.sources}
        cached = make_cached(folder, args.clips)
        sizes = {f"raw-{s}": round(sum(os.path.getsize(p) for p in shards) / args.clips / 1e6, 2) for s, shards in raw.items()}
        sizes["cached"] = round(sum(os.path.getsize(p) for p in cached) / args.clips / 1e6, 2)
        print(f"data ready in {time.perf_counter() - started:.0f} s; MB per sample: {sizes}", flush=True)
        for workers in args.workers:
            for source, shards in raw.items():
                row = {"source": source, **measure(shards, False, workers, args.samples, args.warmup)}
                print(row, flush=True)
                results.append(row)
            row = {"source": "cached", **measure(cached, True, workers, args.samples, args.warmup)}
            print(row, flush=True)
            results.append(row)

    need = gpu_need()
    report = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "load_average": {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]},
                    "python": platform.python_version(),
                    "torch": torch.__version__, "pyav": av.__version__, "ffmpeg": ".".join(map(str, av.library_versions["libavcodec"]))},
        "settings": {"num_frames": 81, "fps": 16, "bucket": [480, 832], "batch_size": 1, "random_crop": True,
                     "reference_augmentation": True, "decode_threads": 1, "clip_seconds": SECONDS,
                     "sources": {k: f"{v[1]}x{v[0]} @ {v[2]} fps, libx264 crf 23" for k, v in SOURCES.items() if k in args.sources}},
        "mb_per_sample": sizes,
        "results": results,
        "gpu_need": need,
    }
    best = {}
    for row in results:
        key = row["source"]
        per_core = row["samples_per_s"] / max(1, row["workers"]) if row["workers"] else row["samples_per_s"]
        best[key] = max(best.get(key, 0), round(per_core, 3))
    report["samples_per_s_per_cpu_core_best"] = best
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"mb_per_sample": sizes, "per_core": best, "gpu_need": need}, indent=2))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
