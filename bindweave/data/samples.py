"""One training sample from its webdataset fields: the clip decoded at the target fps, resized and
cropped to its aspect-ratio bucket, the references fitted onto the frame and augmented
(:class:`SampleDecoder`, :class:`ReferenceAugmentation`); batches of cached features."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

from bindweave.model.batch import check_num_frames, to_rgb  # noqa: F401  (to_model_batch: its home before)
from bindweave.data.feature_cache import collate_features, read_features
from bindweave.data.shards import MAX_REFERENCES, BrokenSample, parse_sample, read_image
from bindweave.data.video_decode import VideoDecodeError, decode_clip

log = logging.getLogger(__name__)

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
    into the clip's bucket on white, as ``bindweave.model.batch.fit_reference`` does for predict) and
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
    """``bindweave.model.batch.fit_reference`` in uint8 (3, H, W): the same resize and placement on white,
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
