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
   checkpoints: a resumed run reads exactly what an uninterrupted one would (:mod:`bindweave.resume`).

Batches hold uint8 pixels (``frames`` (B, F, H, W, 3), ``references`` (B, N, 3, H, W)): 4× less to
copy between processes and to the GPU. ``on_after_batch_transfer`` turns them into the float batch
of :mod:`bindweave.batch` on the device (:func:`to_model_batch`). Skipped samples ride along in
``batch["skipped"]``; :class:`DataMonitor` logs them and the curriculum stage.
"""

from __future__ import annotations

import itertools
import logging
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Literal

import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageEnhance
from torch.utils.data import IterableDataset, get_worker_info

from bindweave.batch import check_num_frames, collate, to_model_batch, to_rgb  # noqa: F401  (to_model_batch: its home before)
from bindweave.curriculum import Curriculum, Stage
from bindweave.feature_cache import collate_features, read_features
from bindweave.resume import ResumableDataModule, StreamLoader, StreamStart, data_parallel_rank, worker_positions
from bindweave.shards import MAX_REFERENCES, REASONS, BrokenSample, expand_urls, parse_sample, read_image
from bindweave.video_decode import VideoDecodeError, decode_clip

log = logging.getLogger(__name__)

# ShardStream's length is exact: its workers split the batch positions of an epoch between them.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

WHITE = (255, 255, 255)


# -- samples ----------------------------------------------------------------------------------


@dataclass
class ReferenceAugmentation:
    """Random changes to each reference image, so the model re-renders a subject instead of pasting
    the reference's pixels (references are often crops of the target video: copy-paste).

    Args:
        flip: probability of a horizontal flip.
        scale: range of the random zoom of the image on its canvas (< 1 shrinks it on white).
        rotation: largest rotation, in degrees, either way.
        translate: largest shift, as a fraction of the image size.
        color: strength of the brightness, contrast and saturation jitter (0 switches it off).
    """

    flip: float = 0.5
    scale: tuple[float, float] = (0.8, 1.0)
    rotation: float = 10.0
    translate: float = 0.05
    color: float = 0.1

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        """Augment an RGB image."""
        if rng.random() < self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color) if self.color > 0 else ():
            image = enhancer(image).enhance(1.0 + rng.uniform(-self.color, self.color))
        w, h = image.size
        shift = (round(rng.uniform(-self.translate, self.translate) * w), round(rng.uniform(-self.translate, self.translate) * h))
        image = image.rotate(rng.uniform(-self.rotation, self.rotation), Image.Resampling.BILINEAR, translate=shift, fillcolor=WHITE)
        scale = rng.uniform(*self.scale)
        if abs(scale - 1.0) > 1e-3:
            resized = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
            canvas = Image.new("RGB", (w, h), WHITE)
            canvas.paste(resized, ((w - resized.width) // 2, (h - resized.height) // 2))
            image = canvas
        return image


class SampleDecoder:
    """Turns one webdataset sample into tensors, or raises :class:`BrokenSample`.

    A raw sample gives ``frames`` (F, H, W, 3) uint8, ``references`` (n, 3, H, W) uint8 (fitted
    into the clip's bucket on white, as ``bindweave.batch.fit_reference`` does for predict) and
    ``prompt``/``id``/``fps``/``shard``. A cached sample gives ``video_latents`` and ``features``
    instead of pixels.

    Args:
        num_frames: frames per clip (1 + 4k).
        fps: clip frame rate; None takes consecutive source frames.
        buckets: (height, width) sizes; a clip goes to the one closest to its aspect ratio.
        random_crop: random clip start and crop offset (else the first frames, centre crop).
        max_references: most references a sample may have.
        augmentation: reference augmentation, or None.
        use_masks: paste each reference's subject onto white where the sample has its mask.
        threads: FFmpeg threads per decode.
        cached: the shards come from ``bindweave data cache``.
    """

    def __init__(
        self,
        num_frames: int,
        fps: float | None,
        buckets: list[tuple[int, int]],
        random_crop: bool = False,
        max_references: int = MAX_REFERENCES,
        augmentation: ReferenceAugmentation | None = None,
        use_masks: bool = True,
        threads: int = 1,
        cached: bool = False,
    ) -> None:
        check_num_frames(num_frames)
        self.num_frames, self.fps, self.buckets = num_frames, fps, [tuple(b) for b in buckets]
        self.random_crop, self.max_references = random_crop, max_references
        self.augmentation, self.use_masks, self.threads, self.cached = augmentation, use_masks, threads, cached

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        raw = parse_sample(sample, self.max_references, cached=self.cached)
        try:
            out = {"id": str(raw.record.get("id", raw.key)), "prompt": raw.record["prompt"], "shard": raw.shard}
            if self.cached:
                return self._cached(raw.record, raw.features, out)
            try:
                frames = decode_clip(
                    raw.video, self.num_frames, self.fps, buckets=self.buckets, random_crop=self.random_crop, rng=rng,
                    threads=self.threads,
                )  # (F, H, W, 3)
            except VideoDecodeError as error:
                raise BrokenSample(error.reason, str(error)) from error
            size = frames.shape[1:3]
            refs = [self._reference(i, data, mask, size, rng) for i, (data, mask) in enumerate(zip(raw.references, raw.masks))]
            out.update(
                fps=self.fps or raw.record.get("fps"),
                frames=torch.from_numpy(frames),
                references=torch.stack(refs),  # (n, 3, H, W)
            )
            return out
        except BrokenSample as broken:
            broken.key, broken.shard = raw.key, raw.shard
            raise

    def _reference(self, index: int, data: bytes, mask: bytes | None, size: tuple[int, int], rng: random.Random) -> torch.Tensor:
        image = read_image(data, f"reference {index}")
        try:
            image = to_rgb(image)
        except ValueError as error:
            raise BrokenSample("bad_image", f"reference {index}: {error}") from error
        if mask is not None and self.use_masks:
            alpha = read_image(mask, f"mask {index}").convert("L")
            if alpha.size != image.size:
                raise BrokenSample("bad_image", f"mask {index} is {alpha.size}, its reference {image.size}")
            image = Image.composite(image, Image.new("RGB", image.size, WHITE), alpha)
        if self.augmentation is not None:
            image = self.augmentation(image, rng)
        return fit_reference_uint8(image, *size)  # (3, H, W)

    def _cached(self, record: dict, data: bytes, out: dict) -> dict:
        try:
            latents, features = read_features(data)
        except Exception as error:  # safetensors raises its own error types for bad bytes
            raise BrokenSample("bad_features", f"the features do not load: {error}") from error
        out.update(
            fps=record.get("clip_fps"), num_references=int(record["num_references"]),
            height=int(record["height"]), width=int(record["width"]), video_latents=latents, features=features,
        )
        return out


def fit_reference_uint8(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """``bindweave.batch.fit_reference`` in uint8 (3, H, W): the same resize and placement on white,
    without the float round trip (the loader converts on the device); tests check they agree."""
    scale = min(height / image.height, width / image.width)
    new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (width, height), WHITE)
    canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC), ((width - new_w) // 2, (height - new_h) // 2))
    return torch.from_numpy(np.ascontiguousarray(np.asarray(canvas).transpose(2, 0, 1)))  # (3, H, W)


def collate_cached(samples: list[dict]) -> dict:
    """Batch cached samples: latents stacked, features padded per key (see ``collate_features``)."""
    batch = {key: [s[key] for s in samples] for key in ("id", "prompt", "shard", "fps", "num_references", "height", "width")}
    batch["video_latents"] = torch.stack([s["video_latents"] for s in samples])  # (B, z, T, h, w)
    batch["features"] = collate_features([s["features"] for s in samples])
    return batch


# -- streams ----------------------------------------------------------------------------------


def split_by_rank(src: Iterator, rank: int, world_size: int) -> Iterator:
    """Keep every ``world_size``-th item from ``rank`` (``wds.split_by_node`` with the rank given
    explicitly: the Trainer's data-parallel rank, which need not be the global one)."""
    yield from itertools.islice(src, rank, None, world_size)


class ShardStream(IterableDataset):
    """Batches from curriculum stages of shards for one rank (see the module docstring).

    **Positions.** Training batches are numbered over the whole run (:mod:`bindweave.resume`): an
    iteration yields the positions from ``start.batches`` (set by :class:`StreamLoader`) to the end
    of that data epoch (``batches`` positions each; endless when None). With W DataLoader workers,
    position ``p`` belongs to *worker stream* ``p mod W`` (counted from the data epoch's start), which
    reads its own share of the rank's shards. The DataLoader takes batches from its workers
    round-robin, in order, so whichever process yields position ``p`` carries on stream ``p mod W``.
    Batch ``p`` is optimizer step ``start.step + (p - start.batches) // accumulate`` and comes from
    that step's curriculum stage, whatever the number of workers.

    **Exact continuation.** A worker stream starts afresh in each (data epoch, stage): pass ``k``
    over a shard set has one shard order (seed, epoch, stage, set, k), the same on every rank and
    stream, which then keep their shares; its samples are shuffled in a buffer seeded by the pass,
    the rank and the stream, and each sample's crop and augmentation are drawn from (pass, shard,
    key) alone. Each batch carries the state of its stream after it (``batch["resume"]``: per shard
    set the pass and how many samples were taken from it, the mixture draws, and which samples wait
    in a bucket for a batch). An iteration that starts from such a state (a new epoch, a resumed run)
    re-reads the pass up to there without decoding, decodes the waiting samples again, and goes on
    exactly as the uninterrupted stream would: no sample twice, none skipped.

    Args:
        stages: per stage, per shard set, the shard paths.
        weights: per stage, the weights of its shard sets (None: pooled).
        curriculum: stage boundaries in steps (one open stage without curriculum).
        decoder: turns samples into tensors.
        batch_size: samples per batch.
        rank: data-parallel rank.
        world_size: data-parallel size.
        batches: batches per data epoch (the fixed epoch length); None streams without end.
        finite: one pass over the shards in order, no shuffling (validation); last batches partial.
        shuffle_buffer: samples in the shuffle buffer (before decoding).
        seed: base seed of shard order, sample shuffling, crops and augmentation.
        accumulate: batches per optimizer step.
        max_consecutive_broken: this many broken samples in a row is an error (the data is bad).
    """

    def __init__(
        self,
        stages: list[list[list[str]]],
        weights: list[list[float] | None],
        curriculum: Curriculum,
        decoder: SampleDecoder,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        batches: int | None = None,
        finite: bool = False,
        shuffle_buffer: int = 100,
        seed: int = 0,
        accumulate: int = 1,
        max_consecutive_broken: int = 1000,
    ) -> None:
        super().__init__()
        self.stages, self.weights, self.curriculum, self.decoder = stages, weights, curriculum, decoder
        self.batch_size, self.rank, self.world_size, self.batches, self.finite = batch_size, rank, world_size, batches, finite
        self.shuffle_buffer, self.seed, self.accumulate = shuffle_buffer, seed, accumulate
        self.max_consecutive_broken = max_consecutive_broken
        self.start = StreamStart()
        self._reports: list[dict] = []
        self._broken_in_a_row = 0

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("an endless ShardStream has no length")
        return self.batches

    # -- samples --

    def _on_shard_error(self, error: Exception) -> bool:
        url = next((a for a in reversed(error.args) if isinstance(a, str) and a != str(error.args[0])), None)
        self._skip(BrokenSample("unreadable_shard", f"{type(error).__name__}: {error.args[0] if error.args else error}", shard=url))
        return True  # go on with the next shard

    def _skip(self, broken: BrokenSample) -> None:
        self._reports.append(broken.report())
        self._broken_in_a_row += 1
        if self._broken_in_a_row >= self.max_consecutive_broken:
            counts = Counter(r["reason"] for r in self._reports)
            raise RuntimeError(
                f"{self._broken_in_a_row} broken samples in a row (last: {broken}; reasons: {dict(counts)}); the shards "
                f"look unusable. Check them with `bindweave data inspect --check`."
            )

    def _raw(self, urls: list[str], shard_seed: int | None, part: int, parts: int,
             shuffle: random.Random | None) -> Iterator[dict]:
        """Undecoded samples of one pass over share ``part`` of ``parts`` of this rank's share of
        ``urls``: shards in the order of ``shard_seed`` (None: as given), samples shuffled in the
        buffer by ``shuffle`` (None: in shard order)."""
        pipeline = [
            wds.SimpleShardList(urls, seed=shard_seed),  # same order on every rank and worker
            partial(split_by_rank, rank=self.rank, world_size=self.world_size),
            partial(split_by_rank, rank=part, world_size=parts),  # then this worker's share of the rank's
            wds.tarfile_to_samples(handler=self._on_shard_error),
        ]
        if shuffle is not None and self.shuffle_buffer > 1:
            pipeline.append(wds.shuffle(self.shuffle_buffer, initial=max(1, self.shuffle_buffer // 4), rng=shuffle))
        return iter(wds.DataPipeline(*pipeline))

    def _decode(self, sample: dict, pass_seed: int | None) -> dict | None:
        """The decoded sample, or None for a broken one (skipped and reported). Its random choices
        (crop, augmentation) come from (pass, shard, key) alone."""
        rng = random.Random(f"{pass_seed}/{sample.get('__url__')}/{sample.get('__key__')}")
        try:
            decoded = self.decoder(sample, rng)
        except BrokenSample as broken:
            self._skip(broken)
            return None
        self._broken_in_a_row = 0
        return decoded

    def decoded(self, part: int = 0, parts: int = 1) -> Iterator[dict]:
        """Decoded samples of one pass, in order, over share ``part`` of ``parts`` of this rank's
        shards of the first stage, its sets pooled (finite streams: validation, start-up checks,
        in-memory loading)."""
        for sample in self._raw([url for urls in self.stages[0] for url in urls], None, part, parts, None):
            decoded = self._decode(sample, None)
            if decoded is not None:
                yield decoded

    def _size(self, sample: dict) -> tuple:
        """The size bucket of a decoded sample."""
        return tuple(sample["video_latents"].shape) if self.decoder.cached else tuple(sample["frames"].shape)

    def _batched(self, samples: Iterator[tuple[Any, dict]], buckets: dict[tuple, list], flush: bool = False) -> Iterator[dict]:
        """Batches of one size bucket each from (coordinate, sample) pairs; ``buckets`` holds the
        samples waiting for a batch (and may start with some). ``flush`` yields the leftovers last."""
        make = collate_cached if self.decoder.cached else collate
        for coordinate, sample in samples:
            size = self._size(sample)
            bucket = buckets.setdefault(size, [])
            bucket.append((coordinate, sample))
            if len(bucket) == self.batch_size:
                buckets[size] = []
                yield make([s for _, s in bucket])
        if flush:
            for bucket in buckets.values():
                if bucket:
                    yield make([s for _, s in bucket])

    # -- batches --

    def __iter__(self) -> Iterator[dict]:
        self._reports, self._broken_in_a_row = [], 0
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.finite:
            for batch in self._batched(((None, s) for s in self.decoded(worker, workers)), {}, flush=True):
                yield self._finish(batch, 0)
            for report in self._reports:  # after the last batch: nothing carries them to the monitor
                log.warning("skipped sample %s of shard %s: %s: %s", report["key"], report["shard"], report["reason"],
                            report["message"])
            return
        start = self.start
        end = None if self.batches is None else (start.batches // self.batches + 1) * self.batches
        stream: _WorkerStream | None = None
        for position in worker_positions(start.batches, end):
            epoch, offset = divmod(position, self.batches) if self.batches is not None else (0, position)
            stage = self.curriculum.stage_at(start.step + (position - start.batches) // self.accumulate)
            part = offset % workers
            if stream is None or (stream.epoch, stream.stage, stream.part) != (epoch, stage, part):
                stream = _WorkerStream(self, epoch, stage, part, workers)
                record = start.streams.get(part)
                if record is not None and record["position"] < position and stream.continues(record["state"]):
                    stream.restore(record["state"])
                batches = self._batched(stream.samples(), stream.buckets)
            batch = next(batches)
            batch["resume"] = {"position": position, "stream": part, "state": stream.state()}
            yield self._finish(batch, stage)

    def _finish(self, batch: dict, stage: int) -> dict:
        batch["stage"] = stage
        batch["skipped"], self._reports = self._reports, []
        return batch


class _WorkerStream:
    """The samples of one worker stream (share ``part`` of ``parts`` of a rank's shards) in one data
    epoch and curriculum stage, and the state that continues it exactly (:meth:`state`,
    :meth:`restore`). A sample's coordinate is [shard set, pass, index in the pass]."""

    def __init__(self, owner: ShardStream, epoch: int, stage: int, part: int, parts: int) -> None:
        self.owner, self.epoch, self.stage, self.part, self.parts = owner, epoch, stage, part, parts
        sets, weights = owner.stages[stage], owner.weights[stage]
        pooled = weights is None or len(sets) == 1
        self.sets = [[url for urls in sets for url in urls]] if pooled else sets
        self.weights = None if pooled else weights
        self.cursors = [[0, 0] for _ in self.sets]  # per set: [pass, samples taken from it]
        self.draws = 0  # samples drawn from the weighted mixture
        self.buckets: dict[tuple, list[tuple[list[int], dict]]] = {}  # size -> [(coordinate, sample)] waiting

    def _pass_seed(self, index: int, pass_index: int) -> int:
        return random.Random(f"{self.owner.seed}/{self.epoch}/{self.stage}/{index}/{pass_index}").getrandbits(32)

    def _raw(self, index: int, pass_index: int) -> Iterator[dict]:
        seed = self._pass_seed(index, pass_index)
        return self.owner._raw(self.sets[index], seed, self.part, self.parts,
                               random.Random(f"{seed}/{self.owner.rank}/{self.part}"))

    def _reread(self, raw: Iterator[dict]) -> Iterator[dict]:
        """Samples that were taken before a restore, read again (not decoded): a shard error met
        on the way was reported then and is not reported again."""
        reports, broken = len(self.owner._reports), self.owner._broken_in_a_row
        yield from raw
        del self.owner._reports[reports:]
        self.owner._broken_in_a_row = broken

    def _set_samples(self, index: int) -> Iterator[tuple[list[int], dict]]:
        """(coordinate, decoded sample) of shard set ``index``, pass after pass, from its cursor."""
        while True:
            pass_index, taken = self.cursors[index]
            raw = self._raw(index, pass_index)
            for _ in self._reread(itertools.islice(raw, taken)):  # taken before a restore
                pass
            valid = 0
            seed = self._pass_seed(index, pass_index)
            for number, sample in enumerate(raw, start=taken):
                self.cursors[index] = [pass_index, number + 1]
                decoded = self.owner._decode(sample, seed)
                if decoded is not None:
                    valid += 1
                    yield [index, pass_index, number], decoded
            urls = self.sets[index]
            if valid == 0 and taken == 0:
                raise RuntimeError(
                    f"A whole pass over this worker's shards of {urls[:3]}{'...' if len(urls) > 3 else ''} gave no valid sample "
                    f"(skipped: {dict(Counter(r['reason'] for r in self.owner._reports))})."
                )
            self.cursors[index] = [pass_index + 1, 0]

    def samples(self) -> Iterator[tuple[list[int], dict]]:
        """(coordinate, decoded sample) of the stage: its one (pooled) set, or its sets mixed sample
        by sample, draw ``n`` choosing by (seed, rank, stream, epoch, stage, n)."""
        streams = [self._set_samples(i) for i in range(len(self.sets))]
        if self.weights is None:
            yield from streams[0]
            return
        owner = self.owner
        while True:
            rng = random.Random(f"{owner.seed}/{owner.rank}/{self.part}/{self.epoch}/{self.stage}/{self.draws}")
            choice = rng.choices(range(len(streams)), self.weights)[0]
            self.draws += 1
            yield next(streams[choice])

    def state(self) -> dict:
        """What continues this stream exactly after the batch just made (plain lists and ints)."""
        return {
            "epoch": self.epoch, "stage": self.stage, "parts": self.parts, "cursors": [list(c) for c in self.cursors],
            "draws": self.draws, "waiting": [c for bucket in self.buckets.values() for c, _ in bucket],
            "broken": self.owner._broken_in_a_row,
        }

    def continues(self, state: dict) -> bool:
        """Whether ``state`` was saved by this stream (same data epoch, stage and number of streams)."""
        return (state["epoch"], state["stage"], state["parts"]) == (self.epoch, self.stage, self.parts)

    def restore(self, state: dict) -> None:
        """Go on from ``state``: the cursors and draws as they were, the waiting samples read and
        decoded again into their buckets (in the order they came)."""
        self.cursors, self.draws = [list(c) for c in state["cursors"]], state["draws"]
        self.owner._broken_in_a_row = state["broken"]
        waiting = [tuple(c) for c in state["waiting"]]
        wanted: dict[tuple[int, int], set[int]] = {}
        for index, pass_index, number in waiting:
            wanted.setdefault((index, pass_index), set()).add(number)
        found: dict[tuple[int, int, int], dict] = {}
        for (index, pass_index), numbers in wanted.items():
            raw = itertools.islice(self._raw(index, pass_index), max(numbers) + 1)
            for number, sample in enumerate(self._reread(raw)):
                if number in numbers:
                    found[index, pass_index, number] = sample
        for coordinate in waiting:
            sample = found.get(coordinate)
            decoded = self.owner._decode(sample, self._pass_seed(*coordinate[:2])) if sample is not None else None
            if decoded is None:
                log.warning("sample %s, which waited for a batch at the checkpoint, is gone or broken now: the shards "
                            "changed since; the stream goes on without it", coordinate)
                continue
            self.buckets.setdefault(self.owner._size(decoded), []).append((list(coordinate), decoded))


# -- monitoring -------------------------------------------------------------------------------


class DataMonitor(Callback):
    """Logs what the loader reports: ``data/skipped`` (broken samples so far, summed over ranks),
    ``data/skipped/<reason>`` (this rank), each skip as a warning with its shard and key, and the
    curriculum stage (``data/stage``, plus a line when it changes). Added by :class:`WebDataModule`."""

    def __init__(self) -> None:
        self.skipped: Counter = Counter()
        self.stage: int | None = None

    @staticmethod
    def attach(trainer) -> None:
        """Add a DataMonitor to ``trainer``'s callbacks unless it has one (a datamodule's ``setup``)."""
        if trainer is not None and not any(isinstance(c, DataMonitor) for c in trainer.callbacks):
            trainer.callbacks.append(DataMonitor())

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
        curriculum: training stages (shard sets, steps, weights); see ``bindweave.curriculum``.
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
        DataMonitor.attach(self.trainer)

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
