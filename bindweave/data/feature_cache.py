"""The feature cache: the frozen encoders run once over raw shards; training reads their outputs.

A conditioner whose encoder trains (``model.train_encoders``) is left out: its features change with
every step, so it encodes in the step, from the prompts the cached samples keep (a conditioner that
reads pixels, e.g. a trained CLIP, cannot train from a cache: ``check_encodes_from_cache``).

``bindweave data cache`` decodes every sample of a raw shard as training would (same clip length,
fps and bucket, but deterministic: first frames, centre crop, no reference augmentation), runs the
VAE and every conditioner's ``encode()`` on it, and writes a shard of the same name holding, per
sample, ``<key>.json`` (the record plus the clip's size and reference count) and
``<key>.safetensors``:

* ``video_latents``: (z, T, h, w), the VAE latent of the clip;
* ``<conditioner>.<feature>``: row i of that conditioner's ``encode()`` output, e.g.
  ``relational.t5_tokens`` (L, C), ``relational.mllm_tokens``, ``identity.tokens`` (n, T, D),
  ``multi_reference.latents`` (z, n, h, w).

The cache folder also holds ``cache.json`` (VAE sizes, data settings, feature keys) and
``conditioners.safetensors`` (each conditioner's ``cached_state()``: encoder widths, null-condition
features). A model with ``feature_cache`` set to the folder builds its conditioners from these
without loading any encoder (``build_from_cache``), and ``BindWeave.flow_loss`` reads
``video_latents`` and ``features`` from the batch instead of encoding.

Samples are encoded one at a time, so no feature carries another sample's padding; a batch pads
each feature to its largest sample with zeros (False for masks), as the encoders pad.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import webdataset as wds
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file, save, save_file
from torch import nn

from bindweave.atomic import AtomicPath, write_atomic
from bindweave.errors import UserError
from bindweave.model.batch import collate, to_model_batch
from bindweave.data.shards import FEATURES, AtomicShard, BrokenSample, expand_urls

MANIFEST = "cache.json"
STATE = "conditioners.safetensors"
FORMAT = "bindweave-feature-cache/1"

NO_ENCODERS = (
    "This model was built to train from a feature cache (model.feature_cache), so it has no VAE or encoders: "
    "feed it cached shards (data: cached: true), or set model.feature_cache to null to encode or sample."
)


@dataclass
class LatentSpace:
    """What training from cached latents needs of the VAE that made them; stands in for the VAE.

    Attributes:
        latent_channels: z.
        temporal_compression: frames per latent frame after the first.
        spatial_compression: pixels per latent pixel.
    """

    latent_channels: int
    temporal_compression: int
    spatial_compression: int
    can_encode = False  # a stand-in: no networks (encoders.base.VideoAutoencoder)

    def encode(self, *args, **kwargs):
        raise ValueError(NO_ENCODERS)

    encode_images = decode = encode


# -- per-sample features ----------------------------------------------------------------------


CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Storage dtypes of cached floating-point features (``bindweave data cache --dtype``)."""


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous().clone()


def features_to_bytes(
    video_latents: torch.Tensor, features: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> bytes:
    """One sample's latents (z, T, h, w) and features {conditioner: {name: tensor}} as safetensors;
    floating-point tensors cast to ``dtype`` (None: as computed)."""
    tensors = {"video_latents": _stored(video_latents, dtype)}
    for conditioner, named in features.items():
        for name, tensor in named.items():
            tensors[f"{conditioner}.{name}"] = _stored(tensor, dtype)
    return save(tensors)


def read_features(data: bytes) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Inverse of :func:`features_to_bytes`."""
    tensors = load_tensors(data)
    latents = tensors.pop("video_latents")
    features: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        conditioner, name = key.split(".", 1)
        features.setdefault(conditioner, {})[name] = tensor
    return latents, features


def _pad_to(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(tensor.shape) == shape:
        return tensor
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


def collate_features(samples: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, dict[str, torch.Tensor]]:
    """Stack per-sample features along a new batch dim, zero-padding (False for bool) every dim to
    the largest sample: token sequences and reference counts line up as the encoders pad them."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for conditioner, named in samples[0].items():
        out[conditioner] = {}
        for name in named:
            tensors = [s[conditioner][name] for s in samples]
            shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].ndim)]
            out[conditioner][name] = torch.stack([_pad_to(t, shape) for t in tensors])  # (B, ...)
    return out


