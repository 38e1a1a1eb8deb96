"""BindWeavePipeline: a prompt and 1–4 reference images in, a video out, in one call.

    pipe = BindWeavePipeline.from_checkpoint("outputs/tiny/checkpoints/last.ckpt")
    video = pipe("the red circle moves left", references=["red_circle.png"], seed=0)
    video.save("red.mp4")

The call follows diffusers' ``WanPipeline`` (``negative_prompt``, ``num_inference_steps``,
``guidance_scale``, ``generator``, ``num_videos_per_prompt``, ``callback_on_step_end``,
``output_type="np"|"pt"|"pil"``; a list of prompts is one batch); BindWeave's own names
(``num_steps``, ``seed``, ``sampler``, ...) work as well.

The pipeline wraps a built :class:`~bindweave.model.bindweave_model.BindWeaveModel` and its sampling settings; the
sampling itself is :func:`bindweave.inference.sampler.sample_videos`, the same code ``bindweave predict``
runs. Memory options (see ``SamplingConfig``): ``offload_encoders`` keeps the frozen encoders on the
CPU except while they run, ``vae_tiling``/``vae_slicing`` bound the decoder's activations, and
``dtype="bfloat16"`` stores the DiT and connector in bf16 (the encoders keep their configured dtype).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from bindweave.model.bindweave_model import BindWeaveModel
from bindweave.inference.requests import load_reference_and_mask
from bindweave.inference.dit_offload import apply_dit_offload
from bindweave.inference.sampler import SamplingConfig, pretrained_encoders, references_uint8, sample_videos
from bindweave.data.video_io import write_video
from bindweave.inference.pretrained import load_checkpoint, load_pretrained
from bindweave.training import lora
from bindweave.inference.outputs import contact_sheet, png_bytes, write_atomic, write_outputs
from encoders.base import resolve_dtype

ReferenceImage = str | Path | Image.Image
"""A reference image: a path or a PIL image."""


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
        keep their configured dtype). With ``offload_encoders`` the encoders stay on the CPU; with
        ``dit_offload`` (on a GPU) so do the DiT's blocks, offloaded right away: a model larger than
        the card never has to fit on it whole."""
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype)
        if dtype is not None:
            self.model.to(dtype=dtype)
        if device is not None:
            device = torch.device(device)
            stay = list(pretrained_encoders(self.model)) if self.sampling.offload_encoders else []
            offload_blocks = self.sampling.dit_offload is not None and device.type == "cuda"
            if offload_blocks:
                stay.append(self.model.dit.blocks)
            if stay:
                _move_except(self.model, device, stay)
            else:
                self.model.to(device)
            if offload_blocks:
                apply_dit_offload(self.model.dit, device, self.sampling.dit_offload)
        return self

    # -- generation ----------------------------------------------------------------------------

    _callback_tensor_inputs = ["latents"]
    """What ``callback_on_step_end_tensor_inputs`` may name (diffusers' convention)."""

    def __call__(
        self,
        prompt: str | list[str],
        references: ReferenceImage | list[ReferenceImage] | list[list[ReferenceImage]] = (),
        *,
        negative_prompt: str | list[str | None] | None = None,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_videos_per_prompt: int = 1,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        output_type: str | None = None,
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        progress: bool = True,
        **sampling,
    ):
        """Generate videos; the arguments mean what they mean in diffusers' ``WanPipeline``.

        Args:
            prompt: what happens in the video; a list of prompts is sampled as one batch.
            references: 0–4 reference images (paths or PIL images), fitted into the video size, shared
                by every prompt; or, for a list of prompts, a list of such lists, one per prompt.
            negative_prompt: what the unconditional side of classifier-free guidance reads instead
                of the model's default (one for all prompts, or one per prompt; None: the default).
                Ignored without guidance (``guidance_scale`` 1).
            seed: noise seed; video k of the call uses ``seed + k`` (or ``seed[k]`` for a list);
                default 0. The same seed gives the same video on the same device.
            generator: instead of ``seed``: a ``torch.Generator`` (or one per video) from which each
                video's seed is drawn, so repeated calls with one generator give new videos and a
                re-seeded generator gives the same ones. The seeds drawn are in ``request``.
            num_videos_per_prompt: videos per prompt, each with its own seed.
            num_frames: frames (1 + 4k); default ``sampling.num_frames``.
            height: pixels, a multiple of the VAE stride × DiT patch; default ``sampling.height``.
            width: pixels, likewise; default ``sampling.width``.
            num_inference_steps: denoising steps (BindWeave's name: ``num_steps``).
            guidance_scale: classifier-free guidance scale; 1 switches the unconditional pass off.
            output_type: ``None`` (default): :class:`GeneratedVideo` objects (uint8 frames, saving
                helpers). As in diffusers: ``"np"`` float32 (B, F, H, W, 3) in [0, 1], ``"pt"``
                float32 (B, F, 3, H, W) in [0, 1], ``"pil"`` a list of lists of PIL images.
            return_dict: with an ``output_type``, a :class:`BindWeavePipelineOutput` (``frames``,
                and ``videos``: the :class:`GeneratedVideo` objects); False gives ``(frames,)``.
            callback_on_step_end: ``callback(pipe, i, t, callback_kwargs)`` after each denoising
                step; ``callback_kwargs`` holds the tensors named by
                ``callback_on_step_end_tensor_inputs`` (``latents``: (B, z, T, h, w) float32); a
                ``latents`` entry in the dict it returns replaces the latents.
            callback_on_step_end_tensor_inputs: tensors given to the callback (default ``["latents"]``).
            progress: show a progress bar over the denoising steps.
            **sampling: ``SamplingConfig`` fields for this call (``num_steps``, ``shift``,
                ``sampler``, memory options).

        Returns:
            ``output_type=None``: a :class:`GeneratedVideo` for one prompt string and one video, a
            list of them otherwise. Else :class:`BindWeavePipelineOutput` or ``(frames,)``.
        """
        unknown = set(sampling) - {f.name for f in fields(SamplingConfig)}
        if unknown:
            raise TypeError(f"Unknown sampling option(s) {sorted(unknown)}; use fields of SamplingConfig.")
        if num_inference_steps is not None:
            if sampling.get("num_steps", num_inference_steps) != num_inference_steps:
                raise ValueError(f"num_inference_steps={num_inference_steps} and num_steps={sampling['num_steps']} "
                                 f"disagree; pass one of them.")
            sampling["num_steps"] = num_inference_steps
        if guidance_scale is not None:
            sampling["guidance_scale"] = guidance_scale
        config = replace(self.sampling, **sampling)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: use one of {list(OUTPUT_TYPES)}.")
        tensor_inputs = _callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                         self._callback_tensor_inputs)

        # 1. The videos asked for: (prompt, references, negative prompt, seed) each.
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("The prompt is empty; describe the video (e.g. 'the red circle moves left').")
        per_prompt_refs = _per_prompt(references, len(prompts))
        negatives = _expand("negative_prompt", negative_prompt, len(prompts))
        if num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}.")
        n = num_videos_per_prompt
        prompts = [p for p in prompts for _ in range(n)]
        per_prompt_refs = [r for r in per_prompt_refs for _ in range(n)]
        negatives = [q for q in negatives for _ in range(n)]
        seeds = _seeds(seed, generator, len(prompts))

        num_frames = num_frames or config.num_frames
        height, width = height or config.height, width or config.width
        self.model.check_video(num_frames, height, width)
        note = self.model.size_warning(num_frames, height, width, (self.sampling.num_frames, self.sampling.height,
                                                                   self.sampling.width))
        if note:
            warnings.warn(note, UserWarning, stacklevel=2)
        loaded = [_load_references(refs, height, width, config.reference_canvas) for refs in per_prompt_refs]
        most = max(images.shape[0] for images, _ in loaded)
        refs = torch.zeros(len(loaded), most, 3, height, width)  # (B, N, 3, H, W), zero-padded
        masks = torch.zeros(len(loaded), most, height, width, dtype=torch.bool)  # (B, N, H, W)
        for i, (images, image_masks) in enumerate(loaded):
            refs[i, : images.shape[0]] = images
            masks[i, : images.shape[0]] = image_masks
        size = len(prompts)
        batch = {
            "prompt": prompts, "negative_prompt": negatives, "references": refs.to(self.device),
            "num_references": [images.shape[0] for images, _ in loaded], "reference_masks": masks.to(self.device),
            "seed": seeds, "num_frames": [num_frames] * size, "height": [height] * size, "width": [width] * size,
        }

        # 2. Sampling, with diffusers' step callback.
        on_step = None
        if callback_on_step_end is not None:
            def on_step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor | None:
                returned = callback_on_step_end(self, i, t, {k: latents for k in tensor_inputs}) or {}
                return returned.get("latents")

        start = time.perf_counter()
        frames = sample_videos(self.model, batch, config, progress=progress, on_step=on_step)  # (B, F, H, W, 3)
        seconds = (time.perf_counter() - start) / size
        shown = references_uint8(batch["references"])  # (B, N, H, W, 3)
        videos = []
        for i in range(size):
            request = {
                "prompt": prompts[i],
                "references": [str(Path(r).resolve()) if isinstance(r, (str, Path)) else "<PIL image>"
                               for r in per_prompt_refs[i]],
                "seed": seeds[i], "num_frames": num_frames, "height": height, "width": width,
            }
            if negatives[i] is not None:
                request["negative_prompt"] = negatives[i]
            videos.append(GeneratedVideo(frames[i], shown[i, : batch["num_references"][i]], request, config, seconds))

        # 3. Output as asked.
        if output_type is None:
            return videos[0] if single and size == 1 else videos
        out = _convert(frames, output_type)
        return BindWeavePipelineOutput(frames=out, videos=videos) if return_dict else (out,)


