"""Step cache on a trained model: how many DiT steps it skips, and how far the video moves.

The shipped sprites model (``models/sprites``) on the four demo requests of
``examples/sprites/requests.jsonl``, with its own sampling settings (25 Euler steps, CFG 4, batched),
on the CPU or a GPU: for each threshold, the share of steps that skipped the blocks after the first, and
the PSNR of the frames against the exact video (no cache) of the same request and seed.

Usage:
    python benchmarks/step_cache_quality.py [--thresholds 0.05 0.1 0.2] [--out results/step-cache-sprites-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from bindweave.inference.pipeline import BindWeavePipeline
from bindweave.inference.step_cache import StepCacheConfig

ROOT = Path(__file__).resolve().parents[1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/sprites"))
    parser.add_argument("--requests", default=str(ROOT / "examples/sprites/requests.jsonl"))
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, default=None, help="only the first N requests")
    parser.add_argument("--num_steps", type=int, default=None, help="override the model's steps (a quick check)")
    parser.add_argument("--out", default=None, help="default: results/step-cache-sprites-<device>.json")
    parser.add_argument("--model_size", action="store_true",
                        help="sample at the model's size whatever the requests say (the test split's requests say 64 x 64)")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = BindWeavePipeline.from_pretrained(args.model, device=args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    requests = [json.loads(line) for line in Path(args.requests).read_text().splitlines() if line.strip()][:args.limit]
    if args.num_steps:
        pipe.sampling.num_steps = args.num_steps
    base = Path(args.requests).parent
    full_calls: list[int] = []  # the last block's calls: a step the cache skipped never reaches it
    pipe.model.dit.blocks[-1].register_forward_pre_hook(lambda *_: full_calls.append(1))

    def run(threshold):
        videos, steps, full, seconds = [], 0, 0, 0.0
        for r in requests:
            cache = None if threshold is None else StepCacheConfig(threshold=threshold)
            full_calls.clear()
            start = time.perf_counter()
            sizes = {} if args.model_size else {k: r[k] for k in ("num_frames", "height", "width") if k in r}
            video = pipe(r["prompt"], references=[str(base / p) for p in r["references"]], seed=r.get("seed", 0),
                         step_cache=cache, **sizes)
            seconds += time.perf_counter() - start
            videos.append(torch.as_tensor(video.frames))
            steps += pipe.sampling.num_steps
            full += len(full_calls)
        return videos, dict(steps=steps, full_steps=full, skipped_share=round(1 - full / steps, 3), seconds=round(seconds, 2))

    exact, info = run(None)
    rows = [dict(threshold=None, **info, psnr_db=None)]
    print(rows[-1], flush=True)
    for threshold in args.thresholds:
        videos, info = run(threshold)
        values = [psnr(v, e) for v, e in zip(videos, exact)]  # inf: identical frames
        finite = [v for v in values if math.isfinite(v)]
        rows.append(dict(threshold=threshold, **info, psnr_db=[round(v, 2) if math.isfinite(v) else "identical" for v in values],
                         psnr_db_min=round(min(finite), 2) if finite else "identical"))
        print(rows[-1], flush=True)
    out = {"model": os.path.relpath(args.model, ROOT), "requests": os.path.relpath(args.requests, ROOT),
           "count": len(requests), "model_size": args.model_size, "sampling": {
        "num_steps": pipe.sampling.num_steps, "guidance_scale": pipe.sampling.guidance_scale, "sampler": pipe.sampling.sampler},
        "device": device, "torch": torch.__version__, "rows": rows}
    args.out = args.out or str(ROOT / f"benchmarks/results/step-cache-sprites-{device.replace(' ', '-')}.json")
    Path(args.out).parent.mkdir(exist_ok=True, parents=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
