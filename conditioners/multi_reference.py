"""Multi-reference condition: reference VAE latents in extra temporal slots, with binary masks."""

from __future__ import annotations

import torch
from torch import nn

from conditioners.base import Conditioner, ConditionerSpec, Conditioning
from conditioners.references import apply_drop, reference_mask


class MultiReferenceConditioner(Conditioner):
    """Appends N temporal slots after the video latent holding each reference's VAE latent.

    Channel layout of the DiT input (Wan2.1-I2V's, so its pretrained patch embedding applies):
    ``[noisy latent (z) | mask (mask_channels) | reference latent (z)]``. Video frames carry zeros in
    the last two groups; slot i carries zeros in the noisy group, mask channel 0 set to 1 (the rest
    0, as BindWeave does) and reference i's latent. With z = 16 that is 16 + 4 + 16 = 36 channels.
    N varies per batch (its largest reference count); shorter samples get masked padding slots.

    Args:
        max_references: most references a sample may have (1–4 in the paper).
        mask_channels: channels of the binary mask group (4 for Wan I2V).
        dropout: see :class:`Conditioner`; a dropped sample's slots are empty (zero latent, zero mask).
        guided: see :class:`Conditioner` (BindWeave keeps the references in both CFG passes).
    """

    def __init__(
        self, max_references: int = 4, mask_channels: int = 4, dropout: float = 0.0, guided: bool = False
    ) -> None:
        super().__init__(dropout=dropout, guided=guided)
        if max_references < 1:
            raise ValueError(f"max_references must be >= 1, got {max_references}.")
        self.max_references = max_references
        self.mask_channels = mask_channels
        self.vae: nn.Module | None = None

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

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        self._check_count(batch)
        references = batch["references"]  # (B, N, 3, H, W)
        b, n = references.shape[:2]
        latents = self.vae.encode_images(references.flatten(0, 1))  # (B·N, z, 1, h, w)
        return {"latents": latents[:, :, 0].unflatten(0, (b, n)).transpose(1, 2)}  # (B, z, N, h, w)

    def condition(self, batch: dict, features: dict[str, torch.Tensor], drop: list[bool] | None = None) -> Conditioning:
        self._check_count(batch)
        latents = features["latents"]  # (B, z, N, h, w)
        b, n = latents.shape[0], latents.shape[2]
        valid = apply_drop(reference_mask(batch), drop)  # (B, N)
        weight = valid[:, None, :, None, None].to(latents.dtype)  # (B, 1, N, 1, 1)
        mask = torch.zeros(b, self.mask_channels, n, *latents.shape[-2:], dtype=latents.dtype, device=latents.device)
        mask[:, :1] = 1.0
        slots = torch.cat([mask, latents], dim=1) * weight  # (B, mask + z, N, h, w)
        padded = min(batch["num_references"]) < n  # host-side: no device sync
        return Conditioning(slots=slots, slot_mask=reference_mask(batch) if padded else None)

