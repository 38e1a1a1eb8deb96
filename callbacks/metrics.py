"""Video metrics on torchmetrics, and a callback that logs them for validation samples.

* ``IdentitySimilarity``: cosine similarity between generated frames and the references, in the
  token space of the model's CLIP image encoder (class token), averaged over frames × references.
* ``PromptVideoSimilarity``: CLIP-T, cosine similarity between frames and the prompt in a CLIP
  model with a text tower (the model's own CLIP encoder is a vision tower only, so this needs a
  ``clip_model``).
* ``MotionMagnitude``: mean optical-flow magnitude between consecutive frames (OpenCV Farnebäck),
  in pixels per frame: ~0 for a still video.

Each is a ``torchmetrics.Metric`` (sums and counts, reduced across processes), averaged over videos.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import Metric

from bindweave.inference.sampler import select
from encoders.clip import CLIPVisionEncoder

# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


class _MeanOverVideos(Metric):
    """Mean of one value per video, summed across processes."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, values: torch.Tensor) -> None:
        self.total += values.double().sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


class IdentitySimilarity(_MeanOverVideos):
    """Mean cosine similarity of each video's frame features to its reference features."""

    def update(self, frames: torch.Tensor, references: torch.Tensor, reference_mask: torch.Tensor) -> None:
        """frames (B, F, D), references (B, N, D), reference_mask (B, N) bool (False: padding)."""
        sims = F.normalize(frames.float(), dim=-1) @ F.normalize(references.float(), dim=-1).transpose(1, 2)  # (B, F, N)
        weight = reference_mask[:, None, :].float()  # (B, 1, N)
        per_video = (sims * weight).sum((1, 2)) / (weight.sum((1, 2)) * frames.shape[1]).clamp(min=1)  # (B,)
        has_refs = reference_mask.any(dim=1)
        self._add(per_video[has_refs])


class PromptVideoSimilarity(_MeanOverVideos):
    """Mean cosine similarity of each video's frame features to its prompt feature (CLIP-T)."""

    def update(self, frames: torch.Tensor, prompts: torch.Tensor) -> None:
        """frames (B, F, D), prompts (B, D), in one image–text space."""
        sims = (F.normalize(frames.float(), dim=-1) * F.normalize(prompts.float(), dim=-1)[:, None]).sum(-1)  # (B, F)
        self._add(sims.mean(dim=1))


class MotionMagnitude(_MeanOverVideos):
    """Mean optical-flow magnitude between consecutive frames, in pixels per frame (OpenCV Farnebäck).

    Args:
        levels: pyramid levels of the flow estimate.
        window: averaging window size in pixels.
    """

    higher_is_better = None

    def __init__(self, levels: int = 3, window: int = 15, **kwargs) -> None:
        super().__init__(**kwargs)
        self.levels, self.window = levels, window

    def update(self, frames: torch.Tensor) -> None:
        """frames (B, F, H, W, 3) uint8; videos of one frame count as still."""
        import cv2

        values = []
        for video in frames.cpu().numpy():
            grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in video]
            magnitudes = [
                np.linalg.norm(
                    cv2.calcOpticalFlowFarneback(a, b, None, 0.5, self.levels, self.window, 3, 5, 1.2, 0), axis=-1
                ).mean()
                for a, b in zip(grey[:-1], grey[1:])
            ]
            values.append(float(np.mean(magnitudes)) if magnitudes else 0.0)
        self._add(torch.tensor(values, device=self.total.device))


# ----------------------------------------------------------------------------------------------
# A CLIP with a text tower (for prompt–video similarity)
# ----------------------------------------------------------------------------------------------


