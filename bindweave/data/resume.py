"""Exact resume of the training data: every training stream is a function of its position.

A rank's training batches form one sequence over the whole run, whatever the epochs: batch ``p``
(its *position*) is a function of ``p``, the seed, the rank and the data-parallel size, and — for
the webdataset stream, whose shuffle buffer and broken samples make it sequential — of the small
state its worker's stream had after its previous batch. So the datamodule keeps, in its checkpoint
state (:class:`TrainPosition`), how many batches the Trainer has *trained* and, per worker stream,
the state that came with the last one; an iteration of the loader (a new epoch, or a resumed run)
starts from there and yields exactly the batches an uninterrupted run would have.

Why the datamodule and not the DataLoader: Lightning prefetches batches ahead of the one it trains,
so a loader knows what it has handed out, not what was trained. The Trainer calls the datamodule's
``on_before_batch_transfer`` with each batch it is about to train, in order; that is where the
position is read (``batch["resume"]``, put there by the stream and taken out again).

Epochs are the Trainer's bookkeeping, not the data's: a Lightning run stopped by ``max_steps``
marks its epoch finished, so the resumed run starts "epoch 1" in the middle of the data's first
pass. An iteration therefore starts at the recorded position and runs to the end of the *data*
epoch (pass) that position is in: the epoch after a resume is shorter, and the ones after it line
up with the data again.

The model's own randomness (noise, timesteps, condition dropout) is seeded per step by
``callbacks.StepSeed``; with it, interrupted and uninterrupted runs end with equal weights
(``tests/test_resume.py``).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info


def data_parallel_rank(trainer) -> tuple[int, int]:
    """Data-parallel (rank, size) from ``trainer``'s strategy (what DistributedSampler would use);
    (0, 1) without a Trainer."""
    if trainer is None:
        return 0, 1
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))


def pass_order(size: int, seed: int, pass_index: int, shuffle: bool = True) -> list[int]:
    """Order of the items 0..size-1 in pass ``pass_index``: the same on every rank and worker."""
    order = list(range(size))
    if shuffle:
        random.Random(f"{seed}/{pass_index}").shuffle(order)
    return order


# -- the position -----------------------------------------------------------------------------


@dataclass
class StreamStart:
    """Where an iteration of a training stream starts.

    Args:
        batches: training batches this rank has consumed since the run began: the position of the
            iteration's first batch.
        step: the optimizer step of that batch (the curriculum's clock).
        streams: per worker stream, the ``batch["resume"]`` of its last consumed batch (streams
            with a state of their own: :class:`bindweave.data.datamodule.ShardStream`).
    """

    batches: int = 0
    step: int = 0
    streams: dict[int, dict] = field(default_factory=dict)


class TrainPosition:
    """The training batches one rank has consumed, kept in the datamodule's checkpoint state.

    :meth:`consume` reads ``batch["resume"]`` (``{"position": p, ...}``, and for a stream with a
    state ``"stream"``: the worker stream's index, ``"state"``) off every batch the Trainer is about
    to train; a batch without one counts as the next position. :meth:`state_dict` gathers every
    rank's record (ranks differ: each reads its own shards), :meth:`load_state_dict` takes this
    rank's back; a checkpoint from another number of ranks keeps the position only (with a warning).
    """

    def __init__(self) -> None:
        self.batches = 0
        self.streams: dict[int, dict] = {}

    def consume(self, batch: Any) -> None:
        resume = batch.pop("resume", None) if isinstance(batch, dict) else None
        if resume is None:
            self.batches += 1
            return
        self.batches = resume["position"] + 1
        if resume.get("stream") is not None:
            self.streams[resume["stream"]] = resume

    def start(self, step: int) -> StreamStart:
        """The :class:`StreamStart` of the next iteration, at optimizer step ``step``."""
        return StreamStart(self.batches, step, dict(self.streams))

    def state_dict(self, trainer=None) -> dict:
        record = {"batches": self.batches, "streams": self.streams}
        world = trainer.world_size if trainer is not None else 1
        records = [record]
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            records = [None] * world
            torch.distributed.all_gather_object(records, record)  # every rank saves the checkpoint's dict
        return {"ranks": records}

    def load_state_dict(self, state: dict, trainer=None) -> None:
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        records = state["ranks"]
        if len(records) == world:
            record = records[rank]
            self.streams = {int(k): v for k, v in record["streams"].items()}
        else:
            record = records[0]
            self.streams = {}
            warnings.warn(
                f"The checkpoint's data position was saved by {len(records)} rank(s), this run has {world}: the "
                f"data goes on from batch {record['batches']} of each rank, but not sample for sample as an "
                f"uninterrupted run would (resume with {len(records)} rank(s) for that).", stacklevel=2,
            )
        self.batches = int(record["batches"])


class ResumableDataModule(L.LightningDataModule):
    """A datamodule whose training stream resumes exactly (see the module docstring): it records
    the consumed training batches in ``self.position`` and keeps them in checkpoints. Training
    streams read ``self.position.start(...)`` each time they are iterated."""

    def __init__(self) -> None:
        super().__init__()
        self.position = TrainPosition()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.position.consume(batch)
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position.state_dict(self.trainer)}

    def load_state_dict(self, state_dict: dict) -> None:
        if "position" in state_dict:
            self.position.load_state_dict(state_dict["position"], self.trainer)

    def _start(self) -> StreamStart:
        return self.position.start(self.trainer.global_step if self.trainer is not None else 0)


# -- loaders ----------------------------------------------------------------------------------


class PositionedLoader:
    """A training loader whose position lives in its datamodule's checkpoint state
    (:class:`TrainPosition`, read from the batches the Trainer trains). :meth:`state_dict` and
    :meth:`load_state_dict` hold nothing: they tell Lightning that the loader resumes mid-epoch (it
    warns about loaders that do not, and expects a checkpoint's loaders to be as stateful as the
    resumed run's: every training loader of this project is one of these)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class StreamLoader(PositionedLoader, DataLoader):
    """A DataLoader over a stream that batches itself (``dataset.start`` is set to ``start()`` each
    time the loader is iterated, so a new epoch or a resumed run goes on from the consumed position).

    Args:
        dataset: the stream (an ``IterableDataset`` with a ``start`` attribute).
        start: returns where the next iteration starts; None keeps ``dataset.start``.
        **kwargs: DataLoader arguments (``num_workers``, ``pin_memory``, ...).
    """

    def __init__(self, dataset: IterableDataset, start: Callable[[], StreamStart] | None = None, **kwargs) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.start = start

    def __iter__(self):
        if self.start is not None:
            self.dataset.start = self.start()
        return super().__iter__()


def worker_positions(start: int, end: int | None) -> Iterator[int]:
    """The positions of [start, end) that this DataLoader worker yields: every ``num_workers``-th
    from ``start + worker id``. The DataLoader takes batches from its workers round-robin from
    worker 0, so they arrive in position order."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    position = start + worker
    while end is None or position < end:
        yield position
        position += workers


class IndexedBatches(IterableDataset):
    """Batches of a map-style dataset at positions: batch ``p`` of a rank is a pure function of
    (seed, p, rank, world size), so any iteration, on any number of workers, can start anywhere.

    Pass (data epoch) ``e`` orders the dataset by :func:`pass_order` (seed, e) and deals whole
    batches to the ranks in turn: batch ``b`` of pass ``e`` on rank ``r`` holds the samples at
    ``(b * world_size + r) * batch_size`` and after. A pass has ``len(dataset) // (batch_size *
    world_size)`` batches per rank (``len()``); the few samples left over are a different few each
    pass. An iteration yields the positions from ``start.batches`` to the end of that pass, each with
    ``batch["resume"] = {"position": p}``.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch.
        collate_fn: makes a batch (a dict) of a list of samples.
        seed: seed of the pass orders.
        rank: data-parallel rank.
        world_size: data-parallel size.
        shuffle: reorder each pass (else every pass is in dataset order).
    """

    def __init__(self, dataset: Dataset, batch_size: int, collate_fn: Callable[[list], dict], seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        super().__init__()
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"The dataset has {len(dataset)} samples, fewer than one batch of {batch_size} for each of "
                             f"{world_size} rank(s); lower batch_size or add samples.")
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.start = StreamStart()
        self._order: tuple[int, list[int]] | None = None  # (pass, its order): one shuffle per pass


    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def indices(self, position: int) -> list[int]:
        """Dataset indices of the batch at ``position``."""
        pass_index, batch = divmod(position, len(self))
        if self._order is None or self._order[0] != pass_index:
            self._order = (pass_index, pass_order(len(self.dataset), self.seed, pass_index, self.shuffle))
        first = (batch * self.world_size + self.rank) * self.batch_size
        return self._order[1][first:first + self.batch_size]

    def __iter__(self) -> Iterator[dict]:
        start = self.start.batches
        for position in worker_positions(start, (start // len(self) + 1) * len(self)):
            batch = self.collate_fn([self.dataset[i] for i in self.indices(position)])
            batch["resume"] = {"position": position}
            yield batch


__all__ = [
    "IndexedBatches", "PositionedLoader", "ResumableDataModule", "StreamLoader", "StreamStart", "TrainPosition", "data_parallel_rank",
    "pass_order", "worker_positions",
]
