"""Sampling: from a batch of requests to uint8 frames, with diffusers' flow schedulers.

``sample_videos(model, batch, config)`` (a :class:`~bindweave.model.bindweave_model.BindWeaveModel`) runs three stages:

1. **Conditions.** Every conditioner's frozen encoders run once per request; guided conditioners
   turn the same features into their null condition (CFG's unconditional side). Both sides are
   stacked along the batch and projected by the DiT's context embedders once per video.
2. **Denoising.** One DiT call per step gives the conditional and unconditional velocities (the
   latent is duplicated); ``v = v_u + g·(v_c − v_u)``; the scheduler moves the latent to the next σ.
   Samplers are diffusers' ``FlowMatchEulerDiscreteScheduler`` (``euler``) and
   ``UniPCMultistepScheduler`` in its flow mode (``unipc``, what Wan2.1 ships), both with Wan's
   timestep shift ``σ' = sσ / (1 + (s − 1)σ)``.
3. **Decoding.** The VAE decodes the video latent, optionally tiled or one video at a time.

Noise is drawn per request from its own seed, so a request's video does not depend on what it was
batched with. Memory options change peak memory, not the video: ``offload_encoders`` gives identical
frames, ``vae_slicing`` frames within 1/255 (a batch of one convolves with other rounding),
``vae_tiling`` blends overlapping tiles, so pixels near tile seams differ slightly.

Progress: ``progress=True`` shows a tqdm bar over the steps; code that runs sampling indirectly (a
Lightning callback around ``predict``) hears every step through :func:`listen_to_steps`.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Literal

import numpy as np
import torch
from torch import nn
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from bindweave.data.reference_canvas import ReferenceCanvas
from bindweave.model.attention import AttentionBackend, attention_backend
from bindweave.model.flow import NUM_TRAIN_TIMESTEPS
from bindweave.model.bindweave_model import BindWeaveModel
from bindweave.inference.dit_offload import DiTOffloadConfig, apply_dit_offload, offloaded_run_blocks
from bindweave.inference.fp8 import apply_fp8
from bindweave.inference.step_cache import FirstBlockCache, StepCacheConfig
from conditioners.base import merge, stack_batches
from encoders.base import FrozenEncoder, VideoAutoencoder, pretrained_encoders


SAMPLERS = ("euler", "unipc")


@dataclass
class SamplingConfig:
    """Settings of ``predict`` and of :class:`bindweave.inference.pipeline.BindWeavePipeline`.

    Args:
        num_steps: denoising steps.
        guidance_scale: classifier-free guidance scale (1.0 switches the unconditional pass off).
        shift: timestep shift of the sampling schedule (Wan: 5.0 for T2V, 3.0 for 480p I2V).
        num_frames: frames generated when a request does not say (1 + 4k).
        height: video height when a request does not say.
        width: video width when a request does not say.
        sampler: ``euler`` (flow Euler, first order) or ``unipc`` (flow UniPC, 2nd-order multistep,
            Wan2.1's default; as good in about half the steps).
        offload_encoders: keep the frozen encoders (MLLM, T5, CLIP, VAE) on the CPU and move each
            to the DiT's device only while it runs: the GPU holds the DiT alone while denoising.
        vae_tiling: decode in overlapping spatial tiles (diffusers' ``AutoencoderKLWan`` tiling;
            blends tile seams, so pixels differ slightly from untiled decoding).
        vae_slicing: decode the videos of a batch one at a time (equal up to 1/255 rounding).
        sigma_grid: the ``unipc`` σ grid: ``diffusers`` (the installed diffusers' flow grid, σ from
            1 to 1/1000 before the shift) or ``diffusers_0.33`` (diffusers 0.33.1's, σ from 0.999 to
            0.999/n before the shift, integer timesteps truncated: what the released BindWeave's
            inference ran with; 50 steps: 999, 992, 985, ... instead of 999, 993, 986, ...).
        reference_canvas: how predict and the pipeline fit reference images into the video size:
            None is the paper's (:func:`bindweave.model.batch.fit_reference`: bicubic, enlarging
            allowed, white canvas); a :class:`~bindweave.data.reference_canvas.ReferenceCanvas` is the
            released BindWeave's (LANCZOS, no enlarging, black canvas, letterbox mask).
        parallel: with several processes (torch.distributed initialised, every rank given the same
            requests), how DiT calls are split over the default group: ``cfg`` runs the
            conditional and unconditional halves on different ranks, ``sequence`` splits the video
            tokens (Ulysses); ``none`` runs everything on every rank.
        step_cache: skip most of a DiT call when its first block changed little since the last full
            step (:mod:`bindweave.inference.step_cache`; e.g. ``{kind: first_block, threshold: 0.05}``).
        dit_offload: keep the DiT's blocks in CPU memory, copied to the GPU a group at a time
            (:mod:`bindweave.inference.dit_offload`; e.g. ``{group_size: 1, use_stream: true}``).
        fp8: the DiT blocks' linear layers in FP8 (torchao, row-wise dynamic; :mod:`bindweave.inference.fp8`);
            where that cannot run (CPU, pre-Ada GPU, no torchao) one line says so and bf16 runs.
        attention: the DiT's attention while denoising: ``sdpa`` or ``fp8`` (Q·Kᵀ and P·V on FP8
            tensor cores, a Triton kernel: :mod:`bindweave.model.fp8_attention`); where ``fp8``
            cannot run (CPU, pre-Ada GPU, no triton) one line says so and SDPA runs.
    """

    num_steps: int = 50
    guidance_scale: float = 5.0
    shift: float = 5.0
    num_frames: int = 81
    height: int = 480
    width: int = 832
    sampler: Literal["euler", "unipc"] = "euler"
    offload_encoders: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    sigma_grid: Literal["diffusers", "diffusers_0.33"] = "diffusers"
    reference_canvas: ReferenceCanvas | None = None
    parallel: Literal["none", "cfg", "sequence"] = "none"
    step_cache: StepCacheConfig | None = None
    dit_offload: DiTOffloadConfig | None = None
    fp8: bool = False
    attention: AttentionBackend = "sdpa"

    def __post_init__(self) -> None:
        if isinstance(self.step_cache, dict):
            self.step_cache = StepCacheConfig(**self.step_cache)
        if isinstance(self.dit_offload, dict):
            self.dit_offload = DiTOffloadConfig(**self.dit_offload)


def _dit_call(dit, config: SamplingConfig):
    """The DiT call of the sampling loop, split over ranks as ``config.parallel`` asks, its blocks
    run through a fresh step cache (one per video) and the block offload when those are on."""
    group = None
    if config.parallel != "none":
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(f"parallel={config.parallel!r} needs torch.distributed initialised (e.g. under torchrun).")
        group = dist.group.WORLD
    run_blocks = dit.run_blocks
    if config.step_cache is not None:
        cache = FirstBlockCache(config.step_cache, sequence_group=group if config.parallel == "sequence" else None,
                                batch_group=group if config.parallel == "cfg" else None)
        run_blocks = lambda tokens, state: cache.run_blocks(dit, tokens, state)  # noqa: E731
    run_blocks = offloaded_run_blocks(dit, run_blocks)
    staged = dit
    if run_blocks != dit.run_blocks:
        def staged(*args, **kwargs):  # dit.forward with its stage 2 replaced
            state = dit.embed(*args, **kwargs)
            return dit.unembed(run_blocks(state.tokens, state), state)  # (B, C_out, F, H, W)
    if config.parallel == "none":
        return staged

    from bindweave.parallel.sequence import batch_parallel_forward, sequence_parallel_forward

    if config.parallel == "cfg":
        return lambda *args, **kwargs: batch_parallel_forward(staged, group, *args, **kwargs)
    return lambda *args, **kwargs: sequence_parallel_forward(dit, group, *args, run_blocks=run_blocks, **kwargs)


# ----------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------


def make_scheduler(sampler: str, num_steps: int, shift: float, device: torch.device | None = None,
                   sigma_grid: str = "diffusers") -> SchedulerMixin:
    """A fresh diffusers flow scheduler over ``num_steps`` steps with Wan's ``shift``.

    ``euler``: σ on ``linspace(1, 0, num_steps + 1)`` shifted, the DiT at t = 1000σ; exactly
    :func:`bindweave.model.flow.euler_sigmas` and :func:`bindweave.model.flow.euler_step`.
    ``unipc``: diffusers' flow UniPC grid (σ from 1 to 1/1000 before the shift, integer timesteps)
    as in ``WanPipeline`` and Wan2.1's own sampler; ``sigma_grid="diffusers_0.33"`` gives diffusers
    0.33.1's grid instead (σ from 0.999 to 0.999/n before the shift: the released BindWeave's; equal to
    its timesteps and σ in ``tests/fixtures/bindweave_official/scheduler.json``).
    """
    if sigma_grid not in ("diffusers", "diffusers_0.33"):
        raise ValueError(f"Unknown sigma_grid {sigma_grid!r}: use 'diffusers' or 'diffusers_0.33'.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}.")
    if sampler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist(), device=device)
    elif sampler == "unipc":
        scheduler = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=shift, solver_order=2,
        )
        if sigma_grid == "diffusers_0.33":  # 0.33.1: sigmas = 1 - linspace(1, 1/1000, n + 1), flipped, last dropped
            unshifted = np.linspace(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, 0.0, num_steps + 1)[:-1]
            scheduler.set_timesteps(sigmas=unshifted, device=device)
        else:
            scheduler.set_timesteps(num_steps, device=device)
    else:
        raise ValueError(f"Unknown sampler {sampler!r}: use one of {list(SAMPLERS)}.")
    scheduler.set_begin_index(0)  # no timestep lookup (a device sync) in step()
    return scheduler


# ----------------------------------------------------------------------------------------------
# Memory: encoder offloading
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def encoders_on(encoders: list[FrozenEncoder], device: torch.device, offload: bool) -> Iterator[None]:
    """Run the block with ``encoders`` usable on ``device``; with ``offload`` (on a GPU) they take turns.

    Taking turns: a VAE (its ``encode``/``decode`` are not ``forward``, and it is small) is on the
    device for the whole block; every other encoder (MLLM, T5, CLIP) is copied to the device just
    before each of its forward calls and back to the CPU just after, so the GPU holds one of them
    at a time, not all (the paper's Qwen2.5-VL-7B ≈ 16 GB and UMT5-XXL ≈ 11 GB in bf16 would
    otherwise sit there together). Their outputs stay on the device. After the block every
    encoder is on the CPU. Without ``offload``, encoders left on the CPU by an earlier offloaded
    call are brought back."""
    if not offload or device.type == "cpu":
        for encoder in encoders:
            if encoder.device != device:
                encoder.to(device)
        yield
        return
    whole = [e for e in encoders if isinstance(e, VideoAutoencoder)]
    turns = [e for e in encoders if not isinstance(e, VideoAutoencoder)]

    def arrive(module: nn.Module, args) -> None:  # a hook's non-None return would replace the inputs
        module.to(device)

    def leave(module: nn.Module, args, out) -> None:  # ... or the output
        module.to("cpu")

    handles = []
    try:
        for encoder in turns:
            encoder.to("cpu")  # the one copy on the device is the one running
            handles.append(encoder.register_forward_pre_hook(arrive))
            handles.append(encoder.register_forward_hook(leave, always_call=True))
        for encoder in whole:
            encoder.to(device)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for encoder in encoders:
            encoder.to("cpu")


# ----------------------------------------------------------------------------------------------
# Progress: who hears about denoising steps
# ----------------------------------------------------------------------------------------------

StepListener = Callable[[int, int, list[str]], None]
"""``listener(done, total, ids)``: ``done`` steps of ``total`` for the videos of the requests ``ids``."""

_STEP_LISTENERS: ContextVar[tuple[StepListener, ...]] = ContextVar("bindweave_step_listeners", default=())


@contextlib.contextmanager
def listen_to_steps(listener: StepListener) -> Iterator[None]:
    """Within the block, every :func:`sample_videos` call reports to ``listener(done, total, ids)``:
    once with ``done=0`` before the first step, then after each step (host-side, no device sync).
    ``ids`` are the batch's request ids (empty when the batch has none). ``callbacks.PredictProgress``
    uses it to show the steps of ``bindweave predict``, whose ``predict_step`` runs the loop."""
    token = _STEP_LISTENERS.set(_STEP_LISTENERS.get() + (listener,))
    try:
        yield
    finally:
        _STEP_LISTENERS.reset(token)


# ----------------------------------------------------------------------------------------------
# The sampling loop
# ----------------------------------------------------------------------------------------------


def request_size(batch: dict, key: str, default: int) -> int:
    """The batch's common ``key`` (num_frames/height/width), or ``default`` when it does not say."""
    values = batch.get(key)
    if values is None:
        return default
    values = [int(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    if len(set(values)) != 1:
        raise ValueError(f"All requests of a batch must share {key}; got {values}. Use batch_size 1.")
    return values[0]


def initial_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B, *shape) float32 standard normal noise, request i drawn from its own ``seeds[i]``."""
    return torch.stack([
        torch.randn(shape, generator=torch.Generator(device).manual_seed(int(seed)), device=device) for seed in seeds
    ])


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
"""``on_step(i, t, latents)`` after step ``i`` (timestep ``t``) with the (B, z, T, h, w) float32
latents; a tensor it returns replaces them (diffusers' ``callback_on_step_end``)."""


@torch.no_grad()
def sample_videos(
    model: BindWeaveModel, batch: dict, config: SamplingConfig, progress: bool = False, description: str | None = None,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Sample videos for a batch of requests with a built :class:`~bindweave.model.bindweave_model.BindWeaveModel`.

    Returns (B, F, H, W, 3) uint8 frames on the CPU. The only host syncs of the Euler loop are the
    final copy to the CPU (and whatever ``on_step`` does).
    """
    num_frames = request_size(batch, "num_frames", config.num_frames)
    height = request_size(batch, "height", config.height)
    width = request_size(batch, "width", config.width)
    model.check_video(num_frames, height, width)
    model.check_references(batch["references"], height, width)
    model.check_reference_counts([int(n) for n in batch["num_references"]])  # what the conditioners declare
    size = len(batch["prompt"])  # conditioners may read the video size (e.g. a grey video's latents)
    batch = {**batch, "num_frames": [num_frames] * size, "height": [height] * size, "width": [width] * size}
    dit, vae = model.dit, model.vae
    device = dit.patch_embedding.weight.device
    encoders = pretrained_encoders(model)  # frozen or trained: offloaded alike
    guided = config.guidance_scale != 1.0
    if config.fp8:
        apply_fp8(dit)  # once per DiT; a message and bf16 where FP8 cannot run
    if config.dit_offload is not None:
        apply_dit_offload(dit, device, config.dit_offload)  # once per DiT

    # 1. Conditions: every encoder runs once per request, then (with offloading) leaves the GPU.
    with encoders_on(encoders, device, config.offload_encoders):
        features = model.encode_features(batch)
        parts = model.condition_parts(batch, features)
        cond = merge(parts)
        if guided:
            cond = stack_batches(cond, model.null_conditions(batch, features, parts))
    context, context_mask = model.context(cond)
    context = dit.embed_context(context, context_mask)  # once, not per step

    # 2. Denoising: one DiT call per step for both CFG sides.
    latent_shape = (
        vae.latent_channels,
        (num_frames - 1) // vae.temporal_compression + 1,
        height // vae.spatial_compression,
        width // vae.spatial_compression,
    )
    seeds = batch.get("seed") or list(range(len(batch["prompt"])))
    x = initial_noise(seeds, latent_shape, device)  # (B, z, T, h, w) fp32
    scheduler = make_scheduler(config.sampler, config.num_steps, config.shift, device, config.sigma_grid)
    dit_call = _dit_call(dit, config)
    sigmas = scheduler.sigmas.to(device, torch.float32)  # σ of each step (UniPC's timesteps are rounded)
    listeners, total = _STEP_LISTENERS.get(), len(scheduler.timesteps)
    ids = [str(i) for i in batch.get("id") or []] if listeners else []
    for listener in listeners:
        listener(0, total, ids)
    with attention_backend(config.attention):  # the previous backend again after the loop
        for i, t in enumerate(tqdm(scheduler.timesteps, desc=description, disable=not progress, leave=False)):
            velocity = guided_velocity(model, dit_call, x, t, sigmas[i], cond, context, context_mask,
                                       config.guidance_scale if guided else 1.0)  # (B, z, T, h, w) float32
            x = scheduler.step(velocity, t, x, return_dict=False)[0]
            if on_step is not None:
                replaced = on_step(i, t, x)
                x = x if replaced is None else replaced
            for listener in listeners:
                listener(i + 1, total, ids)

    # 3. Decoding.
    with encoders_on([vae], device, config.offload_encoders):
        return decode(vae, x, tiling=config.vae_tiling, slicing=config.vae_slicing)


def guided_velocity(model: BindWeaveModel, dit_call, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor,
                    cond, context: dict, context_mask: dict | None, guidance_scale: float) -> torch.Tensor:
    """One denoising step's velocity (B, z, T, h, w) float32 at x (B, z, T, h, w), DiT timestep ``t``
    and σ: with ``guidance_scale`` != 1, ``cond`` and ``context`` hold the conditional then the
    unconditional side stacked on the batch (one DiT call for both) and ``v = v_u + g·(v_c − v_u)``."""
    guided = guidance_scale != 1.0
    model_x = torch.cat([x, x]) if guided else x  # (2B or B, z, T, h, w)
    dtype = model.dit.patch_embedding.weight.dtype
    dit_in, frame_mask = model.assemble_input(model_x.to(dtype), cond)  # (2B or B, C_in, T+N, h, w)
    timestep = t.to(torch.float32).expand(model_x.shape[0])  # (2B or B,)
    output = dit_call(dit_in, timestep, context, context_mask, frame_mask, context_embedded=True)
    output = model.video_frames(output, x.shape[2], cond)  # (2B or B, z, T, h, w)
    velocity = model.output_velocity(output, model_x, sigma.expand(model_x.shape[0]))  # float32
    if guided:
        conditional, unconditional = velocity.chunk(2)
        velocity = unconditional + guidance_scale * (conditional - unconditional)  # (B, z, T, h, w)
    return velocity


def decode(vae, latents: torch.Tensor, tiling: bool = False, slicing: bool = False) -> torch.Tensor:
    """VAE-decode (B, z, T, h, w) latents to (B, F, H, W, 3) uint8 frames on the CPU.

    ``tiling`` switches diffusers' tiled decoding on for this call; ``slicing`` decodes one video at
    a time and converts it to uint8 before the next (the float video is 4× the uint8 one)."""
    chunks = latents.split(1) if slicing else [latents]
    return torch.cat([_to_uint8(vae.decode(chunk.to(vae.dtype), tiled=tiling)) for chunk in chunks])


def _to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8 on the CPU."""
    frames = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return frames.permute(0, 2, 3, 4, 1).cpu()


# ----------------------------------------------------------------------------------------------
# Predict: a batch of requests, failures isolated
# ----------------------------------------------------------------------------------------------

RECOVERABLE = (ValueError, OSError, torch.OutOfMemoryError)
"""Errors of one request (bad input, unreadable file, too big for the device) that predict reports
and moves past; anything else is a bug and stops the run."""


def select(batch: dict, indices: list[int]) -> dict:
    """The requests ``indices`` of a batch (references trimmed to their largest count)."""
    out = {}
    for key, value in batch.items():
        if key == "failed":
            continue
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == len(batch["prompt"]):
            out[key] = value[indices]
        elif isinstance(value, (list, tuple)) and len(value) == len(batch["prompt"]):
            out[key] = [value[i] for i in indices]
        else:
            out[key] = value
    most = max(int(n) for n in out["num_references"])
    out["references"] = out["references"][:, :most]
    if "reference_masks" in out:
        out["reference_masks"] = out["reference_masks"][:, :most]
    return out


def request_records(batch: dict, config: SamplingConfig, ids: list[str]) -> list[dict]:
    """Per request, what reproduces it: a line of a predict JSONL (see :mod:`bindweave.inference.requests`)."""
    size = len(batch["prompt"])
    seeds = batch.get("seed") or list(range(size))
    records = []
    for i in range(size):
        record = {"id": ids[i], "prompt": batch["prompt"][i]}
        if (batch.get("negative_prompt") or [None] * size)[i] is not None:
            record["negative_prompt"] = batch["negative_prompt"][i]
        if "reference_paths" in batch:
            record["references"] = list(batch["reference_paths"][i])
        record["seed"] = int(seeds[i])
        for key in ("num_frames", "height", "width"):
            values = batch.get(key)
            record[key] = int(values[i]) if values is not None else getattr(config, key)
        record.update(batch.get("request_extra", [{}] * size)[i])  # e.g. precomputed MLLM states' paths
        records.append(record)
    return records


def references_uint8(references: torch.Tensor) -> torch.Tensor:
    """(B, N, 3, H, W) in [-1, 1] -> (B, N, H, W, 3) uint8 on the CPU."""
    return ((references.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).cpu()


def predict_batch(model: BindWeaveModel, batch: dict, batch_idx: int, config: SamplingConfig) -> dict:
    """Generate a batch of requests; a request that fails is reported, the others still run.

    A batch that fails is retried request by request, so one bad request does not take its batch
    mates down. Returns ``video`` (B, F, H, W, 3) uint8 and ``references`` (B, N, H, W, 3) uint8 of
    the requests that succeeded, their ``id``, ``prompt``, ``seed``, ``num_references``,
    ``request`` (the JSONL record that reproduces each), ``warnings`` (what the data side noticed
    about each request's references, e.g. a CMYK image converted; empty lists when the batch has
    no ``warnings``), ``seconds`` per video and the ``sampling`` settings; ``failed`` lists
    ``{"id", "error", "request"}`` of the others (including requests the data side could not load:
    ``batch["failed"]``).
    """
    failed = list(batch.get("failed", []))
    size = len(batch["prompt"])
    ids = [str(i) for i in (batch.get("id") or [f"sample-{batch_idx:05d}-{i}" for i in range(size)])]
    records = request_records(batch, config, ids) if size else []
    done: dict[int, tuple[torch.Tensor, float]] = {}
    pending = [list(range(size))] if size else []
    while pending:
        indices = pending.pop(0)
        part = batch if len(indices) == size else select(batch, indices)
        start = time.perf_counter()
        try:
            frames = sample_videos(model, part, config)
        except RECOVERABLE as error:
            if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(indices) > 1:
                pending = [[i] for i in indices] + pending
                continue
            i = indices[0]
            where = f" ({batch['where'][i]})" if "where" in batch else ""
            failed.append({"id": ids[i], "error": f"request {ids[i]!r}{where}: {error}", "request": records[i]})
            continue
        seconds = (time.perf_counter() - start) / len(indices)
        for j, i in enumerate(indices):
            done[i] = (frames[j], seconds)
    ok = sorted(done)
    notes = batch.get("warnings") or [[] for _ in range(size)]
    num_references = [int(n) for n in batch["num_references"]] if size else []
    references = references_uint8(batch["references"]) if ok else None
    return {
        "video": torch.stack([done[i][0] for i in ok]) if ok else None,
        "references": torch.stack([references[i] for i in ok]) if ok else None,
        "id": [ids[i] for i in ok],
        "prompt": [batch["prompt"][i] for i in ok],
        "seed": [records[i]["seed"] for i in ok],
        "num_references": [num_references[i] for i in ok],
        "request": [records[i] for i in ok],
        "warnings": [list(notes[i]) for i in ok],
        "seconds": [done[i][1] for i in ok],
        "sampling": asdict(config),
        "failed": failed,
    }
