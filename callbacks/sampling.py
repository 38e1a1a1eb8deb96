"""Sample videos for fixed requests every N steps of ``fit``: files on disk, and videos to whatever
loggers the trainer has (TensorBoard, Weights & Biases, MLflow; CSV and others get the files)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from PIL import Image
from torch.utils.tensorboard.writer import FileWriter

from bindweave.model.batch import collate
from bindweave.inference.requests import RequestDataset, collate_requests
from bindweave.inference.sampler import references_uint8, request_records
from callbacks.metrics import predict_batch_of
from callbacks.video_writer import contact_sheet, write_outputs

_SHARDED = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)


def gif_summary(tag: str, frames: torch.Tensor, fps: int):
    """A TensorBoard image summary holding an animated GIF of (F, H, W, 3) uint8 frames (what
    ``SummaryWriter.add_video`` writes, without its moviepy dependency)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    images = [Image.fromarray(f.numpy()) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                   loop=0)
    height, width = frames.shape[1:3]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def unbatch(batch: dict) -> list[dict]:
    """Split a collated batch into samples (references trimmed to each sample's count)."""
    size = len(batch["prompt"])
    samples = []
    for i in range(size):
        sample = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size:
                sample[key] = value[i]
            elif isinstance(value, (list, tuple)) and len(value) == size:
                sample[key] = value[i]
        sample["references"] = sample["references"][: int(batch["num_references"][i])]
        sample.pop("num_references", None)
        samples.append(sample)
    return samples