class CLIPTextImageModel(nn.Module):
    """An open_clip model with image and text towers, for prompt–video similarity.

    Args:
        model_name: open_clip model config name (``open_clip.list_models()``), e.g. ``ViT-H-14``;
            its tokenizer must be available offline (the OpenAI BPE of most ViT models ships with
            open_clip). Ignored with ``tiny_config``.
        pretrained_path: local open_clip checkpoint file. Exclusive with ``tiny_config``.
        tiny_config: random weights from an open_clip model config dict (``embed_dim``,
            ``vision_cfg``, ``text_cfg``) instead; for tests.
    """

    def __init__(self, model_name: str = "ViT-H-14", pretrained_path: str | None = None,
                 tiny_config: dict | None = None) -> None:
        super().__init__()
        import open_clip

        if (pretrained_path is None) == (tiny_config is None):
            raise ValueError("CLIPTextImageModel needs exactly one of `pretrained_path` or `tiny_config`.")
        if tiny_config is not None:
            self.model = open_clip.CLIP(**copy.deepcopy(tiny_config))
            self.tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=self.model.context_length)
        else:
            self.model = open_clip.create_model(model_name, pretrained=pretrained_path)
            self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model.eval().requires_grad_(False)
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = getattr(self.model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(self.model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) in [-1, 1] -> (M, D) image embeddings."""
        device = self.mean.device
        x = F.interpolate(images.float().to(device), size=self.image_size, mode="bicubic", align_corners=False)
        return self.model.encode_image(((x + 1) / 2 - self.mean) / self.std)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> (B, D) text embeddings."""
        return self.model.encode_text(self.tokenizer(prompts).to(self.mean.device))


# ----------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------


def frames_to_images(frames: torch.Tensor, max_frames: int) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, F', 3, H, W) in [-1, 1], F' evenly spaced frames."""
    picks = torch.linspace(0, frames.shape[1] - 1, min(max_frames, frames.shape[1])).round().long().unique()
    return frames[:, picks].permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0


def predict_batch_of(batch: dict, count: int) -> dict:
    """The first ``count`` samples of a training/validation batch as predict requests at its size."""
    size = len(batch["prompt"])
    part = select(batch, list(range(min(count, size))))
    video = part.pop("video", None)  # (B, 3, F, H, W)
    if video is not None:
        part.update(num_frames=[video.shape[2]] * len(part["prompt"]), height=[video.shape[3]] * len(part["prompt"]),
                    width=[video.shape[4]] * len(part["prompt"]))
    part.pop("video_latents", None)
    return part


class VideoMetrics(Callback):
    """At each validation run, generates videos for the first validation samples and logs
    ``val/identity_similarity``, ``val/motion`` and, with ``clip_model``, ``val/prompt_similarity``.

    Every process generates its own share of the validation samples; the metrics are reduced
    across processes by torchmetrics. Nothing runs during Lightning's sanity check.

    Args:
        num_samples: validation samples generated per validation run (per process).
        sampling: overrides of the model's sampling settings for these videos (e.g.
            ``{num_steps: 20}``).
        clip_model: factory of a CLIP with a text tower for prompt–video similarity; None: not logged.
        max_frames: evenly spaced frames per video the CLIP metrics look at.
    """

    def __init__(self, num_samples: int = 4, sampling: dict | None = None,
                 clip_model: Callable[[], CLIPTextImageModel] | None = None, max_frames: int = 8) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.num_samples, self.overrides, self.max_frames = num_samples, dict(sampling or {}), max_frames
        self.clip_factory = clip_model
        self.clip: CLIPTextImageModel | None = None
        self.image_encoder: CLIPVisionEncoder | None = None
        self.identity, self.prompt, self.motion = IdentitySimilarity(), PromptVideoSimilarity(), MotionMagnitude()
        self._seen = 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        """Find the model's CLIP image encoder (the model is built by now) and place the metrics."""
        self._seen = 0
        if self.image_encoder is None:
            encoders = [m for m in pl_module.modules() if isinstance(m, CLIPVisionEncoder)]
            self.image_encoder = encoders[0] if encoders else None
            if self.image_encoder is None:
                rank_zero_warn("VideoMetrics: the model has no CLIPVisionEncoder; val/identity_similarity is not logged.")
        if self.clip_factory is not None and self.clip is None:
            with torch.random.fork_rng(devices=[]):  # random tiny weights must not move training's RNG
                self.clip = self.clip_factory()
        for module in (self.identity, self.prompt, self.motion, self.clip):
            if module is not None:
                module.to(pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or self._seen >= self.num_samples:
            return
        requests = predict_batch_of(batch, self.num_samples - self._seen)
        config = replace(pl_module.sampling, **self.overrides)
        with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
            frames = pl_module.generate(requests, config)  # (B, F, H, W, 3) uint8
        self._seen += len(requests["prompt"])
        self.motion.update(frames.to(pl_module.device))
        images = frames_to_images(frames, self.max_frames).to(pl_module.device)  # (B, F', 3, H, W)
        b, f = images.shape[:2]
        if self.image_encoder is not None:
            refs = requests["references"]  # (B, N, 3, H, W)
            n = refs.shape[1]
            frame_tokens = self.image_encoder(images.flatten(0, 1))[:, 0].unflatten(0, (b, f))  # (B, F', D)
            ref_tokens = self.image_encoder(refs.flatten(0, 1).to(pl_module.device))[:, 0].unflatten(0, (b, n))
            mask = torch.arange(n, device=pl_module.device)[None] < torch.tensor(
                requests["num_references"], device=pl_module.device)[:, None]  # (B, N)
            self.identity.update(frame_tokens, ref_tokens, mask)
        if self.clip is not None:
            frame_embeddings = self.clip.encode_images(images.flatten(0, 1)).unflatten(0, (b, f))  # (B, F', D)
            self.prompt.update(frame_embeddings, self.clip.encode_text(list(requests["prompt"])))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        logged = {"val/motion": self.motion}
        if self.image_encoder is not None:
            logged["val/identity_similarity"] = self.identity
        if self.clip is not None:
            logged["val/prompt_similarity"] = self.prompt
        for name, metric in logged.items():
            if metric.update_count:
                pl_module.log(name, metric.compute(), batch_size=1)
            metric.reset()
