"""Sprites scenes drawn while training: unlimited samples, the video rendered on the GPU.

No shards: DataLoader workers draw each batch's scenes with the generator of ``bindweave data
sprites`` (:mod:`bindweave.tasks.sprites.scenes`; sample *i* of a split and seed is the very scene
of the shards' sample *i*) and send their *layout* (background, sprite images, per-frame
positions, depth order; a few kB a sample) and their reference images; the datamodule draws the
frames on the training device after the transfer (:func:`render_frames`, bit-exact with
:func:`~bindweave.tasks.sprites.scenes.render`). References are rendered like the shards' (at
``reference_size``, random scale and offset) and fitted to the video size with the predict path's
:func:`~bindweave.model.batch.fit_reference`, so training sees what ``predict`` will.

Batch ``k`` of a run holds samples ``k·B … k·B + B − 1`` (per rank, interleaved): a pure function of
(split, seed, k), so a run resumed at step ``s`` continues with batch ``s`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bindweave.model.batch import fit_reference, to_model_batch
from bindweave.tasks.sprites.scenes import (ALL_BACKGROUNDS, SPLITS, Scene, SpritesConfig, boxes, draw_scene, prompt_of,
                                           render_sprite)


# -- rendering on a device ---------------------------------------------------------------------


def scene_layout(scenes: list[Scene], max_subjects: int) -> dict[str, torch.Tensor]:
    """What :func:`render_frames` draws, per scene: back-to-front layers of sprite images, masks and
    top-left corners per frame (host-side, numpy rendering of each sprite once).

    Returns ``background`` (B, 3) uint8, ``sprites`` (B, K, S, S, 3) uint8, ``masks`` (B, K, S, S)
    bool, ``x0``/``y0`` (B, K, F) long, ``present`` (B, K) bool; K = ``max_subjects``, S the sprite size.
    """
    size = scenes[0].sprite_size
    b, f = len(scenes), scenes[0].num_frames
    sprites = np.zeros((b, max_subjects, size, size, 3), np.uint8)
    masks = np.zeros((b, max_subjects, size, size), bool)
    corners = np.zeros((b, max_subjects, f, 2), np.int64)
    present = np.zeros((b, max_subjects), bool)
    for i, scene in enumerate(scenes):
        if scene.sprite_size != size or scene.num_frames != f:
            raise ValueError("Scenes of one batch must share their sprite size and frame count.")
        tracks = boxes(scene)
        order = sorted(range(len(scene.subjects)), key=lambda j: scene.subjects[j].depth)  # back to front
        for layer, j in enumerate(order):
            sprites[i, layer], masks[i, layer] = render_sprite(scene.subjects[j].appearance, size)
            corners[i, layer] = [box[:2] for box in tracks[j]]
            present[i, layer] = True
    background = np.array([ALL_BACKGROUNDS[s.background] for s in scenes], np.uint8)
    return {"background": torch.from_numpy(background), "sprites": torch.from_numpy(sprites),
            "masks": torch.from_numpy(masks), "x0": torch.from_numpy(corners[..., 0].copy()),
            "y0": torch.from_numpy(corners[..., 1].copy()), "present": torch.from_numpy(present)}


def render_frames(layout: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Frames (B, F, H, W, 3) uint8 of :func:`scene_layout`'s layers, on the layout's device: each
    layer pastes its sprite's masked pixels at its corner, clipped to the frame (as ``scenes._paste``)."""
    sprites, masks = layout["sprites"], layout["masks"]  # (B, K, S, S, 3), (B, K, S, S)
    b, k, s = sprites.shape[:3]
    f = layout["x0"].shape[2]
    device = sprites.device
    canvas = layout["background"][:, None, None, None, :].expand(b, f, height, width, 3).contiguous()  # (B, F, H, W, 3)
    ys, xs = torch.arange(height, device=device), torch.arange(width, device=device)
    for layer in range(k):
        ry = ys[None, None, :] - layout["y0"][:, layer, :, None]  # (B, F, H) row in the sprite
        rx = xs[None, None, :] - layout["x0"][:, layer, :, None]  # (B, F, W)
        inside = ((ry >= 0) & (ry < s))[..., :, None] & ((rx >= 0) & (rx < s))[..., None, :]  # (B, F, H, W)
        index = (ry.clamp(0, s - 1)[..., :, None] * s + rx.clamp(0, s - 1)[..., None, :]).reshape(b, -1)  # (B, F·H·W)
        mask = torch.gather(masks[:, layer].reshape(b, s * s), 1, index).view(b, f, height, width)  # (B, F, H, W)
        rgb = torch.gather(sprites[:, layer].reshape(b, s * s, 3), 1, index[..., None].expand(-1, -1, 3))
        draw = mask & inside & layout["present"][:, layer, None, None, None]  # (B, F, H, W)
        canvas = torch.where(draw[..., None], rgb.view(b, f, height, width, 3), canvas)
    return canvas


# -- scenes in batches -------------------------------------------------------------------------