def _unbatch(features: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    return {name: tensor[index] for name, tensor in features.items()}


# -- the cache folder -------------------------------------------------------------------------


def load_cache(path: str | Path) -> tuple[dict, LatentSpace, dict[str, dict[str, torch.Tensor]]]:
    """Read a cache folder: its manifest, the VAE sizes and every conditioner's cached state."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise ValueError(
            f"{folder} is not a feature cache (no {MANIFEST}); make one with `bindweave data cache -c <config> "
            f"--urls <raw shards> --output {folder}`."
        )
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST} has format {manifest.get('format')!r}; this version reads {FORMAT!r}.")
    states: dict[str, dict[str, torch.Tensor]] = {}
    if (folder / STATE).is_file():
        for key, tensor in load_file(folder / STATE).items():
            conditioner, name = key.split(".", 1)
            states.setdefault(conditioner, {})[name] = tensor
    return manifest, LatentSpace(**manifest["vae"]), states


CACHED_INPUTS = frozenset({"prompt", "negative_prompt", "mllm_states", "negative_mllm_states"})
"""Batch keys a conditioner may read from a batch of cached shards to encode in the step (they hold
the prompts, no pixels): what lets a conditioner whose encoder trains run beside a feature cache."""


def check_encodes_from_cache(name: str, conditioner: nn.Module) -> None:
    """Raise a one-line :class:`UserError` unless ``conditioner`` (whose encoder trains, so a cache
    cannot hold its features) reads nothing that cached shards lack."""
    lacking = sorted(set(conditioner.encode_inputs) - CACHED_INPUTS)
    if lacking:
        raise UserError(
            f"conditioners.{name} trains an encoder (model.train_encoders) and reads the batch's {', '.join(lacking)}, "
            f"which cached shards do not hold (they keep the prompts only): train from raw shards (model.feature_cache "
            f"null, data cached false), or leave its encoders out of train_encoders.")


def build_from_cache(conditioners: nn.ModuleDict, path: str | Path, live: frozenset[str] = frozenset()) -> LatentSpace:
    """Build each conditioner's trainable parts from a cache folder (no encoder is loaded);
    returns the VAE stand-in. Conditioners named in ``live`` (their encoder trains) are built whole
    instead and encode in every step; the cache's features of them, if any, are not used. Raises if
    another conditioner has no features in the cache."""
    manifest, latent_space, states = load_cache(path)
    for name in sorted(live):
        conditioners[name].build(latent_space)
        check_encodes_from_cache(name, conditioners[name])
    cached = manifest["features"]
    missing = [name for name in conditioners if name not in cached and name not in live]
    if missing:
        raise ValueError(
            f"The feature cache {path} has no features of conditioner(s) {missing} (it has {sorted(cached)}); "
            f"re-run `bindweave data cache` with this model config."
        )
    for name, conditioner in conditioners.items():
        if name not in live:
            conditioner.build_cached(latent_space, states.get(name, {}))
    return latent_space


def write_cache_info(output: Path, model: nn.Module, features: dict[str, list[str]], data: dict, config: dict | None,
                     overwrite: bool) -> None:
    """Write ``cache.json`` and ``conditioners.safetensors`` for a built model; an existing
    manifest with other settings is an error unless ``overwrite``."""
    vae = model.vae
    manifest = {
        "format": FORMAT,
        "vae": asdict(LatentSpace(vae.latent_channels, vae.temporal_compression, vae.spatial_compression)),
        "features": features,
        "data": data,
        "model": config,
    }
    path = output / MANIFEST
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in manifest} != json.loads(json.dumps(manifest)):
            raise FileExistsError(
                f"{output} holds a feature cache made with other settings (model or data); pass --overwrite or use "
                f"another output folder."
            )
    state = {}
    for name, conditioner in model.conditioners.items():
        if conditioner.trains_encoder:  # never cached: it encodes in every step
            continue
        for key, tensor in conditioner.cached_state().items():
            state[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
    output.mkdir(parents=True, exist_ok=True)
    with AtomicPath(output / STATE) as tmp:
        save_file(state, str(tmp))
    write_atomic(path, json.dumps(manifest, indent=2).encode())


# -- caching shards ---------------------------------------------------------------------------


@dataclass
class CacheSummary:
    """What ``cache_shards`` did."""

    shards_written: int = 0
    shards_skipped: int = 0
    samples: int = 0
    rejected: list[dict] | None = None
    seconds: float = 0.0


@torch.no_grad()
def encode_sample(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """VAE latents (z, T, h, w) and the features of a one-sample float batch of every conditioner
    whose encoders are all frozen (one whose encoder trains encodes in each training step)."""
    latents = model.vae.encode(batch["video"])  # (1, z, T, h, w)
    features = {name: _unbatch(c.encode(batch), 0) for name, c in model.conditioners.items() if not c.trains_encoder}
    return latents[0], features


def cache_shards(
    model: nn.Module,
    urls: str | list[str],
    output: str | Path,
    decoder,
    overwrite: bool = False,
    device: str = "cpu",
    part: tuple[int, int] = (0, 1),
    config: dict | None = None,
    progress: Iterable | None = None,
    dtype: str = "float32",
) -> CacheSummary:
    """Encode raw shards into cached shards of the same names under ``output``.

    Args:
        model: a ``BindWeave`` whose VAE and conditioners are built (``build_encoders``).
        urls: raw shards.
        output: cache folder.
        decoder: a deterministic ``SampleDecoder`` (the clip settings of training).
        overwrite: re-encode shards that exist (else they are skipped: an interrupted run resumes).
        device: where the encoders run.
        part: (i, n): this process takes shards i, i + n, ... (run n processes in parallel).
        config: the model config, recorded in the manifest.
        progress: wraps the shard list (e.g. ``tqdm``).
        dtype: storage of floating-point features, ``float32`` or ``bfloat16`` (half the bytes to
            read per training step; training reads them back as float32).
    """

    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}.")
    shards = expand_urls(urls)
    output = Path(output)
    index, count = part
    mine = shards[index::count]
    if not mine:
        raise ValueError(f"Part {index}/{count} of {len(shards)} shard(s) is empty.")
    for name, conditioner in model.conditioners.items():
        if conditioner.trains_encoder:  # left out of the cache: it must encode from what the cache keeps
            check_encodes_from_cache(name, conditioner)
    model.vae.to(device)
    model.conditioners.to(device)
    names = {os.path.basename(s) for s in shards}
    if len(names) != len(shards):
        raise ValueError("The raw shards have clashing file names; cached shards are named after them.")

    summary = CacheSummary(rejected=[])
    started = time.perf_counter()
    features_keys: dict[str, list[str]] | None = None
    rng = random.Random(0)
    for shard in progress(mine) if progress is not None else mine:
        target = output / os.path.basename(shard)
        if target.exists() and not overwrite:
            summary.shards_skipped += 1
            continue

        def on_error(error: Exception, shard=shard) -> bool:
            summary.rejected.append(BrokenSample("unreadable_shard", str(error.args[0] if error.args else error), shard=shard).report())
            return True

        with AtomicShard(target, overwrite=True) as writer:
            for sample in wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples(handler=on_error)):
                try:
                    decoded = decoder(sample, rng)
                except BrokenSample as broken:
                    summary.rejected.append(broken.report())
                    continue
                batch = to_model_batch({k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([decoded]).items()})
                latents, features = encode_sample(model, batch)
                if features_keys is None:
                    features_keys = {name: sorted(named) for name, named in features.items()}
                    data = {"num_frames": decoder.num_frames, "fps": decoder.fps, "buckets": [list(b) for b in decoder.buckets],
                            "use_masks": decoder.use_masks, "dtype": dtype}
                    write_cache_info(output, model, features_keys, data, config, overwrite)
                record = json.loads(sample["json"])
                record.update(
                    id=decoded["id"], num_references=int(batch["num_references"][0]), num_frames=decoder.num_frames,
                    clip_fps=decoded["fps"], height=int(batch["video"].shape[-2]), width=int(batch["video"].shape[-1]),
                    source_shard=shard,
                )
                writer.write(sample["__key__"], {"json": json.dumps(record, ensure_ascii=False).encode(),
                                                 FEATURES: features_to_bytes(latents, features, CACHE_DTYPES[dtype])})
                summary.samples += 1
        summary.shards_written += 1
    summary.seconds = time.perf_counter() - started
    return summary
