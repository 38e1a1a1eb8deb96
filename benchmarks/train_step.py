"""Training steps/s of the sprites model (configs/sprites.yaml) and where a step's time goes.

Small models are easily bound by the host rather than the GPU. This measures, on one device, for
the full model and the no-reference ablation, batch 32 from the real feature cache of sprites
samples (generated and cached here, so nothing is downloaded):

* ``eager``: ``flow_loss`` + backward + gradient clipping + AdamW, a plain loop, bf16 autocast;
* ``compiled``: the same with every DiT block compiled (``apply_compile``, as
  ``parallelism.compile: true`` does);
* ``lightning``: ``Trainer.fit`` on :class:`~bindweave.data.memory.MemoryCacheDataModule` as the
  recipe runs it (logging, progress bar, gradient clipping, ``precision: bf16-mixed``), wall time
  per step after the first 10;
* ``profile``: ``torch.profiler`` over eager steps: host time vs GPU-busy time per step and the
  top kernels, so "host-bound" is a number.

The hardware limit is the model's FLOPs per step (``benchmarks/dit.py``'s formula) against the
dense bf16 GEMM peak of the card, measured in the same run.

    python benchmarks/train_step.py --out benchmarks/results/train-step-<card>.json    # GPU, ~3 min
    python benchmarks/train_step.py --smoke                                            # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.dit import forward_flops, gemm_peak, sync  # noqa: E402

VARIANTS = {"full": [], "noref": ["configs/sprites/noref.yaml"]}


def make_cache(folder: Path, samples: int, device: str) -> Path:
    """Sprites training samples and their feature cache (the recipe's commands, in-process)."""
    from bindweave.cli.data import main as data

    data(["sprites", "--out", str(folder / "raw"), "--split", "train", "--num-samples", str(samples), "--seed", "0"])
    data(["cache", "-c", str(ROOT / "configs/sprites.yaml"), "--urls", str(folder / "raw" / "shard-*.tar"),
          "--output", str(folder / "cache"), "--device", device, "--dtype", "bfloat16", "--no_progress"])
    return folder / "cache"


def build(variant: str, cache: Path, extra: list[str]):
    """The variant's model and in-memory datamodule as ``bindweave fit`` builds them."""
    import lightning as L

    from bindweave.cli.app import BindWeaveCLI
    from bindweave.training.module import BindWeave

    configs = ["-c", str(ROOT / "configs/sprites.yaml")]
    for path in VARIANTS[variant] + ["configs/sprites/in-memory.yaml"]:
        configs += ["-c", str(ROOT / path)]
    args = [*configs, "--model.feature_cache", str(cache), "--data.init_args.urls", str(cache / "shard-*.tar"),
            "--data.init_args.val_urls", "null", *extra]
    saved, sys.argv = sys.argv, ["bindweave"]
    try:
        cli = BindWeaveCLI(BindWeave, L.LightningDataModule, subclass_mode_data=True, run=False,
                           save_config_callback=None, args=args)
    finally:
        sys.argv = saved
    return cli


def batches(cli, device: torch.device, count: int) -> list[dict]:
    from bindweave.model.batch import to_model_batch
    from lightning.pytorch.utilities import move_data_to_device

    cli.datamodule.device = "cpu"
    cli.datamodule.setup("fit")
    iterator = iter(cli.datamodule.train_dataloader())
    return [to_model_batch(move_data_to_device(next(iterator), device)) for _ in range(count)]


def step_fn(model, optimizer, data: list[dict], device: torch.device):
    position = [0]

    def step():
        batch = data[position[0] % len(data)]
        position[0] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.flow_loss(batch, model.training_drops(len(batch["prompt"])))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, device: torch.device, warmup: int, iters: int) -> dict:
    t = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    ms = (time.perf_counter() - t) * 1e3 / iters
    return dict(ms_per_step=ms, steps_per_s=1e3 / ms, warmup_s=warm_s, iters=iters)


def profile(step, device: torch.device, iters: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        sync(device)
    wall_ms = (time.perf_counter() - t) * 1e3 / iters
    events = prof.key_averages()
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    gpu_busy_ms = sum(getattr(e, attr) for e in events) / 1e3 / iters
    kernels = sum(e.count for e in events if getattr(e, attr) > 0 and e.device_type.name == "CUDA") / iters
    rows = sorted(events, key=lambda e: getattr(e, attr) if device.type == "cuda" else e.self_cpu_time_total, reverse=True)
    table = [dict(name=e.key[:80], count=e.count // iters, self_ms=round((getattr(e, attr) if device.type == "cuda"
                                                                         else e.self_cpu_time_total) / 1e3 / iters, 3))
             for e in rows[:top]]
    return dict(wall_ms_per_step=wall_ms, gpu_busy_ms_per_step=gpu_busy_ms, kernels_per_step=kernels, top=table)


