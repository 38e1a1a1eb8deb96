"""BindWeavePipeline: a prompt and 1–4 reference images in, a video out, in one call.

    pipe = BindWeavePipeline.from_checkpoint("outputs/tiny/checkpoints/last.ckpt")
    video = pipe("the red circle moves left", references=["red_circle.png"], seed=0)
    video.save("red.mp4")

The pipeline wraps a built :class:`~bindweave.model.bindweave_model.BindWeaveModel` and its sampling settings; the
sampling itself is :func:`bindweave.inference.sampler.sample_videos`, the same code ``bindweave predict``
runs. Memory options (see ``SamplingConfig``): ``offload_encoders`` keeps the frozen encoders on the
CPU except while they run, ``vae_tiling``/``vae_slicing`` bound the decoder's activations, and
``dtype="bfloat16"`` stores the DiT and connector in bf16 (the encoders keep their configured dtype).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image

from bindweave.model.bindweave_model import BindWeaveModel
from bindweave.inference.requests import load_reference
from bindweave.inference.sampler import SamplingConfig, frozen_encoders, references_uint8, sample_videos
from bindweave.data.video_io import write_video
from bindweave.inference.pretrained import load_checkpoint, load_pretrained
from bindweave.training import lora
from bindweave.inference.outputs import contact_sheet, png_bytes, write_atomic, write_outputs
from encoders.base import FrozenEncoder, resolve_dtype


@dataclass
class GeneratedVideo:
    """One generated video and what reproduces it.

    Attributes:
        frames: (F, H, W, 3) uint8.
        references: (N, H, W, 3) uint8, the references as the model saw them (fitted to the size).
        request: prompt, reference paths, seed and size (a line for a predict requests JSONL).
        sampling: the sampling settings used.
        seconds: wall time of the call.
    """

    frames: torch.Tensor
    references: torch.Tensor
    request: dict
    sampling: SamplingConfig
    seconds: float

    def save(self, path: str | Path, fps: int = 16) -> Path:
        """Write the video as an H.264 mp4 (atomically)."""
        return write_video(path, self.frames, fps=fps)

    def save_contact_sheet(self, path: str | Path, max_frames: int = 8) -> Path:
        """Write references and evenly spaced frames side by side as a PNG (atomically)."""
        return write_atomic(Path(path), png_bytes(contact_sheet(self.frames, self.references, max_frames)))

    def save_all(self, output_dir: str | Path, name: str, fps: int = 16) -> Path:
        """``<name>.mp4``, ``<name>.png`` and ``<name>.json``, as ``bindweave predict`` writes them."""
        record = {"id": name, "request": self.request, "sampling": asdict(self.sampling), "seconds": self.seconds}
        return write_outputs(Path(output_dir), name, self.frames, self.references, record, fps)


class BindWeavePipeline:
    """Generate subject-consistent videos with a trained BindWeave.

    Args:
        model: the built network (the ``model`` of a trained :class:`~bindweave.training.module.BindWeave`).
        sampling: sampling settings; any field can be overridden per call.
    """

    def __init__(self, model: BindWeaveModel, sampling: SamplingConfig) -> None:
        if model.dit is None:
            raise ValueError("The model is not built: build it first (BindWeave.configure_model), or use "
                             "BindWeavePipeline.from_module / from_checkpoint / from_pretrained.")
        self.model = model.eval()
        self.sampling = replace(sampling)

    @classmethod
    def from_module(cls, module, sampling: SamplingConfig | None = None) -> "BindWeavePipeline":
        """The pipeline of a BindWeave LightningModule (built here if ``configure_model`` has not
        run): its ``model`` and a copy of its ``sampling`` settings (or ``sampling``)."""
        module.configure_model()
        return cls(module.model, sampling or module.sampling)

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, config: str | Path | dict | None = None, device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None, **sampling,
    ) -> "BindWeavePipeline":
        """Load a Lightning checkpoint written by ``bindweave fit``.

        Args:
            checkpoint: the ``.ckpt`` file.
            config: the model config (a YAML file with a ``model:`` section, or that section as a
                dict); default: the one stored in the checkpoint.
            device: where the model runs.
            dtype: dtype of the DiT and connector weights (e.g. ``"bfloat16"``); default: as trained.
            **sampling: ``SamplingConfig`` fields overriding the model's (e.g. ``num_steps=30``).
        """
        path = Path(checkpoint)
        if not path.is_file():
            raise ValueError(f"Checkpoint {str(path)!r} does not exist; pass the path of a .ckpt written by `bindweave fit`.")
        module = load_checkpoint(path, config)
        return cls(module.model, replace(module.sampling, **sampling)).to(device, dtype)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
        model_overrides: dict | None = None, **sampling,
    ) -> "BindWeavePipeline":
        """Load a folder written by :func:`bindweave.weights.export.save_pretrained` (safetensors + config).

        Args:
            directory: the export folder.
            device: where the model runs.
            dtype: dtype of the DiT and connector weights; default: as stored.
            model_overrides: entries replacing those of its config's ``model:`` section (e.g.
                encoder paths on this machine).
            **sampling: ``SamplingConfig`` fields overriding the model's.
        """
        # A dtype name loads the DiT weights straight into that dtype (no fp32 copy on the way).
        module = load_pretrained(directory, dtype=dtype if isinstance(dtype, str) else None,
                                 model_overrides=model_overrides)
        return cls(module.model, replace(module.sampling, **sampling)).to(device, dtype)

    # -- LoRA ----------------------------------------------------------------------------------

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Load a LoRA file (ours, diffusers, kohya/musubi or ComfyUI layout) as adapter ``name``
        (default: the file's stem), active beside those already loaded; returns its name. See
        :mod:`bindweave.training.lora`."""
        return lora.load_lora(self.model, path, scale, name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Scale LoRA ``name``'s effect (1.0 as trained, 0.0 off)."""
        lora.set_lora_scale(self.model, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove LoRA ``name`` (None: every loaded one)."""
        lora.unload_lora(self.model, name)

    # -- placement -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device the DiT runs on (encoders follow it while they run)."""
        return self.model.dit.patch_embedding.weight.device

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "BindWeavePipeline":
        """Move the model to ``device`` and cast the DiT and connector to ``dtype`` (frozen encoders
        keep their configured dtype). With ``offload_encoders`` the encoders stay on the CPU."""
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype)
        if dtype is not None:
            self.model.to(dtype=dtype)
        if device is not None:
            device = torch.device(device)
            if self.sampling.offload_encoders:
                _move_trainable(self.model, device)
            else:
                self.model.to(device)
        return self

    # -- generation ----------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str,
        references: list[str | Path | Image.Image] | str | Path | Image.Image = (),
        seed: int = 0,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        progress: bool = True,
        **sampling,
    ) -> GeneratedVideo:
        """Generate one video.

        Args:
            prompt: what happens in the video.
            references: 0–4 reference images (paths or PIL images), fitted into the video size.
            seed: noise seed; the same seed gives the same video on the same device.
            num_frames: frames (1 + 4k); default ``sampling.num_frames``.
            height: pixels, a multiple of the VAE stride × DiT patch; default ``sampling.height``.
            width: pixels, likewise; default ``sampling.width``.
            progress: show a progress bar over the denoising steps.
            **sampling: ``SamplingConfig`` fields for this call (``num_steps``, ``guidance_scale``,
                ``shift``, ``sampler``, memory options).
        """
        unknown = set(sampling) - {f.name for f in fields(SamplingConfig)}
        if unknown:
            raise TypeError(f"Unknown sampling option(s) {sorted(unknown)}; use fields of SamplingConfig.")
        config = replace(self.sampling, **sampling)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("The prompt is empty; describe the video (e.g. 'the red circle moves left').")
        num_frames = num_frames or config.num_frames
        height, width = height or config.height, width or config.width
        self.model.check_video(num_frames, height, width)
        if isinstance(references, (str, Path, Image.Image)):
            references = [references]
        images = []
        for i, reference in enumerate(references):
            try:
                images.append(load_reference(reference, height, width))  # (3, H, W)
            except ValueError as error:
                raise ValueError(f"Reference {i}: {error}") from None
        refs = torch.stack(images) if images else torch.zeros(0, 3, height, width)
        batch = {
            "prompt": [prompt], "references": refs[None].to(self.device), "num_references": [len(images)],
            "seed": [int(seed)], "num_frames": [num_frames], "height": [height], "width": [width],
        }
        start = time.perf_counter()
        frames = sample_videos(self.model, batch, config, progress=progress)[0]  # (F, H, W, 3)
        request = {
            "prompt": prompt,
            "references": [str(Path(r).resolve()) if isinstance(r, (str, Path)) else "<PIL image>" for r in references],
            "seed": int(seed), "num_frames": num_frames, "height": height, "width": width,
        }
        return GeneratedVideo(frames, references_uint8(batch["references"])[0], request, config,
                              time.perf_counter() - start)


def _move_trainable(module: torch.nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer outside the frozen encoders to ``device``."""
    encoders = frozen_encoders(module)

    def visit(m: torch.nn.Module) -> None:
        if isinstance(m, FrozenEncoder):
            return
        for parameter in m.parameters(recurse=False):
            parameter.data = parameter.data.to(device)
        for name, buffer in m.named_buffers(recurse=False):
            setattr(m, name, buffer.to(device))  # a registered buffer stays registered (and persistent or not)
        for child in m.children():
            visit(child)

    visit(module)
    for encoder in encoders:
        encoder.to("cpu")