OUTPUT_TYPES = (None, "np", "pt", "pil")
"""``output_type`` values: None (:class:`GeneratedVideo`) and diffusers' ``np``/``pt``/``pil``."""

@dataclass
class BindWeavePipelineOutput:
    """What a call with an ``output_type`` returns, as diffusers' ``WanPipelineOutput``.

    Attributes:
        frames: the videos as ``output_type`` asked (``np``: (B, F, H, W, 3) float32 in [0, 1];
            ``pt``: (B, F, 3, H, W) float32 in [0, 1]; ``pil``: B lists of F PIL images).
        videos: the same videos as :class:`GeneratedVideo` (uint8 frames, references, the request
            that reproduces each, ``save``/``save_contact_sheet``).
    """

    frames: object
    videos: list[GeneratedVideo]


def _convert(frames: torch.Tensor, output_type: str):
    """(B, F, H, W, 3) uint8 -> diffusers' ``postprocess_video`` output of ``output_type``."""
    if output_type == "pil":
        return [[Image.fromarray(frame.numpy()) for frame in video] for video in frames]
    scaled = frames.float() / 255.0  # (B, F, H, W, 3) in [0, 1]
    if output_type == "np":
        return scaled.numpy()
    return scaled.permute(0, 1, 4, 2, 3).contiguous()  # (B, F, 3, H, W)


