"""What a generated video leaves on disk: mp4, contact-sheet PNG and JSON record, each written to
a temporary file and renamed (a crash never leaves half a file); the predict summary table.

Shared by ``bindweave predict`` (``callbacks.VideoWriter``) and :class:`bindweave.inference.pipeline.BindWeavePipeline`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from bindweave.atomic import write_atomic  # also importable from here, its home before bindweave.atomic
from bindweave.data.video_io import write_video


@runtime_checkable
class OutputLocation(Protocol):
    """A callback that writes predict outputs declares where (``callbacks.VideoWriter`` does), so a
    datamodule can skip requests already done there without knowing the callback's class."""

    def resolve_output_dir(self, trainer) -> Path:
        """The folder the outputs of ``trainer``'s predict run go to."""


# ----------------------------------------------------------------------------------------------
# Files (each written whole or not at all: bindweave.atomic)
# ----------------------------------------------------------------------------------------------


def to_json(value: object) -> str:
    """JSON of records holding dataclasses, paths, dtypes and tensors (as lists)."""

    def default(v: object) -> object:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return dataclasses.asdict(v)
        if isinstance(v, torch.Tensor):
            return v.tolist()
        return str(v)

    return json.dumps(value, indent=2, default=default)


def contact_sheet(
    frames: torch.Tensor, references: torch.Tensor | None = None, max_frames: int = 8, tile_height: int = 256,
    gap: int = 8, min_tile_height: int = 128,
) -> np.ndarray:
    """References and evenly spaced frames side by side in one row, as (H', W', 3) uint8.

    Args:
        frames: (F, H, W, 3) uint8 video.
        references: (N, H, W, 3) uint8 reference images, or None.
        max_frames: frames shown (first and last always among them).
        tile_height: tiles taller than this are scaled down to it (bicubic).
        gap: pixels between tiles (a double gap separates references from frames).
        min_tile_height: frames shorter than this are enlarged by a whole factor, pixel for pixel
            (a 32 × 32 video is shown 128 × 128: its pixels visible, none invented).
    """
    count = min(max_frames, frames.shape[0])
    picks = torch.linspace(0, frames.shape[0] - 1, count).round().long().unique()
    height, width = frames.shape[1:3]
    if height < min_tile_height:
        factor = -(-min_tile_height // height)  # ceil: whole pixels
        size = (width * factor, height * factor)
    else:
        scale = min(1.0, tile_height / height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))

    def fit(image: torch.Tensor) -> np.ndarray:  # (h, w, 3) -> (size[1], size[0], 3): enlarged pixel for pixel, shrunk bicubic
        resample = Image.Resampling.NEAREST if image.shape[0] < size[1] else Image.Resampling.BICUBIC
        return np.asarray(Image.fromarray(image.numpy()).resize(size, resample))

    tiles = [fit(t) for t in frames[picks]]
    refs = [] if references is None else [fit(r) for r in references]
    columns = refs + tiles
    sheet_width = len(columns) * size[0] + (len(columns) + 1) * gap + (gap if refs else 0)
    sheet = np.full((size[1] + 2 * gap, sheet_width, 3), 255, dtype=np.uint8)
    x = gap
    for i, tile in enumerate(columns):
        if refs and i == len(refs):
            x += gap  # wider gap between references and frames
        sheet[gap : gap + size[1], x : x + size[0]] = tile
        x += size[0] + gap
    return sheet


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an (H, W, 3) uint8 image."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_outputs(
    output_dir: Path, sample_id: str, frames: torch.Tensor, references: torch.Tensor | None, record: dict,
    fps: int = 16, sheet_frames: int = 8,
) -> Path:
    """``<id>.mp4``, ``<id>.png`` (contact sheet) and, last, ``<id>.json`` (``record``): a request
    counts as done once its json exists. Returns the mp4 path."""
    output_dir = Path(output_dir)
    video = write_video(output_dir / f"{sample_id}.mp4", frames, fps=fps)
    write_atomic(output_dir / f"{sample_id}.png", png_bytes(contact_sheet(frames, references, sheet_frames)))
    write_atomic(output_dir / f"{sample_id}.json", to_json(record).encode())
    (output_dir / f"{sample_id}.error.json").unlink(missing_ok=True)
    return video


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    """A Markdown table of ``rows`` (dicts) over ``columns``."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


# ----------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------
