"""Cached features held in (GPU) memory: batches without a loader process, a copy or a host sync.

For small models the streaming loader, not the GPU, sets the pace: a 10M-parameter sprites DiT
trained at 6–11 steps/s with the GPU 12–85 % busy, its batches decoded, collated, pinned and
copied by worker processes. A feature cache of a few thousand samples fits in GPU memory many
times over, so :class:`MemoryCacheDataModule` reads it once at ``setup`` and builds each batch on
the device: one ``index_select`` per feature.

Batches are exactly what :func:`bindweave.data.datamodule.collate_cached` makes of the same samples
(each feature trimmed to the batch's longest sample, so the model sees the same padding as when
streaming and at predict time); the store keeps every sample's real sizes on the host, so
trimming needs no device sync. Training draws every sample once per pass, in an order fixed by
(seed, pass) and shared by all ranks, each rank taking every ``world_size``-th batch position; a
resumed run continues the same order from the batches it had trained (kept in the checkpoint,
:mod:`bindweave.data.resume`). Broken samples are skipped and counted at load time (logged by
:class:`~bindweave.data.datamodule.DataMonitor` with the first batch).

Memory: about the size of the cache's shards (``bytes`` in the setup log line), per process.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterator, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from bindweave.data.curriculum import Curriculum, Stage
from bindweave.model.batch import to_model_batch
from bindweave.data.datamodule import DataMonitor
from bindweave.data.samples import SampleDecoder
from bindweave.data.streams import ShardStream
from bindweave.data.feature_cache import _pad_to
from bindweave.data.resume import PositionedLoader, ResumableDataModule, StreamStart, data_parallel_rank, pass_order
from bindweave.data.shards import MAX_REFERENCES, expand_urls

HOST_KEYS = ("id", "prompt", "shard", "fps", "num_references", "height", "width")


class FeatureStore:
    """Every sample of a set of cached shards, padded and stacked on one device.

    ``tensors[key]`` is (N, ...) padded to the largest sample (zeros, False for masks) and
    ``sizes[key]`` (N, ndim) each sample's own size; keys are ``video_latents`` and
    ``<conditioner>.<feature>``. ``host[key]`` holds the per-sample lists of :data:`HOST_KEYS`.

    Args:
        samples: decoded cached samples (``SampleDecoder(cached=True)``).
        device: where the tensors live.
        conditioners: keep only these conditioners' features (None: all).
    """

    def __init__(self, samples: list[dict], device: torch.device | str = "cpu", conditioners: list[str] | None = None) -> None:
        if not samples:
            raise ValueError("FeatureStore needs at least one sample.")
        shapes = Counter(tuple(s["video_latents"].shape) for s in samples)
        if len(shapes) > 1:
            raise ValueError(
                f"The cached clips have {len(shapes)} latent sizes ({dict(shapes)}); in-memory batches need one. "
                f"Train from the streaming loader (bindweave.data.datamodule.WebDataModule with cached: true), which "
                f"batches per size."
            )
        self.host = {key: [s[key] for s in samples] for key in HOST_KEYS}
        per_key: dict[str, list[torch.Tensor]] = {"video_latents": [s["video_latents"] for s in samples]}
        for conditioner, named in samples[0]["features"].items():
            if conditioners is not None and conditioner not in conditioners:
                continue
            for name in named:
                per_key[f"{conditioner}.{name}"] = [s["features"][conditioner][name] for s in samples]
        self.tensors: dict[str, torch.Tensor] = {}
        self.sizes: dict[str, torch.Tensor] = {}
        for key, tensors in per_key.items():
            sizes = torch.tensor([list(t.shape) for t in tensors], dtype=torch.long)  # (N, ndim)
            largest = sizes.max(0).values.tolist()
            self.tensors[key] = torch.stack([_pad_to(t, largest) for t in tensors]).to(device)  # as collate pads
            self.sizes[key] = sizes

    def __len__(self) -> int:
        return len(self.host["id"])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def batch(self, indices: list[int], device_indices: torch.Tensor) -> dict:
        """The batch of samples ``indices`` (host list) = ``device_indices`` (the same, on the
        store's device), as ``collate_cached`` would make it."""
        batch = {key: [values[i] for i in indices] for key, values in self.host.items()}
        features: dict[str, dict[str, torch.Tensor]] = {}
        rows = torch.tensor(indices)
        for key, stored in self.tensors.items():
            shape = self.sizes[key][rows].max(0).values.tolist()  # the batch's largest sample, per dim
            picked = stored.index_select(0, device_indices)[(slice(None), *(slice(0, n) for n in shape))]
            if key == "video_latents":
                batch[key] = picked
            else:
                conditioner, name = key.split(".", 1)
                features.setdefault(conditioner, {})[name] = picked.contiguous()
        batch["features"] = features
        return batch


class MemoryBatches(PositionedLoader):
    """Batches of a :class:`FeatureStore`: shuffled passes without end (training) or one pass in
    order (validation). Training batch ``p`` (its position) is batch ``p % per_pass`` of pass
    ``p // per_pass``; each iteration starts at the position ``start()`` returns (the batches the
    rank has trained: a resumed run continues the same order) and marks each batch with it
    (``batch["resume"]``, see :mod:`bindweave.data.resume`); None starts at 0."""

    def __init__(self, store: FeatureStore, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 finite: bool = False, start: Callable[[], StreamStart] | None = None,
                 skipped: list[dict] | None = None) -> None:
        self.store, self.batch_size, self.seed, self.rank, self.world_size = store, batch_size, seed, rank, world_size
        self.finite, self.start, self.skipped = finite, start, list(skipped or [])
        self._pass: tuple[int, list[int], torch.Tensor] | None = None  # (pass index, host order, device order)

    def _order(self, pass_index: int) -> tuple[list[int], torch.Tensor]:
        """Sample order of one pass (the same on every rank) on the host and on the device."""
        if self._pass is None or self._pass[0] != pass_index:
            order = pass_order(len(self.store), self.seed, pass_index, shuffle=not self.finite)
            device = next(iter(self.store.tensors.values())).device
            self._pass = (pass_index, order, torch.tensor(order, device=device))  # one copy per pass
        return self._pass[1], self._pass[2]

    def __iter__(self) -> Iterator[dict]:
        n, size = len(self.store), self.batch_size
        if self.finite:
            positions = range(self.rank * size, n, self.world_size * size)
            for start in positions:
                order, device_order = self._order(0)
                yield self._finish(self.store.batch(order[start:start + size], device_order[start:start + size]))
            return
        if n < size * self.world_size:
            raise ValueError(f"The in-memory training set has {n} samples, fewer than one batch of {size} for each of "
                             f"{self.world_size} rank(s); lower batch_size or add samples.")
        per_pass = n // (size * self.world_size)  # whole batches per rank and pass; the rest waits a pass
        position = self.start().batches if self.start is not None else 0
        while True:
            pass_index, batch = divmod(position, per_pass)
            first = (batch * self.world_size + self.rank) * size
            order, device_order = self._order(pass_index)
            out = self._finish(self.store.batch(order[first:first + size], device_order[first:first + size]))
            out["resume"] = {"position": position}
            yield out
            position += 1

    def _finish(self, batch: dict) -> dict:
        batch["stage"] = 0
        batch["skipped"], self.skipped = self.skipped, []
        return batch


class MemoryCacheDataModule(ResumableDataModule):
    """Feature-cached shards (``bindweave data cache``) read once into memory — the GPU's by
    default — and batched there: the fast path for small models and caches that fit (see the
    module docstring). One clip size, one training set (no curriculum); the model needs
    ``feature_cache`` set to the cache folder, as with ``WebDataModule(cached=True)``.

    Args:
        urls: cached training shards (brace ranges, globs, lists).
        val_urls: cached validation shards, or None.
        batch_size: samples per batch (per rank).
        device: where the features live: ``auto`` (the Trainer's device) or ``cpu``.
        max_references: most references a sample may have (more is a broken sample).
        seed: seed of the sample order.
        max_consecutive_broken: this many broken samples in a row while loading stop the run.
    """

    def __init__(
        self,
        urls: str | list[str],
        val_urls: str | list[str] | None = None,
        batch_size: int = 1,
        device: Literal["auto", "cpu"] = "auto",
        max_references: int = MAX_REFERENCES,
        seed: int = 0,
        max_consecutive_broken: int = 1000,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.urls, self.val_urls, self.batch_size, self.device = urls, val_urls, batch_size, device
        self.max_references, self.seed, self.max_consecutive_broken = max_references, seed, max_consecutive_broken
        self.train_store: FeatureStore | None = None
        self.val_store: FeatureStore | None = None
        self._skipped: dict[str, list[dict]] = {}

    def _target_device(self) -> torch.device:
        if self.device == "cpu" or self.trainer is None:
            return torch.device("cpu")
        return self.trainer.strategy.root_device

    def _load(self, urls: str | list[str], what: str) -> FeatureStore:
        shards = expand_urls(urls)
        decoder = SampleDecoder(num_frames=1, fps=None, buckets=[(1, 1)], max_references=self.max_references, cached=True)
        stream = ShardStream([[shards]], [None], Curriculum([Stage(urls=shards)]), decoder, 1, finite=True,
                             max_consecutive_broken=self.max_consecutive_broken)
        samples = list(stream.decoded())
        self._skipped[what] = stream._reports
        if not samples:
            reasons = dict(Counter(r["reason"] for r in stream._reports))
            raise ValueError(
                f"No valid cached sample in {what} shards {urls!r} ({len(shards)} shard(s); skipped: {reasons or 'none'}). "
                f"Make them with `bindweave data cache` and inspect them with `bindweave data inspect --check`."
            )
        module = self.trainer.lightning_module if self.trainer is not None else None
        conditioners = list(module.conditioners) if module is not None and hasattr(module, "conditioners") else None
        store = FeatureStore(samples, self._target_device(), conditioners)
        rank_zero_info(
            f"In-memory {what} data: {len(store)} samples ({len(stream._reports)} skipped), "
            f"{store.nbytes / 2**20:.0f} MiB on {self._target_device()}."
        )
        return store

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_store is None:
            self.train_store = self._load(self.urls, "training")
        if stage in ("fit", "validate") and self.val_urls is not None and self.val_store is None:
            self.val_store = self._load(self.val_urls, "validation")
        DataMonitor.check_present(self.trainer)

    def train_dataloader(self) -> MemoryBatches:
        rank, world = data_parallel_rank(self.trainer)
        return MemoryBatches(self.train_store, self.batch_size, self.seed, rank, world, start=self._start,
                             skipped=self._skipped.pop("training", []))

    def val_dataloader(self) -> MemoryBatches | list:
        if self.val_store is None:
            return []
        rank, world = data_parallel_rank(self.trainer)
        return MemoryBatches(self.val_store, self.batch_size, rank=rank, world_size=world, finite=True,
                             skipped=self._skipped.pop("validation", []))

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return to_model_batch(batch)


__all__ = ["FeatureStore", "MemoryBatches", "MemoryCacheDataModule"]
