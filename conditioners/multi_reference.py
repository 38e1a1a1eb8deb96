"""Multi-reference condition: reference VAE latents in extra temporal slots, with masks."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bindweave.data.reference_crop import crop_onto_canvas
from conditioners.base import Conditioner, ConditionerSpec, Conditioning
from conditioners.references import apply_drop, reference_mask


class MultiReferenceConditioner(Conditioner):
    """Adds N temporal slots to the video latent holding each reference's VAE latent.

    Channel layout of the DiT input (Wan2.1-I2V's, so its pretrained patch embedding applies):
    ``[noisy latent (z) | mask (mask_channels) | reference latent (z)]``. Slot i carries zeros in the
    noisy group, the mask on channel 0 (the rest 0, as BindWeave does) and reference i's latent. With
    z = 16 that is 16 + 4 + 16 = 36 channels.

    The paper's layout (the defaults): N slots *after* the video, N = the batch's largest reference
    count (shorter samples get padding slots masked out of self-attention), mask channel 0 = 1 on the
    whole slot, video frames with zeros in the mask and reference groups.

    The released BindWeave's (``slot_placement: before``, ``fixed_slots: 4``, ``mask: letterbox``,
    ``video_condition: grey_latents``): 4 slots *before* the video (RoPE time positions 0-3, video
    4..; the slots' outputs are dropped), empty slots all zero and *not* masked, mask channel 0 = the
    reference's letterbox alpha mask nearest-resized to the latent grid, and the video frames' mask 0
    and reference group = the VAE latent of an all-zero (mid-grey) video of the requested size.

    Args:
        max_references: most references a sample may have (1–4 in the paper).
        mask_channels: channels of the mask group (4 for Wan I2V).
        slot_placement: ``after`` (paper) or ``before`` (release) the video frames on the time axis.
        fixed_slots: always this many slots (>= max_references), the empty ones all zero and
            attended like the others (release: 4); None: as many as the batch's largest count, the
            padding ones masked (paper).
        mask: mask channel 0 of a slot: ``full`` (1 everywhere) or ``letterbox`` (1 where the
            reference image lies on its canvas, read from ``batch["reference_masks"]`` (B, N, H, W)
            bool, as :mod:`bindweave.data.reference_canvas` makes them; nearest-resized).
        video_condition: slot channels of the video frames: ``zeros`` (paper) or ``grey_latents``
            (mask 0 and the normalised VAE latent of an all-zero video of the batch's size, computed
            once per size and kept).
        crop_size: each reference cropped to its subject (non-white box), padded square, resized to
            this many pixels and centred on a white canvas of the video size before the VAE
            (:func:`bindweave.data.reference_crop.crop_onto_canvas`): the subject at the scale it
            has in the video, wherever and however large the reference shows it; None: as given.
        dropout: see :class:`Conditioner`; a dropped sample's slots are empty (zero latent, zero mask).
        guided: see :class:`Conditioner` (BindWeave keeps the references in both CFG passes).
    """

    def __init__(
        self,
        max_references: int = 4,
        mask_channels: int = 4,
        slot_placement: Literal["after", "before"] = "after",
        fixed_slots: int | None = None,
        mask: Literal["full", "letterbox"] = "full",
        video_condition: Literal["zeros", "grey_latents"] = "zeros",
        crop_size: int | None = None,
        dropout: float = 0.0,
        guided: bool = False,
    ) -> None:
        super().__init__(dropout=dropout, guided=guided)
        if max_references < 1:
            raise ValueError(f"max_references must be >= 1, got {max_references}.")
        if fixed_slots is not None and fixed_slots < max_references:
            raise ValueError(f"fixed_slots ({fixed_slots}) must be >= max_references ({max_references}) or null.")
        for name, value, allowed in (("slot_placement", slot_placement, ("after", "before")),
                                     ("mask", mask, ("full", "letterbox")),
                                     ("video_condition", video_condition, ("zeros", "grey_latents"))):
            if value not in allowed:
                raise ValueError(f"MultiReferenceConditioner: {name} must be one of {allowed}, got {value!r}.")
        self.max_references = max_references
        self.mask_channels = mask_channels
        self.slot_placement = slot_placement
        self.fixed_slots = fixed_slots
        self.mask = mask
        self.video_condition = video_condition
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"MultiReferenceConditioner: crop_size must be >= 1 or null, got {crop_size}.")
        self.crop_size = crop_size
        self.vae: nn.Module | None = None
        self._grey: dict[tuple, torch.Tensor] = {}  # (F, H, W, device, dtype) -> (1, z, T, h, w)

    def build(self, vae: nn.Module) -> None:
        # Shared with the LightningModule; kept out of this module's children so it is not duplicated.
        object.__setattr__(self, "vae", vae)

    def spec(self) -> ConditionerSpec:
        return ConditionerSpec(slot_channels=self.mask_channels + self.vae.latent_channels, min_references=1,
                               max_references=self.max_references)

    def _check_count(self, batch: dict) -> None:
        most = max(batch["num_references"])
        if most > self.max_references or batch["references"].shape[1] > self.max_references:
            raise ValueError(
                f"A sample has {most} references but this model takes at most {self.max_references}; "
                f"pass fewer references or raise max_references."
            )

    def grey_latents(self, num_frames: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """(1, z, T, h, w) normalised VAE latent of an all-zero (mid-grey) video of this size, kept per size."""
        key = (num_frames, height, width, like.device, like.dtype)
        if key not in self._grey:
            video = like.new_zeros(1, 3, num_frames, height, width)  # (1, 3, F, H, W)
            self._grey = {key: self.vae.encode(video)}  # only the latest size is kept
        return self._grey[key]

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        self._check_count(batch)
        references = batch["references"]  # (B, N, 3, H, W)
        b, n = references.shape[:2]
        images = references.flatten(0, 1)  # (B·N, 3, H, W)
        if self.crop_size is not None:
            images = crop_onto_canvas(images, self.crop_size)  # the subject at crop_size, centred
        latents = self.vae.encode_images(images)  # (B·N, z, 1, h, w)
        latents = latents[:, :, 0].unflatten(0, (b, n)).transpose(1, 2)  # (B, z, N, h, w)
        features = {"latents": latents}
        if self.mask == "letterbox":
            if "reference_masks" not in batch:
                raise ValueError(
                    "mask: letterbox needs batch['reference_masks'] (B, N, H, W), where each reference lies on "
                    "its canvas; load references with bindweave.data.reference_canvas.ReferenceCanvas.")
            masks = batch["reference_masks"].flatten(0, 1)[:, None].float()  # (B·N, 1, H, W)
            masks = F.interpolate(masks, size=latents.shape[-2:], mode="nearest")  # (B·N, 1, h, w)
            features["masks"] = masks[:, 0].unflatten(0, (b, n)).to(latents.dtype)  # (B, N, h, w)
        if self.video_condition == "grey_latents":
            frames = batch["video"].shape[2] if "video" in batch else _common(batch, "num_frames")
            grey = self.grey_latents(frames, references.shape[-2], references.shape[-1], references)
            features["video_latents"] = grey.to(latents.dtype).expand(b, -1, -1, -1, -1)  # (B, z, T, h, w)
        return features

    def condition(self, batch: dict, features: dict[str, torch.Tensor], drop: list[bool] | None = None) -> Conditioning:
        self._check_count(batch)
        latents = features["latents"]  # (B, z, N, h, w)
        b, n = latents.shape[0], latents.shape[2]
        valid = apply_drop(reference_mask(batch), drop)  # (B, N)
        weight = valid[:, None, :, None, None].to(latents.dtype)  # (B, 1, N, 1, 1)
        mask = latents.new_zeros(b, self.mask_channels, n, *latents.shape[-2:])  # (B, C_mask, N, h, w)
        mask[:, 0] = features["masks"] if self.mask == "letterbox" else 1.0
        slots = torch.cat([mask, latents], dim=1) * weight  # (B, mask + z, N, h, w)
        video_slots = None
        if self.video_condition == "grey_latents":
            grey = features["video_latents"].to(latents.dtype)  # (B, z, T, h, w)
            video_slots = torch.cat([grey.new_zeros(b, self.mask_channels, *grey.shape[2:]), grey], dim=1)
        if self.fixed_slots is not None:  # empty slots: all zero, attended (the release)
            slots = F.pad(slots, (0, 0, 0, 0, 0, self.fixed_slots - n))  # (B, mask + z, fixed_slots, h, w)
            slot_mask = None
        else:
            padded = min(batch["num_references"]) < n  # host-side: no device sync
            slot_mask = reference_mask(batch) if padded else None
        return Conditioning(slots=slots, slot_mask=slot_mask, slot_placement=self.slot_placement,
                            video_slots=video_slots)


def _common(batch: dict, key: str) -> int:
    """The batch's common ``key`` (e.g. num_frames), which the sampler always sets."""
    values = batch.get(key)
    if values is None:
        raise ValueError(f"video_condition: grey_latents needs the batch's {key!r} (the sampler sets it).")
    values = {int(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)}
    if len(values) != 1:
        raise ValueError(f"All requests of a batch must share {key}; got {sorted(values)}.")
    return values.pop()