class SamplingCallback(Callback):
    """Every ``every_n_steps`` optimizer steps of ``fit``, generate videos for fixed requests and
    write them to ``<output_dir>/step-<step>/<id>.mp4|png|json`` and to TensorBoard (an animated
    GIF and the contact sheet per request, under ``samples/<id>``).

    Only global rank zero generates and writes, unless the model is sharded (FSDP, DeepSpeed,
    ModelParallel), where every rank must take part in the DiT's forward and rank zero writes.
    The global RNG state is restored afterwards, so sampling does not change training.

    Args:
        every_n_steps: sampling period in optimizer steps.
        requests: a JSONL file of fixed requests (see :mod:`bindweave.inference.requests`); default: the
            first ``num_samples`` validation samples (prompt, references, seed) at their own size.
        num_samples: validation samples used when ``requests`` is None.
        sampling: overrides of the model's sampling settings (e.g. ``{num_steps: 20}``).
        output_dir: default ``<trainer.log_dir or default_root_dir>/samples``.
        fps: frame rate of the written videos.
        at_start: also sample before the first step (the untrained baseline).

    A model that trains from a feature cache (``model.feature_cache``) gets its frozen encoders
    built at the first sampling (:meth:`BindWeave.attach_encoders`) and needs ``requests``.
    """

    def __init__(self, every_n_steps: int = 500, requests: str | None = None, num_samples: int = 2,
                 sampling: dict | None = None, output_dir: str | None = None, fps: int = 16,
                 at_start: bool = False) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.every_n_steps, self.requests, self.num_samples = every_n_steps, requests, num_samples
        self.overrides = dict(sampling or {})
        self.output_dir = Path(output_dir) if output_dir else None
        self.fps, self.at_start = fps, at_start
        self.batch: dict | None = None
        self.last_step: int | None = None
        self.written: list[Path] = []

    def _fixed_batch(self, trainer, pl_module) -> dict:
        """The fixed requests, loaded once."""
        if self.batch is not None:
            return self.batch
        if self.requests is not None:
            s = pl_module.sampling
            dataset = RequestDataset(self.requests, s.num_frames, s.height, s.width)
            batch = collate_requests([dataset[i] for i in range(len(dataset))])
            if batch["failed"]:
                raise ValueError("SamplingCallback: bad requests in "
                                 f"{self.requests}: " + "; ".join(f["error"] for f in batch["failed"]))
        else:
            datamodule = trainer.datamodule
            if datamodule is None:
                raise ValueError("SamplingCallback needs `requests` (a JSONL file) when fit has no datamodule.")
            loader = datamodule.val_dataloader() if is_overridden("val_dataloader", datamodule) else datamodule.train_dataloader()
            samples: list[dict] = []
            for raw in loader:
                samples += unbatch(predict_batch_of(raw, self.num_samples - len(samples)))
                if len(samples) >= self.num_samples:
                    break
            batch = collate(samples)
        batch.pop("failed", None)
        if "seed" not in batch:
            batch["seed"] = list(range(len(batch["prompt"])))
        self.batch = batch
        return batch

    def on_train_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "feature_cache", None) is not None:  # cached samples hold no pixels
            if self.requests is None:
                raise ValueError("SamplingCallback: the model trains from a feature cache, whose samples hold no "
                                 "pixels to sample from; give `requests` (a JSONL file, e.g. the validation split's "
                                 "requests.jsonl written by `bindweave data sprites`).")
            if isinstance(trainer.strategy, _SHARDED):
                raise ValueError("SamplingCallback cannot build the encoders of a sharded model that trains from a "
                                 "feature cache; drop the callback and sample after training (`bindweave predict`).")
        if self.at_start:
            self.sample(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.sample(trainer, pl_module)

    def sample(self, trainer, pl_module) -> None:
        """Generate the fixed requests now and log them at the current global step."""
        step = self.last_step = trainer.global_step
        if not (trainer.is_global_zero or isinstance(trainer.strategy, _SHARDED)):
            return
        config = replace(pl_module.sampling, **self.overrides)
        if getattr(pl_module, "feature_cache", None) is not None and pl_module.attach_encoders():
            rank_zero_info("SamplingCallback: built the frozen encoders of the cache-trained model for sampling.")
        was_training = pl_module.training
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        pl_module.eval()
        try:
            # Loading the requests (a DataLoader draws a seed) and sampling leave the RNG as it was.
            with torch.random.fork_rng(devices=devices):
                batch = move_data_to_device(self._fixed_batch(trainer, pl_module), pl_module.device)
                frames = pl_module.generate(batch, config)  # (B, F, H, W, 3) uint8
        finally:
            pl_module.train(was_training)
        if trainer.is_global_zero:
            self._write(trainer, batch, frames, config, step)

    def _write(self, trainer, batch: dict, frames: torch.Tensor, config, step: int) -> None:
        root = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        ids = [str(i) for i in (batch.get("id") or [f"sample-{i}" for i in range(len(frames))])]
        records = request_records(batch, config, ids)
        references = references_uint8(batch["references"])
        for i, sample_id in enumerate(ids):
            refs = references[i][: int(batch["num_references"][i])]
            record = {"id": sample_id, "step": step, "request": records[i], "sampling": config}
            written = write_outputs(root / f"step-{step:07d}", sample_id, frames[i], refs, record, self.fps)
            self.written.append(written)
            for logger in trainer.loggers:
                log_video(logger, f"samples/{sample_id}", frames[i], contact_sheet(frames[i], refs), written, step,
                          self.fps)


_GIF_WRITERS: dict[str, FileWriter] = {}


def _gif_writer(logdir: str) -> FileWriter:
    """One event-file writer per TensorBoard log dir for the sample GIFs (TensorBoard reads every
    event file of a run's folder)."""
    if logdir not in _GIF_WRITERS:
        _GIF_WRITERS[logdir] = FileWriter(logdir, filename_suffix=".samples")
    return _GIF_WRITERS[logdir]


def log_video(logger: Logger, tag: str, frames: torch.Tensor, sheet, files: Path, step: int, fps: int) -> str:
    """Give one sample video to ``logger`` through its public API; returns how (``tensorboard``,
    ``wandb``, ``mlflow`` or ``files``: loggers without media, e.g. CSV, have the files written
    under the log dir).

    Args:
        logger: a Lightning logger.
        tag: name of the video (``samples/<id>``).
        frames: (F, H, W, 3) uint8.
        sheet: the contact sheet, (H', W', 3) uint8 (references, then frames).
        files: the mp4 written for it (``.png`` and ``.json`` beside it).
        step: the global step.
        fps: frame rate.
    """
    if isinstance(logger, TensorBoardLogger):
        writer = logger.experiment  # torch's SummaryWriter: add_video needs moviepy, so the GIF goes in directly,
        gifs = _gif_writer(writer.get_logdir())  # through torch's public FileWriter (an event file of its own)
        gifs.add_summary(gif_summary(tag, frames, fps), step)
        gifs.flush()
        writer.add_image(f"{tag}/sheet", sheet, step, dataformats="HWC")
        return "tensorboard"
    kind = type(logger).__name__
    if kind == "WandbLogger":  # lightning.pytorch.loggers.WandbLogger, imported only when wandb is there
        import wandb

        if files.is_file():  # the mp4 as written: wandb needs moviepy only to encode raw frames
            video = wandb.Video(str(files), format="mp4")
        else:
            video = wandb.Video(frames.permute(0, 3, 1, 2).numpy(), fps=fps, format="gif")  # (F, 3, H, W)
        logger.experiment.log({tag: video,
                               f"{tag}/sheet": wandb.Image(sheet.numpy() if hasattr(sheet, "numpy") else sheet),
                               "trainer/global_step": step})
        return "wandb"
    if kind == "MLFlowLogger":
        folder = f"samples/step-{step:07d}"
        for suffix in (".mp4", ".png", ".json"):
            path = files.with_suffix(suffix)
            if path.is_file():
                logger.experiment.log_artifact(logger.run_id, str(path), folder)
        return "mlflow"
    return "files"