def lightning_steps_of(cli, steps: int) -> dict:
    import lightning as L

    class Clock(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter())

    clock = Clock()
    precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"  # the CPU's bf16 autocast is slower
    trainer = L.Trainer(accelerator="auto", devices=1, precision=precision, max_steps=steps, gradient_clip_val=1.0,
                        log_every_n_steps=20, limit_val_batches=0, enable_checkpointing=False, logger=False,
                        callbacks=[clock, L.pytorch.callbacks.TQDMProgressBar(refresh_rate=50)])
    trainer.fit(cli.model, datamodule=cli.datamodule)
    skip = min(10, steps // 2)  # warm-up steps left out (the smoke run has few)
    gaps = [b - a for a, b in zip(clock.times[skip:], clock.times[skip + 1:])]
    ms = statistics.mean(gaps) * 1e3
    return dict(ms_per_step=ms, steps_per_s=1e3 / ms, steps=steps)


def run(samples: int = 256, iters: int = 30, lightning_steps: int = 150, variants: list[str] | None = None,
        smoke: bool = False) -> dict:
    """Measure every variant; returns the results dict (what ``--out`` writes)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    extra = []
    if smoke:
        samples, iters, lightning_steps = 8, 1, 4
        extra = ["--data.init_args.batch_size", "2", "--model.dit.init_args.num_layers", "1"]
    results = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, batch_size=2 if smoke else 32, variants={})
    if device.type == "cuda":
        results["gemm_peak"] = gemm_peak(device, smoke=False)
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp), samples, device.type)
        for variant in variants or list(VARIANTS):
            results["variants"][variant] = measure(variant, cache, extra, device, iters, lightning_steps, results,
                                                   warmup=1 if smoke else 3)
            print(f"{variant}: {json.dumps(results['variants'][variant], indent=1)}", flush=True)
    return results


def measure(variant: str, cache: Path, extra: list[str], device: torch.device, iters: int, lightning_steps: int,
            results: dict, warmup: int = 3) -> dict:
    """Eager, compiled (GPU), profiled and Lightning steps of one variant."""
    cli = build(variant, cache, extra)
    model = cli.model
    model.configure_model()
    model.to(device).train()
    data = batches(cli, device, 4)
    b = data[0]
    tokens = b["video_latents"][0, 0].numel() // (model.dit.patch_size[1] * model.dit.patch_size[2])
    slots = b["num_references"] and "multi_reference" in model.conditioners
    tokens += (max(b["num_references"]) * tokens // b["video_latents"].shape[2]) if slots else 0
    with torch.no_grad():
        context = {name: t.tokens.shape[1] for name, t in model.model.encode_conditions(b).context.items()}
    flops = 3 * forward_flops(model.dit, tokens, context, batch=len(b["prompt"]))["total"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    out = dict(parameters=sum(p.numel() for p in model.dit.parameters()), tokens=tokens, context=context,
               train_flops_per_step=flops)
    step = step_fn(model, optimizer, data, device)
    out["eager"] = time_steps(step, device, warmup, iters)
    out["profile"] = profile(step, device, min(iters, 10), top=15)
    if device.type == "cuda":
        from bindweave.parallel.per_block import apply_compile

        apply_compile(model.dit)
        out["compiled"] = time_steps(step, device, 8, iters)
    out["lightning"] = lightning_steps_of(build(variant, cache, extra), lightning_steps)  # a fresh, uncompiled model
    if device.type == "cuda":  # the recipe with parallelism.compile: true
        out["lightning_compiled"] = lightning_steps_of(
            build(variant, cache, extra + ["--model.parallelism.compile", "true"]), lightning_steps)
        peak = results["gemm_peak"]["peak_tflops"] * 1e12
        for key in ("eager", "compiled", "lightning", "lightning_compiled"):
            out[key]["mfu"] = flops / (out[key]["ms_per_step"] / 1e3) / peak
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="sprites samples to generate and cache")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--lightning-steps", type=int, default=150)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny model, few steps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = run(args.samples, args.iters, args.lightning_steps, args.variants, args.smoke)
    print()
    print("| variant | DiT params | tokens | eager ms | compiled ms | Lightning ms | Lightning compiled ms | GPU busy ms (eager) "
          "| kernels/step | MFU eager / compiled / Lightning / Lightning compiled |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, r in results["variants"].items():
        mfu = " / ".join(f"{r[k]['mfu']:.1%}" for k in ("eager", "compiled", "lightning", "lightning_compiled")
                       if "mfu" in r.get(k, {}))
        print(f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['tokens']} | {r['eager']['ms_per_step']:.1f} | "
              f"{r.get('compiled', {}).get('ms_per_step', float('nan')):.1f} | {r['lightning']['ms_per_step']:.1f} | "
              f"{r.get('lightning_compiled', {}).get('ms_per_step', float('nan')):.1f} | "
              f"{r['profile']['gpu_busy_ms_per_step']:.1f} | {r['profile']['kernels_per_step']:.0f} | {mfu} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
