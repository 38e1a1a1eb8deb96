"""The sprites recipe of issue #21 on a GPU: throughput while training, and test-split samples.

    # train (any `bindweave fit` arguments), timing the steps and counting the FLOPs of one:
    python benchmarks/sprites_recipe.py fit --json out/full.json -- -c configs/sprites.yaml
    # sample the requests of a test split with an export or a checkpoint, into one .npz (no PyAV needed):
    python benchmarks/sprites_recipe.py sample --model models/sprites --requests r.jsonl --npz out/full.npz
    # write an .npz's videos as <id>.mp4 for `bindweave eval` (needs PyAV):
    python benchmarks/sprites_recipe.py videos --npz out/full.npz --out outputs/sprites/videos
    # where a step's time goes: the loader's rate, eager vs compiled steps, the top GPU kernels:
    python benchmarks/sprites_recipe.py profile --json out/profile.json -- -c configs/sprites-reader.yaml

``fit`` adds :class:`Throughput`, which reports steps/s and samples/s after a warm-up, the FLOPs of
one training step (forward + backward, ``torch.utils.flop_counter``) and their rate as a fraction of
the card's dense bf16 peak (model FLOPs utilisation, MFU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core peak (FLOP/s) by card name; MFU is measured against it."""


def card_peak() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((peak for key, peak in DENSE_BF16_PEAK.items() if key in name), None)


class Throughput(L.Callback):
    """Steps/s after ``warmup`` steps, the FLOPs of one step, and MFU, into ``path`` (JSON) at the end.

    Args:
        path: the JSON report.
        warmup: steps left out of the timing (compilation, loader start).
        count_at: the step whose batch is run once more under a FLOP counter.
    """

    def __init__(self, path: str, warmup: int = 50, count_at: int = 5) -> None:
        self.path, self.warmup, self.count_at = path, warmup, count_at
        self.flops: int | None = None
        self.start: tuple[int, float] | None = None
        self.fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.count_at and self.flops is None:
            from callbacks.throughput import count_training_flops

            self.flops = count_training_flops(pl_module, batch)  # RNG and gradients left as they were
        if step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = (step, time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        card, peak = card_peak()
        report = {"card": card, "steps": trainer.global_step, "fit_seconds": round(now - self.fit_start, 1),
                  "batch_size": getattr(trainer.datamodule, "batch_size", None), "flops_per_step": self.flops}
        if self.start is not None and trainer.global_step > self.start[0]:
            steps_per_s = (trainer.global_step - self.start[0]) / (now - self.start[1])
            report["steps_per_s"] = round(steps_per_s, 3)
            if report["batch_size"]:
                report["samples_per_s"] = round(steps_per_s * report["batch_size"], 1)
            if self.flops:
                report["tflops_per_s"] = round(self.flops * steps_per_s / 1e12, 2)
                if peak:
                    report["mfu"] = round(self.flops * steps_per_s / peak, 4)
                    report["peak_tflops"] = peak / 1e12
        if trainer.is_global_zero:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps(report, indent=2))
            print(json.dumps(report))


def fit(json_path: str, fit_args: list[str]) -> None:
    from bindweave.cli.app import run_cli

    run_cli(["fit", *fit_args, "--trainer.callbacks+=benchmarks.sprites_recipe.Throughput",
             f"--trainer.callbacks.path={json_path}"])


