"""A small synthetic subject-to-video datamodule: coloured shapes that move as the prompt says.

Deterministic from a seed, needs no files: it is what ``configs/tiny.yaml`` trains on, so the whole
pipeline (encoders, conditioners, DiT, loss, sampler, video writing) runs on a CPU in seconds.
Training batches are positioned (:class:`bindweave.data.resume.IndexedBatches`): a run resumed from a
checkpoint reads exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import DataLoader, Dataset

from bindweave.model.batch import check_num_frames, collate
from bindweave.data.resume import IndexedBatches, ResumableDataModule, StreamLoader, data_parallel_rank

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "cyan": (40, 200, 210), "black": (20, 20, 20),
}
SHAPES = ("square", "circle")
MOTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
BACKGROUND = (128, 128, 128)


def _draw(canvas: torch.Tensor, shape: str, colour: tuple[int, int, int], cy: float, cx: float, size: float) -> None:
    """Paint a shape of ``size`` pixels centred at (cy, cx) on a (3, H, W) uint8-valued canvas."""
    h, w = canvas.shape[1:]
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    if shape == "square":
        inside = ((ys - cy).abs() <= size / 2) & ((xs - cx).abs() <= size / 2)
    else:
        inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= (size / 2) ** 2
    canvas[:, inside] = torch.tensor(colour, dtype=canvas.dtype)[:, None]


class SyntheticSubjects(Dataset):
    """Samples of 1..max_references shapes; the prompt names each subject's colour, shape and motion.

    Args:
        num_samples: dataset length.
        num_frames: frames per video (1 + 4k).
        height: frame height in pixels.
        width: frame width in pixels.
        max_references: most subjects (and reference images) per sample.
        seed: base seed; sample i is a pure function of (seed, i).
        with_video: render the target video (False for predict requests).
    """

    def __init__(
        self, num_samples: int, num_frames: int, height: int, width: int, max_references: int, seed: int, with_video: bool = True
    ) -> None:
        check_num_frames(num_frames)
        self.num_samples, self.num_frames, self.height, self.width = num_samples, num_frames, height, width
        self.max_references, self.seed, self.with_video = max_references, seed, with_video

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        h, w, f = self.height, self.width, self.num_frames
        size = max(3.0, min(h, w) / 4)
        subjects, phrases = [], []
        for colour in rng.sample(sorted(COLOURS), rng.randint(1, self.max_references)):
            shape, motion = rng.choice(SHAPES), rng.choice(sorted(MOTIONS))
            start = (rng.uniform(size, h - size), rng.uniform(size, w - size))
            subjects.append((shape, COLOURS[colour], start, MOTIONS[motion]))
            phrases.append(f"the {colour} {shape} moves {motion}")
        sample = {"prompt": " and ".join(phrases), "id": f"synthetic-{self.seed}-{index:06d}", "seed": index, "fps": 8}

        references = torch.full((len(subjects), 3, h, w), 255.0)
        for i, (shape, colour, _, _) in enumerate(subjects):
            _draw(references[i], shape, colour, h / 2, w / 2, size * 1.5)
        sample["references"] = references / 127.5 - 1.0  # (n, 3, H, W)

        if self.with_video:
            video = torch.empty(3, f, h, w)
            speed = (min(h, w) / 2) / max(1, f - 1)
            for t in range(f):
                frame = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None].repeat(1, h, w)
                for shape, colour, (y0, x0), (dy, dx) in subjects:
                    _draw(frame, shape, colour, y0 + dy * speed * t, x0 + dx * speed * t, size)
                video[:, t] = frame
            sample["video"] = video / 127.5 - 1.0  # (3, F, H, W)
        else:
            sample.update(num_frames=f, height=h, width=w)
        return sample


class SyntheticDataModule(ResumableDataModule):
    """Synthetic shapes-that-move data for smoke tests and the tiny config.

    Training passes are reshuffled by (seed, pass) and split over data-parallel ranks by the
    datamodule itself (:class:`bindweave.data.resume.IndexedBatches`: ``num_samples // (batch_size x
    ranks)`` batches per rank and epoch); the position is kept in checkpoints.

    Args:
        num_samples: training samples per epoch.
        num_val_samples: validation samples.
        num_predict_samples: predict requests (prompt + references, no video).
        num_frames: frames per video (1 + 4k).
        height: frame height in pixels.
        width: frame width in pixels.
        max_references: most subjects/references per sample.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        seed: base seed of the samples and the training order (validation and predict use
            seed + 1 and seed + 2).
    """

    def __init__(
        self,
        num_samples: int = 64,
        num_val_samples: int = 8,
        num_predict_samples: int = 2,
        num_frames: int = 5,
        height: int = 32,
        width: int = 32,
        max_references: int = 2,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        common = dict(num_frames=num_frames, height=height, width=width, max_references=max_references)
        self.train_set = SyntheticSubjects(num_samples, seed=seed, **common)
        self.val_set = SyntheticSubjects(num_val_samples, seed=seed + 1, **common)
        self.predict_set = SyntheticSubjects(num_predict_samples, seed=seed + 2, with_video=False, **common)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers, collate_fn=collate)

    def train_dataloader(self) -> StreamLoader:
        rank, world = data_parallel_rank(self.trainer)
        batches = IndexedBatches(self.train_set, self.hparams.batch_size, collate, self.hparams.seed, rank, world)
        return StreamLoader(batches, self._start, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)
