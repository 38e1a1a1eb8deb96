"""Writes the videos produced by ``predict`` to disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from bindweave.video_io import write_video


class VideoWriter(BasePredictionWriter):
    """Saves each predicted video as ``<output_dir>/<id>.mp4`` with a ``<id>.json`` of its request.

    Files are written atomically (temporary file + rename), so an interrupted run never leaves a
    truncated video behind.

    Args:
        output_dir: folder the videos are written to (created if missing); default
            ``<trainer.default_root_dir>/videos``.
        fps: frame rate of the written mp4 files.
    """

    def __init__(self, output_dir: str | None = None, fps: int = 16) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir else None
        self.fps = fps

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "videos"

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for i, sample_id in enumerate(prediction["id"]):
            write_video(self.output_dir / f"{sample_id}.mp4", prediction["video"][i], fps=self.fps)
            record = {key: value[i] for key, value in prediction.items() if key != "video"}
            tmp = self.output_dir / f".{sample_id}.json.tmp"
            tmp.write_text(json.dumps(record, indent=2, default=str))
            os.replace(tmp, self.output_dir / f"{sample_id}.json")
