"""Small clips, images and shards for the data tests (written with PyAV and PIL in tmp_path)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from bindweave.data.video_io import write_video

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TINY_SHARDS = str(ROOT / "configs" / "data" / "tiny-shards.yaml")
TINY_CACHED = str(ROOT / "configs" / "data" / "tiny-cached.yaml")


def level(frame: int) -> int:
    """Grey level of source frame ``frame`` in :func:`make_video` clips (tells frames apart)."""
    return 8 + 18 * frame


def make_video(path: Path, num_frames: int = 9, height: int = 32, width: int = 48, fps: int = 8, seed: int = 0) -> Path:
    """An mp4 whose frame i is grey ``level(i)`` with a bar of colour that moves (H.264, crf 18)."""
    frames = torch.empty(num_frames, height, width, 3, dtype=torch.uint8)
    colour = torch.tensor([(seed * 70) % 256, 200, (seed * 30) % 256], dtype=torch.uint8)
    for i in range(num_frames):
        frames[i] = level(i)
        x = (i * 4 + seed * 5) % max(1, width - 8)
        frames[i, height // 4 : height // 2, x : x + 8] = colour
    return write_video(path, frames, fps=fps)


def make_image(path: Path, size: tuple[int, int] = (30, 20), value: int = 100, mode: str = "RGB") -> Path:
    """A PNG/JPEG of ``size`` (width, height) with a gradient, so resizing shows."""
    w, h = size
    array = (np.arange(w)[None, :, None] * 3 + np.arange(h)[:, None, None] * 5 + value) % 256
    array = np.repeat(array, 3, axis=2).astype(np.uint8)
    image = Image.fromarray(array)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def make_clips(folder: Path, count: int = 4, num_frames: int = 9, fps: int = 8, sizes=None) -> Path:
    """``count`` clips with 1–3 references each (the first one with a subject mask) and a JSONL
    manifest ``manifest.jsonl`` of them; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        height, width = (sizes[i] if sizes else (32, 48))
        make_video(folder / f"clip{i}.mp4", num_frames, height, width, fps, seed=i)
        refs = [make_image(folder / f"clip{i}_ref{r}.png", (20 + 7 * r, 24), value=40 * r + i).name for r in range(1 + i % 3)]
        item = {"id": f"clip-{i}", "video": f"clip{i}.mp4", "references": refs, "prompt": f"subject {i} walks",
                "subjects": [f"subject{r}" for r in range(len(refs))]}
        if i == 0:
            mask = Image.new("L", (20, 24), 0)
            mask.paste(255, (5, 5, 15, 20))
            mask.save(folder / "clip0_mask0.png")
            item["masks"] = ["clip0_mask0.png"]
        lines.append(json.dumps(item))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def png_bytes(size=(20, 24), value=50) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A shard written as it is (no validation): samples are {"__key__", ext: bytes}."""
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def raw_sample(key: str, video: bytes, refs: int = 1, prompt: str | None = "a prompt", **extra) -> dict:
    """A raw sample's files; ``prompt=None`` leaves the key out of the record."""
    record = {"id": key, **({"prompt": prompt} if prompt is not None else {})}
    sample = {"__key__": key, "mp4": video, "json": json.dumps(record).encode()}
    sample.update({f"ref{i}.png": png_bytes(value=30 * i) for i in range(refs)})
    sample.update(extra)
    return sample
