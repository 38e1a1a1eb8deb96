"""A training step of a 1.3B-shaped BindWeave under each strategy preset, and LoRA against full
fine-tuning: loss, step time and memory on one GPU.

Every case builds the model as ``bindweave fit`` does (``BindWeaveCLI`` with ``run=False``,
layering ``configs/bindweave-wan2.1-i2v-14b.yaml`` + ``configs/dit/wan2.1-i2v-1.3b.yaml`` + the
case's preset) and runs ``Trainer.fit`` for ``--steps`` steps on one fixed batch. The encoders are
never built: the model trains from a synthetic feature cache written here (``model.feature_cache``
+ ``MemoryCacheDataModule``, the project's cached path) at the release's context widths: 512
umt5-xxl tokens of 4096, 256 Qwen2.5-VL-7B tokens of 3584 (through the connector), 257 CLIP ViT-H
tokens of 1280 per reference, 16-channel VAE latents.

Cases (each in its own process, so memory and DeepSpeed's global state start clean):

* ``fsdp2``: ``configs/strategy/fsdp2.yaml`` (ModelParallelStrategy, bf16-true, FSDP2 bf16 compute);
* ``full-ft``: one device, no strategy (bf16-true as the base config);
* ``lora``: the same with ``model.lora`` (rank ``--lora-rank`` on the DiT's attention and FFN);
* ``deepspeed-zero2`` / ``deepspeed-zero3``: ``configs/strategy/deepspeed-zero*.yaml`` (bf16-mixed);
* ``ddp`` (not run by default): ``configs/strategy/ddp.yaml``.

Activation checkpointing is ``full`` in every case (the presets set it; added for the others), so
the cases differ in the strategy alone. The optimizer is the config's ``torch.optim.AdamW`` in all
cases (DeepSpeed wraps it: no FusedAdam build, ``DS_BUILD_OPS=0``); memory includes its state.

The DiT's weights are drawn here, after it is built, from one seeded generator whatever the
strategy builds on (CPU for FSDP2, the GPU otherwise, partitioned under ZeRO-3): every case starts
from the same weights, and the head is not zero (Wan's init zeroes it, which would make the first
loss the same for any model). Noise, timesteps and condition dropout come from ``StepSeed``, so
the first-step losses must agree up to bf16 rounding (FSDP2 and one device keep bf16 weights;
DeepSpeed's bf16 keeps fp32 masters).

Per case: the loss of each step, the median step time after the first two (CUDA-synchronised),
``torch.cuda.max_memory_allocated`` (peak) and the memory held after the last step (weights,
gradients, optimizer state), trainable parameters. A case that fails or runs past ``--case-timeout``
records its error in one line; the others still run. Each case's full output goes to
``<out>-logs/<case>.log``.

    python benchmarks/strategies.py --out benchmarks/results/strategies-<card>.json   # one GPU, < 8 min
    python benchmarks/strategies.py --smoke --out /tmp/strategies.json                 # CPU, tiny DiT, < 60 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ["configs/bindweave-wan2.1-i2v-14b.yaml", "configs/dit/wan2.1-i2v-1.3b.yaml"]
AC = ["--model.parallelism.activation_checkpointing", "full"]
CASES = {
    "fsdp2": dict(configs=["configs/strategy/fsdp2.yaml"], args=[]),
    "full-ft": dict(configs=[], args=AC),
    "lora": dict(configs=[], args=AC, lora=True),
    "deepspeed-zero2": dict(configs=["configs/strategy/deepspeed-zero2.yaml"], args=[], deepspeed=True),
    "deepspeed-zero3": dict(configs=["configs/strategy/deepspeed-zero3.yaml"], args=[], deepspeed=True),
    "ddp": dict(configs=["configs/strategy/ddp.yaml"], args=AC),
}
DEFAULT_CASES = ["fsdp2", "full-ft", "lora", "deepspeed-zero2", "deepspeed-zero3"]  # reliable ones first
REFERENCE = "fsdp2"
CPU_DEEPSPEED = ("Lightning's DeepSpeedStrategy runs on CUDA only (RuntimeError: 'The DeepSpeed strategy is only "
                 "supported on CUDA GPUs but `CPUAccelerator` is used')")
TAG = "[strategies]"

# The release's context: (tokens, width) per cached feature; the smoke's are small.
WIDTHS = dict(t5=(512, 4096), mllm=(256, 3584), clip=(257, 1280), null_mllm=20)
SMOKE_WIDTHS = dict(t5=(16, 32), mllm=(8, 48), clip=(5, 32), null_mllm=4)
SMOKE_DIT = ["--model.dit.init_args.dim", "32", "--model.dit.init_args.ffn_dim", "64", "--model.dit.init_args.num_heads", "2",
             "--model.dit.init_args.num_layers", "2", "--model.dit.init_args.freq_dim", "32",
             "--model.dit.init_args.branches", "[{name: text, context_dim: 32, embedder: mlp}, "
             "{name: image, context_dim: 32, embedder: norm_mlp}]"]


def say(message: str) -> None:
    print(f"{TAG} {message}", flush=True)


# -- the synthetic feature cache ----------------------------------------------------------------


def write_cache(folder: Path, frames: int, height: int, width: int, references: int, widths: dict, samples: int = 1) -> Path:
    """A feature cache (``bindweave data cache``'s layout) of ``samples`` random samples with the
    Wan VAE's latent sizes and the encoders' widths; the cache's manifest, conditioner state and
    one shard, read by ``model.feature_cache`` and ``MemoryCacheDataModule``."""
    import torch
    from safetensors.torch import save_file

    from bindweave.data.feature_cache import FORMAT, MANIFEST, STATE, features_to_bytes
    from bindweave.data.shards import FEATURES, AtomicShard

    folder.mkdir(parents=True, exist_ok=True)
    z, temporal, spatial = 16, 4, 8
    latent = (z, 1 + (frames - 1) // temporal, height // spatial, width // spatial)  # (z, T, h, w)
    (t5_len, t5_dim), (mllm_len, mllm_dim), (clip_len, clip_dim) = widths["t5"], widths["mllm"], widths["clip"]
    g = torch.Generator().manual_seed(0)
    state = {"relational.width": torch.tensor(t5_dim), "relational.mllm_width": torch.tensor(mllm_dim),
             "relational.null.t5_tokens": torch.randn(1, t5_len, t5_dim, generator=g),
             "relational.null.t5_mask": torch.arange(t5_len)[None] < 1,
             "relational.null.mllm_tokens": torch.randn(1, widths["null_mllm"], mllm_dim, generator=g),
             "relational.null.mllm_mask": torch.ones(1, widths["null_mllm"], dtype=torch.bool),
             "identity.width": torch.tensor(clip_dim)}
    save_file(state, str(folder / STATE))
    manifest = {"format": FORMAT, "vae": dict(latent_channels=z, temporal_compression=temporal, spatial_compression=spatial),
                "features": {"relational": ["mllm_mask", "mllm_tokens", "t5_mask", "t5_tokens"], "identity": ["tokens"],
                             "multi_reference": ["latents"]},
                "data": {"num_frames": frames, "synthetic": True}, "model": None}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    with AtomicShard(folder / "shard-000000.tar", overwrite=True) as shard:
        for i in range(samples):
            features = {
                "relational": {"t5_tokens": torch.randn(t5_len, t5_dim, generator=g) * 0.2,
                               "t5_mask": torch.arange(t5_len) < max(1, t5_len // 4),  # a prompt of 1/4 the length
                               "mllm_tokens": torch.randn(mllm_len, mllm_dim, generator=g),
                               "mllm_mask": torch.ones(mllm_len, dtype=torch.bool)},
                "identity": {"tokens": torch.randn(references, clip_len, clip_dim, generator=g)},
                "multi_reference": {"latents": torch.randn(z, references, *latent[2:], generator=g)},
            }
            record = {"id": f"synthetic-{i}", "prompt": "a synthetic subject walks", "num_references": references,
                      "num_frames": frames, "clip_fps": 16, "height": height, "width": width}
            shard.write(f"sample{i:06d}", {"json": json.dumps(record).encode(),
                                           FEATURES: features_to_bytes(torch.randn(latent, generator=g), features)})
    return folder


# -- one case, in its own process ---------------------------------------------------------------


def seeded_weights(factory, seed: int):
    """``factory`` whose DiT then gets weights drawn from ``seed`` (each weight from its own name's
    stream, on the GPU when there is one, whatever device and dtype the strategy built it on):
    matrices uniform with Xavier's bound, vectors kept as built (zeros and ones). Under ZeRO-3 each
    weight is gathered for the write."""

    def build():
        import torch

        dit = factory()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.no_grad():
            for name, param in sorted(dit.named_parameters()):
                shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions on build
                if len(shape) < 2:
                    continue
                fan_out, fan_in = shape[0], math.prod(shape[1:])
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                g = torch.Generator(device).manual_seed(seed + zlib.crc32(name.encode()))
                values = torch.empty(shape, device=device).uniform_(-bound, bound, generator=g)
                with _gathered(param):
                    param.copy_(values.to(param.device, param.dtype))
        return dit

    return build


def _gathered(param):
    from contextlib import nullcontext

    if not hasattr(param, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def cli_args(case: str, cache: Path, opts: argparse.Namespace, root_dir: Path) -> list[str]:
    spec = CASES[case]
    args = []
    for path in BASE + spec["configs"]:
        args += ["-c", str(ROOT / path)]
    data = cache / "data.yaml"
    data.write_text(
        "data:\n  class_path: bindweave.data.memory.MemoryCacheDataModule\n  init_args:\n"
        f"    urls: {cache}/shard-*.tar\n    batch_size: {opts.batch_size}\n    device: auto\n    max_references: 4\n"
    )
    args += ["-c", str(data), "--model.feature_cache", str(cache), *spec["args"],
             "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.max_steps", str(opts.steps),
             "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
             "--trainer.enable_checkpointing", "false",
             "--trainer.default_root_dir", str(root_dir),
             "--trainer.callbacks", "[{class_path: callbacks.StepSeed}]"]  # no checkpoint of GBs, no video writer
    if spec.get("lora"):
        args += ["--model.lora", f"{{rank: {opts.lora_rank}}}"]
    if opts.smoke:
        args += ["--trainer.accelerator", "cpu", *SMOKE_DIT]
    return args


def run_case(case: str, opts: argparse.Namespace) -> dict:
    """Build ``case`` through the CLI, fit ``opts.steps`` steps, return its measurements."""
    import lightning as L
    import torch

    from bindweave.cli.app import BindWeaveArgumentParser, BindWeaveCLI
    from bindweave.training.module import BindWeave

    cuda = torch.cuda.is_available() and not opts.smoke
    started = time.perf_counter()
    cli = BindWeaveCLI(BindWeave, L.LightningDataModule, subclass_mode_data=True, run=False, save_config_callback=None,
                       parser_class=BindWeaveArgumentParser,
                       args=cli_args(case, Path(opts.cache), opts, Path(opts.cache) / f"run-{case}"))
    cli.model.dit_factory = seeded_weights(cli.model.dit_factory, opts.seed)
    probe = Probe(cuda)
    cli.trainer.callbacks.append(probe)
    say(f"{case}: built the CLI in {time.perf_counter() - started:.1f} s; strategy "
        f"{type(cli.trainer.strategy).__name__}, precision {cli.trainer.precision}; fitting {opts.steps} steps")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if cuda:
        torch.cuda.synchronize()
    times = probe.times[2:] if len(probe.times) > 2 else probe.times
    out = dict(
        strategy=type(cli.trainer.strategy).__name__, precision=str(cli.trainer.precision),
        activation_checkpointing=cli.model.parallelism.activation_checkpointing,
        lora_rank=cli.model.lora.rank if cli.model.lora is not None else None,
        losses=probe.losses, step_s=probe.times, median_step_s=statistics.median(times) if times else None,
        setup_s=probe.first_start - started if probe.first_start else None,
        parameters=probe.parameters, trainable_parameters=probe.trainable, tokens=probe.tokens,
        wall_s=time.perf_counter() - started,
    )
    if opts.save_checkpoint:  # the strategy's checkpoint path (the model's on_save_checkpoint included)
        t = time.perf_counter()
        try:
            cli.trainer.save_checkpoint(Path(opts.cache) / f"run-{case}" / "last.ckpt")
            out["checkpoint_s"] = time.perf_counter() - t
        except Exception as error:  # noqa: BLE001  (the step numbers stand)
            out["checkpoint_error"] = one_line(error)
        say(f"{case}: checkpoint {out.get('checkpoint_error') or f'saved in {time.perf_counter() - t:.1f} s'}")
    if cuda:
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                   held_after_steps_gib=probe.held / 2**30, held_at_train_start_gib=probe.held_at_start / 2**30,
                   device=torch.cuda.get_device_name())
    else:
        out["device"] = "cpu"
    return out


def _numel(param) -> int:
    return int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3: the whole weight, not this rank's part


def _make_probe():
    import lightning as L
    import torch

    class _Probe(L.Callback):
        """Per-step wall time (CUDA-synchronised), loss, parameter counts and memory."""

        def __init__(self, cuda: bool) -> None:
            self.cuda, self.times, self.losses = cuda, [], []
            self.first_start = self._start = None
            self.parameters = self.trainable = self.tokens = None
            self.held = self.held_at_start = 0

        def _sync(self) -> None:
            if self.cuda:
                torch.cuda.synchronize()

        def on_train_start(self, trainer, pl_module) -> None:
            params = list(pl_module.parameters())
            self.parameters = sum(_numel(p) for p in params)
            self.trainable = sum(_numel(p) for p in params if p.requires_grad)
            self._sync()
            self.held_at_start = torch.cuda.memory_allocated() if self.cuda else 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.tokens is None:
                latents = batch["video_latents"]  # (B, z, T, h, w)
                patch = pl_module.dit.patch_size
                video = latents[0, 0].numel() // math.prod(patch)
                slots = max(batch["num_references"]) * latents[0, 0, 0].numel() // math.prod(patch[1:])
                self.tokens = dict(video=video, slots=slots, batch=latents.shape[0])
            self._sync()
            self._start = time.perf_counter()
            self.first_start = self.first_start or self._start

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))  # syncs
            self._sync()
            self.times.append(time.perf_counter() - self._start)
            self.held = torch.cuda.memory_allocated() if self.cuda else 0
            say(f"step {len(self.times)}: loss {self.losses[-1]:.6f}, {self.times[-1]:.3f} s")

    return _Probe


def Probe(cuda: bool):  # noqa: N802 (the class needs lightning, imported in the case's process only)
    return _make_probe()(cuda)


def child(opts: argparse.Namespace) -> None:
    """``--child CASE``: run one case and write its result (or its error, in one line) to ``--result``."""
    result: dict
    try:
        if CASES[opts.child].get("deepspeed"):
            import deepspeed  # noqa: F401  (its import errors name the missing dependency)
        result = run_case(opts.child, opts)
    except BaseException as error:  # noqa: BLE001  (recorded; the parent goes on)
        import traceback

        traceback.print_exc()
        result = dict(error=one_line(error))
    Path(opts.result).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (DeepSpeed's and NCCL's atexit hooks can hang a one-GPU process)


def one_line(error: BaseException) -> str:
    """The error's type and its message on one line (the project's ``errors.one_line``), at most 500 characters."""
    from bindweave.errors import one_line as folded  # here: importing bindweave imports torch, the parent needs none

    return f"{type(error).__name__}: {folded(error)}"[:500]


# -- the parent: cases one after another ----------------------------------------------------------


def run_in_process(case: str, opts: argparse.Namespace, cache: Path, log: Path, timeout: float) -> dict:
    result = cache / f"result-{case}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", case, "--cache", str(cache), "--result", str(result),
               "--steps", str(opts.steps), "--batch-size", str(opts.batch_size), "--lora-rank", str(opts.lora_rank),
               "--seed", str(opts.seed)] + (["--smoke"] if opts.smoke else []) + (["--save-checkpoint"] if opts.save_checkpoint else [])
    env = dict(os.environ, DS_BUILD_OPS="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if opts.smoke:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tail: list[str] = []
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   start_new_session=True, cwd=str(ROOT))

        def pump():
            for line in process.stdout:
                sink.write(line)
                sink.flush()
                tail[:] = (tail + [line.rstrip()])[-5:]
                if line.startswith(TAG):
                    print(f"{TAG} {case}: {line[len(TAG):].strip()}" if "step" in line[:30] else line.rstrip(), flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            reader.join(5)
            return dict(error=f"timed out after {timeout:.0f} s (the case's time guard); log: {log.name}",
                        wall_s=time.perf_counter() - started)
        reader.join(10)
    if result.is_file():
        return json.loads(result.read_text())
    last = next((line for line in reversed(tail) if line.strip()), "")
    return dict(error=f"the process ended with status {process.returncode} and no result: {last[:300]}",
                wall_s=time.perf_counter() - started)


def run(opts: argparse.Namespace) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not opts.smoke
    widths = SMOKE_WIDTHS if opts.smoke else WIDTHS
    results = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                   smoke=opts.smoke, frames=opts.frames, height=opts.height, width=opts.width,
                   references=opts.references, batch_size=opts.batch_size, steps=opts.steps, seed=opts.seed,
                   configs=BASE, widths=widths, cases={})
    try:
        import lightning

        results["lightning"] = lightning.__version__
        import deepspeed  # noqa: F401

        results["deepspeed"] = deepspeed.__version__
    except Exception as error:  # noqa: BLE001
        results.setdefault("deepspeed_import_error", one_line(error))
    started = time.perf_counter()
    logs = Path(opts.out).with_suffix("").parent / (Path(opts.out).stem + "-logs") if opts.out else None
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_cache(Path(tmp) / "cache", opts.frames, opts.height, opts.width, opts.references, widths)
        say(f"synthetic feature cache: {opts.frames} frames of {opts.height}x{opts.width}, {opts.references} references, "
            f"in {time.perf_counter() - started:.1f} s")
        for case in opts.cases:
            left = opts.budget - (time.perf_counter() - started)
            reason = "deepspeed_import_error" in results and CASES[case].get("deepspeed") and results["deepspeed_import_error"]
            if reason:
                record = dict(skipped=f"DeepSpeed does not import: {reason}")
            elif opts.smoke and CASES[case].get("deepspeed"):
                record = dict(skipped=CPU_DEEPSPEED)
            elif left < 20:
                record = dict(skipped=f"the run's time budget ({opts.budget:.0f} s) is spent")
            else:
                say(f"{case}: starting ({left:.0f} s of the budget left)")
                log = (logs or Path(tmp) / "logs") / f"{case}.log"
                record = run_in_process(case, opts, cache, log, min(opts.case_timeout, left))
            results["cases"][case] = record
            say(f"{case}: {summary(record)}")
    compare(results)
    return results


def summary(record: dict) -> str:
    if "error" in record or "skipped" in record:
        return f"FAILED: {record['error']}" if "error" in record else f"skipped: {record['skipped']}"
    memory = f", peak {record['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in record else ""
    return f"loss at step 1 {record['losses'][0]:.6f}, median step {record['median_step_s']:.3f} s{memory}"


def compare(results: dict) -> None:
    """Each case's first-step loss against the reference case's (``loss1_diff_vs_<ref>``)."""
    cases = results["cases"]
    reference = next((c for c in (REFERENCE, "full-ft") if cases.get(c, {}).get("losses")), None)
    results["loss_reference"] = reference
    if reference is None:
        return
    first = cases[reference]["losses"][0]
    diffs = {}
    for name, record in cases.items():
        if record.get("losses"):
            record["loss1_abs_diff"] = abs(record["losses"][0] - first)
            diffs[name] = record["loss1_abs_diff"]
    results["max_loss1_abs_diff"] = max(diffs.values())


def table(results: dict) -> str:
    ref = results.get("loss_reference") or REFERENCE
    lines = [f"{results['device']}, torch {results['torch']}, {results['frames']} frames of {results['height']}x"
             f"{results['width']}, {results['references']} reference(s), batch {results['batch_size']}, "
             f"{results['steps']} steps; AC full everywhere", "",
             f"| case | strategy | precision | trainable params | loss step 1 | vs {ref} | median step s | peak GiB | held GiB | note |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results["cases"].items():
        if "losses" not in r:
            note = r.get("error") or r.get("skipped", "")
            lines.append(f"| {name} | | | | | | | | | {note[:200]} |")
            continue

        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else ""

        lines.append(f"| {name} | {r['strategy']} | {r['precision']} | {r['trainable_parameters']:,} | "
                     f"{r['losses'][0]:.6f} | {f('loss1_abs_diff', '.2e')} | {f('median_step_s', '.3f')} | "
                     f"{f('peak_allocated_gib', '.1f')} | {f('held_after_steps_gib', '.1f')} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="results JSON (per-case logs go to <out>-logs/)")
    parser.add_argument("--cases", nargs="+", default=None, choices=list(CASES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--references", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-timeout", type=float, default=150.0, help="seconds per case")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all cases; later ones are skipped")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny DiT and widths, 3 steps, LoRA rank 2; "
                        "DeepSpeed cases are skipped (Lightning runs them on CUDA only)")
    parser.add_argument("--save-checkpoint", action="store_true",
                        help="after the steps, save a checkpoint through the strategy (timed, errors recorded; ~14 bytes "
                             "per DiT weight under DeepSpeed: use --case-timeout 300)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        child(opts)
        return
    if opts.smoke:
        opts.frames, opts.height, opts.width, opts.references = 5, 32, 32, 2
        opts.steps, opts.lora_rank = min(opts.steps, 3), 2
        opts.cases = opts.cases or ["full-ft", "lora", "fsdp2", "deepspeed-zero2", "deepspeed-zero3"]
    opts.cases = opts.cases or DEFAULT_CASES
    results = run(opts)
    print()
    print(table(results), flush=True)
    if opts.out:
        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
