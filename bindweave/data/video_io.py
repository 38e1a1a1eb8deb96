"""Writing videos to disk atomically (a crash never leaves a half-written file behind), and reading them whole."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import torch

from bindweave.atomic import AtomicPath
from bindweave.data.video_decode import frame_to_rgb


def write_video(path: str | Path, frames: torch.Tensor, fps: int = 16, crf: int = 18) -> Path:
    """Encode (F, H, W, 3) uint8 frames to an H.264 mp4 at ``path``, via a temporary file + rename."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {tuple(frames.shape)} {frames.dtype}.")
    path = Path(path)
    height, width = frames.shape[1:3]
    # yuv420p needs even sizes; pad by edge replication rather than failing.
    pad_h, pad_w = height % 2, width % 2
    array = np.ascontiguousarray(frames.cpu().numpy())
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with AtomicPath(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = array.shape[2], array.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in array:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def read_video(source: str | Path | bytes) -> torch.Tensor:
    """Decode a whole video (a file or its bytes) to (F, H, W, 3) uint8 (tests, inspection, metrics)."""
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
        frames = [frame_to_rgb(f) for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames))