def _callback_inputs(callback, names: list[str] | None, allowed: list[str]) -> list[str]:
    """The tensor names given to ``callback_on_step_end`` (a diffusers ``PipelineCallback`` says its own)."""
    names = list(getattr(callback, "tensor_inputs", None) or names or ["latents"])
    wrong = [k for k in names if k not in allowed]
    if wrong:
        raise ValueError(f"callback_on_step_end_tensor_inputs {wrong} are not available; use some of {allowed}.")
    return names


def _per_prompt(references, count: int) -> list[list]:
    """One list of references per prompt: a list of lists is per prompt, anything else is shared."""
    if isinstance(references, (str, Path, Image.Image)):
        return [[references]] * count
    references = list(references)
    if references and all(isinstance(r, (list, tuple)) for r in references):
        if len(references) != count:
            raise ValueError(f"{len(references)} lists of references for {count} prompt(s); give one list per "
                             f"prompt, or one list shared by all.")
        return [list(r) for r in references]
    return [references] * count


def _expand(name: str, value, count: int) -> list:
    """``value`` for each of ``count`` prompts: one shared, or a list of one per prompt."""
    if value is None or isinstance(value, str):
        return [value] * count
    value = list(value)
    if len(value) != count:
        raise ValueError(f"{len(value)} {name}s for {count} prompt(s); give one, or one per prompt.")
    if not all(v is None or isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a string or None per prompt, got {value!r}.")
    return value


def _seeds(seed: int | list[int] | None, generator, count: int) -> list[int]:
    """One seed per video: ``seed + k``, ``seed[k]``, or drawn from the generator(s)."""
    if generator is not None:
        if seed is not None:
            raise ValueError("Pass seed or generator, not both.")
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * count
        if len(generators) != count:
            raise ValueError(f"{len(generators)} generators for {count} videos; pass one, or one per video.")
        return [int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device)) for g in generators]
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"{len(seed)} seeds for {count} videos; pass one seed, or one per video.")
        return [int(s) for s in seed]
    return [int(seed or 0) + k for k in range(count)]


def _load_references(references: list, height: int, width: int, canvas) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, H, W) in [-1, 1] and (n, H, W) bool masks (where each image lies on its canvas);
    ValueError naming the reference by its index."""
    images, masks = [], []
    for i, reference in enumerate(references):
        try:
            image, mask = load_reference_and_mask(reference, height, width, canvas=canvas)
        except ValueError as error:
            raise ValueError(f"Reference {i}: {error}") from None
        images.append(image)  # (3, H, W)
        masks.append(mask)  # (H, W) bool
    if not images:
        return torch.zeros(0, 3, height, width), torch.zeros(0, height, width, dtype=torch.bool)
    return torch.stack(images), torch.stack(masks)


def _move_except(module: torch.nn.Module, device: torch.device, stay: list[torch.nn.Module]) -> None:
    """Move every parameter and buffer of ``module`` to ``device``, except those of the modules in
    ``stay`` (the offloaded encoders, the offloaded DiT blocks), which go to the CPU."""
    kept = {id(m) for m in stay}

    def visit(m: torch.nn.Module) -> None:
        if id(m) in kept:
            return
        for parameter in m.parameters(recurse=False):
            parameter.data = parameter.data.to(device)
        for name, buffer in m.named_buffers(recurse=False):
            setattr(m, name, buffer.to(device))  # a registered buffer stays registered (and persistent or not)
        for child in m.children():
            visit(child)

    visit(module)
    for m in stay:
        m.to("cpu")
