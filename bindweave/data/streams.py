"""The training stream of one DataLoader worker (:class:`ShardStream`): curriculum stage by batch
position, shards split by rank and worker, a shuffle buffer, decoding, broken samples skipped and
reported, batches per aspect-ratio bucket, and the stream state that makes resume exact."""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from functools import partial
from typing import Any, Iterator

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from bindweave.model.batch import collate  # noqa: F401  (to_model_batch: its home before)
from bindweave.data.curriculum import Curriculum
from bindweave.data.resume import StreamStart, worker_positions
from bindweave.data.shards import BrokenSample
from bindweave.data.samples import SampleDecoder, collate_cached

log = logging.getLogger(__name__)


# -- streams ----------------------------------------------------------------------------------


def split_by_rank(src: Iterator, rank: int, world_size: int) -> Iterator:
    """Keep every ``world_size``-th item from ``rank`` (``wds.split_by_node`` with the rank given
    explicitly: the Trainer's data-parallel rank, which need not be the global one)."""
    yield from itertools.islice(src, rank, None, world_size)


class ShardStream(IterableDataset):
    """Batches from curriculum stages of shards for one rank (see the module docstring).

    **Positions.** Training batches are numbered over the whole run (:mod:`bindweave.data.resume`): an
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