@dataclass
class OnlineSprites(SpritesConfig):
    """Settings of the drawn scenes: the shards' :class:`~bindweave.tasks.sprites.scenes.SpritesConfig`
    (every field means the same; ``fps`` is unused while training), 32 × 32 frames by default.
    References are rendered at ``reference_size``, then fitted to the video size as ``predict`` fits a
    request's references."""

    height: int = 32
    width: int = 32


def draw_sample(split: str, seed: int, index: int, config: OnlineSprites) -> tuple[Scene, list[np.ndarray]]:
    """Sample ``index`` of (split, seed): the scene and its reference images, drawn as
    :func:`bindweave.tasks.sprites.scenes.make_sample` draws them (its :func:`draw_scene`)."""
    scene, references, _ = draw_scene(split, seed, index, config)
    return scene, references


def draw_batch(split: str, seed: int, indices: list[int], config: OnlineSprites) -> dict:
    """The host part of a batch: prompts, uint8 references fitted to the video size (B, N, 3, H, W),
    counts, ids and the scenes' :func:`scene_layout` under ``layout``."""
    scenes, refs = zip(*(draw_sample(split, seed, i, config) for i in indices))
    counts = [len(r) for r in refs]
    references = torch.zeros(len(indices), max(counts), 3, config.height, config.width, dtype=torch.uint8)
    for i, images in enumerate(refs):
        for j, image in enumerate(images):
            fitted = fit_reference(Image.fromarray(image), config.height, config.width)[0].numpy()  # (3, H, W) in [-1, 1]
            references[i, j] = torch.from_numpy(np.rint((fitted + 1) * 127.5).astype(np.uint8))  # the PIL pixels again
    return {"prompt": [prompt_of(s) for s in scenes], "references": references, "num_references": counts,
            "id": [f"sprites-{split}-{seed}-{i:06d}" for i in indices],
            "layout": scene_layout(list(scenes), config.max_subjects)}


class SpriteBatches(IterableDataset):
    """Batches ``start, start + 1, …`` (``count`` of them, None: without end) of (split, seed);
    DataLoader worker ``w`` of ``W`` draws batches ``w, w + W, …``, which the loader returns in order."""

    def __init__(self, split: str, seed: int, batch_size: int, config: OnlineSprites, start: int = 0,
                 count: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.split, self.seed, self.batch_size, self.config = split, seed, batch_size, config
        self.start, self.count, self.rank, self.world_size = start, count, rank, world_size

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)  # small tensors: one thread per worker, no oversubscription
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self.start + worker
        while self.count is None or k < self.start + self.count:
            first = (k * self.world_size + self.rank) * self.batch_size
            yield draw_batch(self.split, self.seed, list(range(first, first + self.batch_size)), self.config)
            k += workers


class SpritesDataModule(L.LightningDataModule):
    """Unlimited sprites scenes for ``fit``, drawn by the loader and rendered on the training device.

    Args:
        scenes: the scenes' settings.
        batch_size: samples per batch (per rank).
        num_workers: loader processes drawing scenes (0: in the main process).
        seed: seed of the training stream (another seed: other scenes of the same appearances).
        split: appearances to train on (``train``; the splits share none).
        val_split: split of the validation batches.
        val_batches: validation batches (fixed: samples 0… of ``val_split`` under ``seed``).
        render_on_device: draw frames on the training device after the transfer (else in the workers).
    """

    def __init__(self, scenes: OnlineSprites = OnlineSprites(), batch_size: int = 256, num_workers: int = 8,
                 seed: int = 0, split: str = "train", val_split: str = "val", val_batches: int = 1,
                 render_on_device: bool = True) -> None:
        super().__init__()
        for name in (split, val_split):
            if name not in SPLITS:
                raise ValueError(f"SpritesDataModule: split must be one of {list(SPLITS)}, got {name!r}.")
        self.scenes, self.batch_size, self.num_workers, self.seed = scenes, batch_size, num_workers, seed
        self.split, self.val_split, self.val_batches, self.render_on_device = split, val_split, val_batches, render_on_device

    def _loader(self, dataset: SpriteBatches, workers: int, persistent: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=persistent and workers > 0, prefetch_factor=4 if workers else None,
                          multiprocessing_context="spawn" if workers else None)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer is not None else 0  # resume: the next batch exactly
        rank, world = self._rank()
        return self._loader(SpriteBatches(self.split, self.seed, self.batch_size, self.scenes, start, None, rank, world),
                            self.num_workers)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        dataset = SpriteBatches(self.val_split, self.seed, self.batch_size, self.scenes, 0, self.val_batches, rank, world)
        # Validation comes back every val_check_interval steps: a freshly spawned worker each time kept an
        # H100 idle ~10 s per validation (~7.7 s to spawn one here, 0.46 s to draw a batch of 256 in-process).
        # A batch or two are drawn in-process; more by workers kept alive between validations.
        workers = 0 if self.val_batches <= 2 else min(self.num_workers, self.val_batches)
        return self._loader(dataset, workers, persistent=True)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if not self.render_on_device:
            batch["frames"] = render_frames(batch.pop("layout"), self.scenes.height, self.scenes.width)
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "layout" in batch:
            batch["frames"] = render_frames(batch.pop("layout"), self.scenes.height, self.scenes.width)
        return to_model_batch(batch)
