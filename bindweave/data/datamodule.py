"""Training data from webdataset shards: a LightningDataModule for raw and feature-cached shards.

Per DataLoader worker (``ShardStream``), for each of its batches:

1. the batch's position (training batches are numbered over the whole run) gives its optimizer
   step and so its curriculum stage;
2. the stage's shards (shuffled per pass with a seed shared by all ranks) are split by rank and by
   worker, so one pass reads every sample exactly once over the whole job; shard sets of a stage
   with weights are mixed sample by sample;
3. samples are shuffled in a buffer, decoded (``SampleDecoder``: PyAV clip at the target fps, resize
   + crop to the nearest aspect-ratio bucket, references fitted and augmented), broken ones skipped
   and reported, and batched per bucket;
4. the batch carries its position and its worker's stream state, which the datamodule keeps in
   checkpoints: a resumed run reads exactly what an uninterrupted one would (:mod:`bindweave.data.resume`).

Batches hold uint8 pixels (``frames`` (B, F, H, W, 3), ``references`` (B, N, 3, H, W)): 4× less to
copy between processes and to the GPU. ``on_after_batch_transfer`` turns them into the float batch
of :mod:`bindweave.model.batch` on the device (:func:`to_model_batch`). Skipped samples ride along in
``batch["skipped"]``; :class:`DataMonitor` logs them and the curriculum stage.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from bindweave.model.batch import to_model_batch  # noqa: F401  (to_model_batch: its home before)
from bindweave.data.curriculum import Curriculum, Stage
from bindweave.data.resume import ResumableDataModule, StreamLoader, StreamStart, data_parallel_rank
from bindweave.data.shards import MAX_REFERENCES, REASONS, expand_urls
from bindweave.data.samples import ReferenceAugmentation, SampleDecoder
from bindweave.data.streams import ShardStream

log = logging.getLogger(__name__)


# -- monitoring -------------------------------------------------------------------------------


class DataMonitor(Callback):
    """Logs what the loader reports: ``data/skipped`` (broken samples so far, summed over ranks),
    ``data/skipped/<reason>`` (this rank), each skip as a warning with its shard and key, and the
    curriculum stage (``data/stage``, plus a line when it changes). Name it in ``trainer.callbacks``
    (``callbacks.DataMonitor``); the datamodules warn when it is missing."""

    def __init__(self) -> None:
        self.skipped: Counter = Counter()
        self.stage: int | None = None

    @staticmethod
    def check_present(trainer) -> None:
        """Warn (once per run) when ``trainer`` has no DataMonitor: broken samples would be skipped
        without being logged. The datamodule's ``setup`` calls it; it never adds the callback itself."""
        if trainer is not None and not any(isinstance(c, DataMonitor) for c in trainer.callbacks):
            rank_zero_warn("Skipped (broken) samples and curriculum stages are counted but not logged: add "
                           "`- class_path: callbacks.DataMonitor` to trainer.callbacks (configs/data/*.yaml do).")

    def _count(self, batch: dict) -> None:
        for report in batch.get("skipped", ()):
            self.skipped[report["reason"]] += 1
            log.warning("skipped sample %s of shard %s: %s: %s", report["key"], report["shard"], report["reason"], report["message"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._count(batch)
        stage = batch.get("stage", 0)
        if stage != self.stage:
            curriculum = getattr(trainer.datamodule, "curriculum", None)
            name = curriculum.stages[stage].name if curriculum is not None else str(stage)
            rank_zero_info(f"Data: step {trainer.global_step} draws from curriculum stage {stage} ({name}).")
            self.stage = stage
        pl_module.log("data/stage", float(stage), on_step=True, batch_size=1)
        pl_module.log("data/skipped", float(sum(self.skipped.values())), on_step=True, batch_size=1, reduce_fx="sum",
                      sync_dist=trainer.world_size > 1)
        for reason, count in self.skipped.items():
            pl_module.log(f"data/skipped/{reason}", float(count), on_step=True, batch_size=1, rank_zero_only=True)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._count(batch)

    def state_dict(self) -> dict:
        return {"skipped": dict(self.skipped)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = Counter(state_dict.get("skipped", {}))


# -- the datamodule ---------------------------------------------------------------------------


class WebDataModule(ResumableDataModule):
    """Video + references + prompt samples from webdataset shards (``bindweave data pack``), or
    their cached features (``bindweave data cache``), with an optional curriculum.

    The training position (batches trained, and the state of each worker's stream) is kept in
    checkpoints, so a resumed run continues sample for sample when it has the same number of ranks
    and workers (:class:`ShardStream`; otherwise it goes on from the same position with a warning).

    Args:
        urls: training shards (brace ranges, globs, lists) for a single-stage run; exclusive with
            ``curriculum``.
        curriculum: training stages (shard sets, steps, weights); see ``bindweave.data.curriculum``.
        val_urls: validation shards (one pass in order, per rank and worker), or None.
        cached: the shards hold cached features (``bindweave data cache``); the model needs
            ``feature_cache`` set to the same folder.
        num_frames: frames per clip (1 + 4k; Wan: 81).
        fps: clip frame rate (Wan: 16); None takes consecutive source frames.
        buckets: (height, width) sizes; each clip goes to the one closest to its aspect ratio.
        random_crop: training clips start at a random time and are cropped at a random offset.
        max_references: most references per sample (more is a broken sample).
        augmentation: reference augmentation in training (None switches it off).
        use_masks: paste referenced subjects onto white where a sample has masks.
        batch_size: samples per batch (per rank).
        samples_per_epoch: training samples per epoch over all ranks (the fixed epoch length of a
            stream; each epoch starts new passes over the shards); None streams in one endless
            epoch (set ``trainer.max_steps``).
        num_workers: DataLoader worker processes per rank.
        decode_threads: FFmpeg threads per video decode.
        shuffle_buffer: samples (before decoding) in each worker's shuffle buffer.
        pin_memory: pin batches for faster copies to the GPU.
        seed: base seed of shard order, shuffling, crops and augmentation.
        check_samples: at start-up, decode up to this many samples of each shard set until one is
            valid (a set with none is an error); 0 skips the check.
        max_consecutive_broken: this many broken samples in a row stop the run.
        worker_start_method: how worker processes start: ``fork`` (fast, the platform default on
            Linux), ``spawn`` or ``forkserver`` (fresh interpreters, no state inherited). Forked
            workers inherit the parent's threads and locks; on one H100 host (torch 2.11) they hung
            before their first batch once CUDA was initialised: use ``spawn`` there. None: the
            platform default.
    """

    def __init__(
        self,
        urls: str | list[str] | None = None,
        curriculum: list[Stage] | None = None,
        val_urls: str | list[str] | None = None,
        cached: bool = False,
        num_frames: int = 81,
        fps: float | None = 16.0,
        buckets: list[tuple[int, int]] = [(480, 832), (832, 480), (624, 624)],
        random_crop: bool = True,
        max_references: int = MAX_REFERENCES,
        augmentation: ReferenceAugmentation | None = ReferenceAugmentation(),
        use_masks: bool = True,
        batch_size: int = 1,
        samples_per_epoch: int | None = None,
        num_workers: int = 4,
        decode_threads: int = 1,
        shuffle_buffer: int = 100,
        pin_memory: bool = False,
        seed: int = 0,
        check_samples: int = 64,
        max_consecutive_broken: int = 1000,
        worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None,
    ) -> None:
        super().__init__()
        if (urls is None) == (curriculum is None):
            raise ValueError("WebDataModule needs exactly one of `urls` (one stage) or `curriculum` (stages).")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.curriculum = Curriculum(curriculum if curriculum is not None else [Stage(urls=urls, name="train")])
        self.val_urls, self.cached, self.batch_size = val_urls, cached, batch_size
        self.samples_per_epoch, self.num_workers, self.shuffle_buffer = samples_per_epoch, num_workers, shuffle_buffer
        self.pin_memory, self.seed, self.check_samples = pin_memory, seed, check_samples
        self.max_consecutive_broken = max_consecutive_broken
        self.worker_start_method = worker_start_method
        common = dict(num_frames=num_frames, fps=fps, buckets=buckets, max_references=max_references,
                      use_masks=use_masks, threads=decode_threads, cached=cached)
        self.train_decoder = SampleDecoder(random_crop=random_crop, augmentation=None if cached else augmentation, **common)
        self.eval_decoder = SampleDecoder(random_crop=False, augmentation=None, **common)
        self._train_sets: list[list[list[str]]] | None = None
        self._val_shards: list[str] | None = None

    # -- start-up checks --

    def _resolve(self) -> None:
        """Expand every URL pattern (a pattern matching nothing is an error) once."""
        if self._train_sets is None:
            self._train_sets = [[expand_urls(pattern) for pattern in stage.urls] for stage in self.curriculum.stages]
            self._val_shards = expand_urls(self.val_urls) if self.val_urls is not None else None

    def _check_valid(self, urls: list[str], what: str, decoder: SampleDecoder) -> None:
        """Decode samples of ``urls`` in order until one is valid; none in ``check_samples`` is an error."""
        if self.check_samples <= 0:
            return
        stream = ShardStream([[urls]], [None], Curriculum([Stage(urls=urls)]), decoder, 1, finite=True,
                             max_consecutive_broken=self.check_samples + 1)
        for _ in stream.decoded():
            return
        seen = len(stream._reports)
        reasons = Counter(r["reason"] for r in stream._reports)
        examples = "; ".join(f"{r['shard']}:{r['key']}: {r['reason']}: {r['message']}" for r in stream._reports[:3])
        raise ValueError(
            f"No valid sample in {what} ({len(urls)} shard(s), e.g. {urls[0]}): {seen} checked and skipped, "
            f"{dict(reasons) or 'the shards hold no sample'} ({examples}). "
            + ("The shards are raw: set cached: false. " if self.cached and reasons.get("missing_file") else "")
            + ("These look like cached shards: set cached: true. " if not self.cached and reasons.get("missing_file") else "")
            + "Inspect them with `bindweave data inspect --check`."
        )

    def setup(self, stage: str) -> None:
        self._resolve()
        rank, world = data_parallel_rank(self.trainer)
        if stage == "fit":
            workers = max(1, self.num_workers) * world
            for sets, spec in zip(self._train_sets, self.curriculum.stages):
                # Pooled sets are split together; weighted ones each on their own.
                split = [(sum(sets, []), spec.urls)] if spec.weights is None else list(zip(sets, spec.urls))
                for shards, pattern in split:
                    if len(shards) < workers:
                        raise ValueError(
                            f"Stage {spec.name!r}: {pattern!r} has {len(shards)} shard(s) for {world} rank(s) x "
                            f"{max(1, self.num_workers)} worker(s): every worker needs a shard of its own. Pack smaller "
                            f"shards (bindweave data pack --samples_per_shard) or use fewer workers."
                        )
                for shards, pattern in zip(sets, spec.urls):
                    self._check_valid(shards, f"stage {spec.name!r} shards {pattern!r}", self.eval_decoder)
            rank_zero_info("Data curriculum:\n" + self.curriculum.describe())
        if stage in ("fit", "validate", "test") and self._val_shards is not None:
            self._check_valid(self._val_shards, f"validation shards {self.val_urls!r}", self.eval_decoder)
        DataMonitor.check_present(self.trainer)

    # -- loaders --

    def _stream_start(self) -> StreamStart:
        """Where the next training iteration starts; worker stream states saved with another number
        of workers do not fit (each worker reads a share of the shards that depends on it)."""
        start = self._start()
        saved = {record["state"]["parts"] for record in start.streams.values()}
        if saved and saved != {max(1, self.num_workers)}:
            log.warning("The checkpoint's data streams are of %s worker(s), this run has %d: the data goes on from "
                        "batch %d with new shuffles, not sample for sample (resume with as many workers for that).",
                        sorted(saved), max(1, self.num_workers), start.batches)
            start.streams = {}
            self.position.streams = {}
        return start

    def train_stream(self) -> ShardStream:
        """The training stream of this rank (no DataLoader around it)."""
        self._resolve()
        rank, world = data_parallel_rank(self.trainer)
        batches = None
        if self.samples_per_epoch is not None:
            batches = max(1, self.samples_per_epoch // (world * self.batch_size))
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return ShardStream(
            self._train_sets, [s.weights for s in self.curriculum.stages], self.curriculum, self.train_decoder,
            self.batch_size, rank, world, batches=batches, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
            accumulate=accumulate, max_consecutive_broken=self.max_consecutive_broken,
        )

    def train_dataloader(self) -> StreamLoader:
        return StreamLoader(self.train_stream(), self._stream_start, **self._loader_options(self.num_workers))

    def _loader_options(self, workers: int) -> dict:
        context = self.worker_start_method if workers > 0 else None
        return dict(num_workers=workers, pin_memory=self.pin_memory, multiprocessing_context=context)

    def val_dataloader(self) -> StreamLoader | list:
        if self.val_urls is None:
            return []
        self._resolve()
        rank, world = data_parallel_rank(self.trainer)
        stream = ShardStream(
            [[self._val_shards]], [None], Curriculum([Stage(urls=self._val_shards)]), self.eval_decoder, self.batch_size,
            rank, world, finite=True, seed=self.seed, max_consecutive_broken=self.max_consecutive_broken,
        )
        return StreamLoader(stream, **self._loader_options(min(self.num_workers, len(self._val_shards))))

    def test_dataloader(self) -> StreamLoader | list:
        return self.val_dataloader()

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return to_model_batch(batch)


__all__ = [
    "DataMonitor", "REASONS", "ReferenceAugmentation", "SampleDecoder", "ShardStream", "StreamLoader", "WebDataModule",
    "data_parallel_rank", "to_model_batch",
]