def _timed_steps(module, batch, steps: int, device: str) -> float:
    """Seconds per optimizer step (forward, backward, AdamW) on one batch, after 3 warm-up steps."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    drops = module.training_drops(len(batch["prompt"]))

    def step() -> None:
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            loss = module.flow_loss(batch, drops)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def profile(json_path: str, fit_args: list[str], steps: int, loader_batches: int, modes: list[str]) -> None:
    """Loader batches/s, then per compile mode the step time, MFU and (last mode) the top kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bindweave.cli.app import BindWeaveArgumentParser, BindWeaveCLI
    from bindweave.training.module import BindWeave

    device = "cuda" if torch.cuda.is_available() else "cpu"
    card, peak = card_peak()
    report: dict = {"card": card, "peak_tflops": peak and peak / 1e12, "modes": {}}

    def build():
        cli = BindWeaveCLI(BindWeave, L.LightningDataModule, subclass_mode_data=True, run=False,
                           parser_class=BindWeaveArgumentParser, args=fit_args)
        return cli.model, cli.datamodule

    module, datamodule = build()
    loader = iter(datamodule.train_dataloader())
    host = next(loader)
    start = time.perf_counter()
    for _ in range(loader_batches):
        next(loader)
    report["loader_batches_per_s"] = round(loader_batches / (time.perf_counter() - start), 2)
    report["batch_size"] = len(host["prompt"])
    print("loader", report["loader_batches_per_s"], "batches/s", flush=True)
    del loader

    def on_device(host_batch: dict) -> dict:
        moved = {k: v.to(device) if torch.is_tensor(v) else
                 ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in host_batch.items()}
        return datamodule.on_after_batch_transfer(moved, 0)

    on_device(host)  # warm-up, then the per-batch cost of the move + on-device rendering alone
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        on_device(host)
    if device == "cuda":
        torch.cuda.synchronize()
    report["transfer_and_render_ms"] = round((time.perf_counter() - start) / 10 * 1e3, 2)
    print("transfer + render", report["transfer_and_render_ms"], "ms a batch", flush=True)

    for mode in modes:
        try:
            module = _profile_mode(build, module if mode == modes[0] else None, on_device, host, mode, steps,
                                   device, peak, report)
        except Exception as error:  # one failing mode (e.g. CUDA graphs) keeps the others' rows
            report["modes"][mode] = {"error": f"{type(error).__name__}: {error}"[:300]}
            print(mode, "failed:", report["modes"][mode]["error"], flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        _timed_steps(module, on_device(host), 3, device)
    report["profiled_wall_ms_per_step"] = round((time.perf_counter() - start) / 6 * 1e3, 1)  # 3 warm-up + 3 steps
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=80)
    print(table)
    report["top_kernels"] = table
    if device == "cuda":
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        report["gpu_kernels_per_step"] = round(len(kernels) / 6)
        report["gpu_busy_ms_per_step"] = round(sum(e.device_time for e in kernels) / 6 / 1e3, 1)  # µs -> ms
        print("kernels a step", report["gpu_kernels_per_step"], "busy ms a step", report["gpu_busy_ms_per_step"],
              "wall ms a step (profiled)", report["profiled_wall_ms_per_step"], flush=True)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=2))


def _profile_mode(build, module, on_device, host: dict, mode: str, steps: int, device: str, peak, report: dict):
    """One compile mode's step time and MFU into ``report['modes'][mode]``; returns the module it ran."""
    from torch.utils.flop_counter import FlopCounterMode

    if module is None:
        module, _ = build()
    module.configure_model()  # builds the factories' parts (the reader): before the move
    module.to(device).train()
    batch = on_device(host)
    counter = FlopCounterMode(display=False)  # before compiling: the counter does not see compiled code
    with counter, torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
        module.flow_loss(batch).backward()
    module.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    if mode != "eager":
        from bindweave.parallel.per_block import apply_compile

        apply_compile(module.dit, mode=None if mode == "default" else mode)
    seconds = _timed_steps(module, batch, steps, device)
    row = {"ms_per_step": round(seconds * 1e3, 2), "steps_per_s": round(1 / seconds, 2),
           "samples_per_s": round(report["batch_size"] / seconds, 1), "tflop_per_step": round(flops / 1e12, 3),
           "tflops_per_s": round(flops / seconds / 1e12, 2)}
    if peak:
        row["mfu"] = round(flops / seconds / peak, 4)
    report["modes"][mode] = row
    print(mode, json.dumps(row), flush=True)
    return module


