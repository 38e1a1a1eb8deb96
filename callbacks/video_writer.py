"""Writes the videos produced by ``predict`` to disk: mp4, contact sheet, reproduction record, summary."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from bindweave.inference.outputs import write_atomic, to_json, contact_sheet, png_bytes, write_outputs, format_table  # noqa: F401  (their home before bindweave.inference.outputs)

log = logging.getLogger(__name__)


class VideoWriter(BasePredictionWriter):
    """Saves each predicted video with what reproduces it, and prints a summary at the end.

    Per request: ``<id>.mp4``; ``<id>.png``, a contact sheet of the references and evenly spaced
    frames side by side; ``<id>.json`` with the request (a line for a requests JSONL), the sampling
    settings, the checkpoint and model config, versions, device and time taken. A request that
    failed gets ``<id>.error.json`` with its error instead. Every file is written atomically
    (temporary file + rename), the json last, so an interrupted run never leaves a truncated video
    and a rerun (``RequestDataModule(skip_done=True)``) skips exactly the finished requests.
    At the end, a table of every request (done, failed, skipped) and the warnings about requests'
    references (a CMYK image converted, a tiny image enlarged: ``warnings`` in ``<id>.json`` too)
    are printed and saved as ``summary.md``. When every request was already done, one line says so
    and ``summary.md`` is rewritten with the skipped requests.

    Args:
        output_dir: folder the videos are written to (created if missing); default
            ``<trainer.default_root_dir>/videos``.
        fps: frame rate of the written mp4 files.
        sheet_frames: frames shown on the contact sheet.
    """

    def __init__(self, output_dir: str | None = None, fps: int = 16, sheet_frames: int = 8) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir else None
        self.fps = fps
        self.sheet_frames = sheet_frames
        self.rows: list[dict] = []

    def resolve_output_dir(self, trainer) -> Path:
        """The output folder (``output_dir``, else ``<default_root_dir>/videos``)."""
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "videos"
        return self.output_dir

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.resolve_output_dir(trainer)

    def on_predict_start(self, trainer, pl_module) -> None:
        self.rows = []

    def _context(self, trainer, pl_module) -> dict:
        import lightning

        dit = getattr(pl_module, "dit", None)
        hparams = {k: v for k, v in dict(getattr(pl_module, "hparams", {})).items() if not k.startswith("_")}
        return {
            "checkpoint": str(Path(trainer.ckpt_path).resolve()) if trainer.ckpt_path else None,
            "model_config": hparams,
            "environment": {
                "torch": torch.__version__, "lightning": lightning.__version__,
                "device": str(pl_module.device),
                "dit_dtype": str(dit.patch_embedding.weight.dtype) if dit is not None else None,
                "precision": str(trainer.precision),
            },
        }

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        context = self._context(trainer, pl_module)
        for i, sample_id in enumerate(prediction["id"]):
            frames = prediction["video"][i]  # (F, H, W, 3) uint8
            references = None
            if prediction.get("references") is not None:
                references = prediction["references"][i][: prediction["num_references"][i]]  # (n, H, W, 3)
            request = prediction["request"][i] if "request" in prediction else {
                k: prediction[k][i] for k in ("prompt", "seed") if k in prediction
            }
            seconds = prediction["seconds"][i] if "seconds" in prediction else None
            warnings = list(prediction["warnings"][i]) if "warnings" in prediction else []
            record = {
                "id": sample_id, "request": request, "warnings": warnings, "sampling": prediction.get("sampling"),
                "seconds": seconds, "files": {"video": f"{sample_id}.mp4", "contact_sheet": f"{sample_id}.png"},
                **context,
            }
            path = write_outputs(self.output_dir, sample_id, frames, references, record, self.fps, self.sheet_frames)
            self.rows.append({
                "id": sample_id, "status": "done", "video": "x".join(str(s) for s in frames.shape[:3]),
                "seconds": f"{seconds:.2f}" if seconds is not None else "", "output": path.name,
                "warnings": warnings,
            })
        for failure in prediction.get("failed", []):
            log.warning("Predict: %s", failure["error"])
            if _safe(failure["id"]):
                write_atomic(self.output_dir / f"{failure['id']}.error.json", to_json(failure).encode())
            self.rows.append({"id": failure["id"], "status": "FAILED", "output": failure["error"]})

    def on_predict_end(self, trainer, pl_module) -> None:
        skipped = list(getattr(trainer.datamodule, "skipped", []) or []) if trainer.datamodule is not None else []
        rows = self.rows + [{"id": s, "status": "skipped", "output": "already done"} for s in skipped]
        if not rows:
            return
        counts = {status: sum(r["status"] == status for r in rows) for status in ("done", "FAILED", "skipped")}
        warned = [r for r in rows if r.get("warnings")]
        if counts["skipped"] == len(rows):
            title = f"all {len(rows)} already done"
        else:
            title = ", ".join(f"{n} {status.lower()}" for status, n in counts.items() if n)
            title += f", {len(warned)} with warnings" if warned else ""
        table = format_table(rows, ("id", "status", "video", "seconds", "output"))
        notes = "".join(f"- {r['id']}: {'; '.join(r['warnings'])}\n" for r in warned)
        notes = f"\nWarnings:\n{notes}" if notes else ""
        suffix = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        summary = f"# Predict: {title}\n\n{table}\n{notes}"
        summary = write_atomic(self.output_dir / f"summary{suffix}.md", summary.encode())
        if counts["skipped"] == len(rows):
            print(f"Predict: {title} in {self.output_dir}, nothing to generate (--data.skip_done false redoes "
                  f"them); {summary.name} rewritten.", flush=True)
        else:
            print(f"\nPredict summary ({title}) -> {self.output_dir}\n{table}\n{notes}", end="", flush=True)


def _safe(name: str) -> bool:
    """Whether a request id can name a file in the output folder."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")