def sample(model_path: str, requests: str, npz: str, batch_size: int, checkpoint_config: str | None,
           guidance_scale: float | None = None, num_steps: int | None = None, fp8: bool = False,
           attention: str = "sdpa", step_cache: float | None = None, fp8_min_keys: int | None = None,
           dtype: str | None = None) -> None:
    from bindweave.inference.pretrained import load_checkpoint, load_pretrained
    from bindweave.inference.step_cache import StepCacheConfig
    from bindweave.inference.requests import RequestDataset
    from bindweave.model.batch import collate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if fp8 and device == "cuda" and dtype != "bfloat16":  # the FP8 linears refuse another DiT dtype and run it instead
        raise SystemExit("sample: --fp8 needs --dtype bfloat16 (sample the exact video to compare with at --dtype "
                         "bfloat16 too)")
    # On a CPU, float32: an int8 export reads back in its scales' bfloat16, 26 s a video here against 3.6 s (2 cores).
    module = (load_checkpoint(model_path, checkpoint_config) if model_path.endswith(".ckpt")  # a .ckpt is float32
              else load_pretrained(model_path, dtype=dtype or ("float32" if device == "cpu" else None)))
    module.to(device).eval()
    s = module.sampling
    if guidance_scale is not None:
        s.guidance_scale = guidance_scale
    if num_steps is not None:
        s.num_steps = num_steps
    s.fp8, s.attention = fp8, attention  # issue #22's options: their quality on a trained model
    if fp8_min_keys is not None:  # the sprites model's 336 keys are below the library's threshold: judge the kernel anyway
        import bindweave.model.attention as attention_module

        attention_module.FP8_MIN_KEYS = fp8_min_keys
    s.step_cache = None if step_cache is None else StepCacheConfig(threshold=step_cache)
    # The model's own size (a 32 x 32 model samples the 64 x 64 test requests at 32 x 32; eval resizes).
    dataset = RequestDataset(requests, s.num_frames, s.height, s.width, use_request_sizes=False)
    videos, ids = [], []
    full_calls = []  # the last block's calls: a step the cache skipped never reaches it
    module.model.dit.blocks[-1].register_forward_pre_hook(lambda *_: full_calls.append(1))
    start = time.perf_counter()
    for first in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
        batch = collate([{k: v for k, v in item.items() if k != "warnings"} for item in items])
        batch["references"] = batch["references"].to(device)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            videos.append(module.generate(batch).numpy())  # (B, F, H, W, 3) uint8
        ids += list(batch["id"])
    steps = len(videos) * s.num_steps
    print(f"sampled {len(ids)} videos in {time.perf_counter() - start:.1f} s; the DiT's last block ran in {len(full_calls)} "
          f"of {steps} batch steps ({1 - len(full_calls) / steps:.1%} skipped)")
    np.savez_compressed(npz, ids=np.array(ids), videos=np.concatenate(videos))


def write_videos(npz: str, out: str, fps: int) -> None:
    from bindweave.tasks.sprites.scenes import encode_video

    data = np.load(npz)
    Path(out).mkdir(parents=True, exist_ok=True)
    for key, video in zip(data["ids"], data["videos"]):
        (Path(out) / f"{key}.mp4").write_bytes(encode_video(video, fps))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    fit_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit")
    p.add_argument("--json", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--json", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--modes", default="eager,default", help="eager, default, max-autotune-no-cudagraphs, ...")
    p = sub.add_parser("sample")
    p.add_argument("--model", required=True, help="export folder or .ckpt")
    p.add_argument("--config", default=None, help="model config of a .ckpt (default: the one it stores)")
    p.add_argument("--requests", required=True)
    p.add_argument("--npz", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--fp8", action="store_true", help="model.sampling.fp8: the DiT's linears in FP8")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "fp8"], help="model.sampling.attention")
    p.add_argument("--step-cache", type=float, default=None, help="model.sampling.step_cache threshold")
    p.add_argument("--fp8-min-keys", type=int, default=None, help="FP8 attention from this many keys (quality checks)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="the DiT's weights (default: float32 on a CPU, the export's own on a GPU); --fp8 needs bfloat16")
    p = sub.add_parser("videos")
    p.add_argument("--npz", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fps", type=int, default=8)
    args = parser.parse_args(argv)
    if args.command == "fit":
        fit(args.json, fit_args)
    elif args.command == "profile":
        profile(args.json, fit_args, args.steps, args.loader_batches, args.modes.split(","))
    elif args.command == "sample":
        sample(args.model, args.requests, args.npz, args.batch_size, args.config, args.guidance_scale, args.num_steps,
               args.fp8, args.attention, args.step_cache, args.fp8_min_keys, args.dtype)
    else:
        write_videos(args.npz, args.out, args.fps)


if __name__ == "__main__":
    main()
