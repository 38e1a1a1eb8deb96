"""A fixed, lossless space-time patch "VAE": pixels folded into channels, no weights to train.

For small procedural worlds (``configs/sprites.yaml``) a learned VAE costs GPU time to train and
puts a reconstruction floor under every metric. ``PatchVAE`` is the exact alternative: it folds
each ``temporal x spatial x spatial`` block of pixels into the channel axis, so a DiT on its
latents is a pixel-space DiT with ``temporal x spatial x spatial`` patches, and ``decode(encode(x))``
returns ``x`` bit for bit.

It keeps the Wan VAE's interface and frame arithmetic: a video of ``1 + t k`` frames becomes
``1 + k`` latent frames, latent frame 0 holding the first frame alone (repeated ``t`` times, as a
causal video VAE treats it), so single images (reference pictures) are first frames.

Latent channels are ``3 * t * s * s``, ordered (colour, frame in group, row in block, column in
block). ``latents = (pixels - shift) / scale``.
"""

from __future__ import annotations

import torch
from einops import rearrange

from encoders.base import FrozenEncoder, check_video


class PatchVAE(FrozenEncoder):
    """Lossless fixed autoencoder: folds (t, s, s) pixel blocks into channels (Wan VAE interface).

    Args:
        spatial: pixels per latent pixel along H and W (``spatial_compression``).
        temporal: frames per latent frame after the first (``temporal_compression``); the first
            frame alone makes latent frame 0.
        scale: latents are ``(pixels - shift) / scale``; pick about the pixels' std so latents
            have about unit variance, like the noise of flow matching.
        shift: see ``scale``; about the pixels' mean.
        dtype: dtype of the latents ("float32", "bfloat16", "float16").
    """

    can_train = False  # it encodes the flow loss's targets

    def __init__(self, spatial: int = 4, temporal: int = 4, scale: float = 1.0, shift: float = 0.0,
                 dtype: str = "float32") -> None:
        super().__init__(dtype)
        if spatial < 1 or temporal < 1:
            raise ValueError(f"spatial and temporal must be >= 1, got spatial={spatial}, temporal={temporal}.")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        self.spatial, self.temporal = spatial, temporal
        self.scale, self.shift = float(scale), float(shift)
        # No parameters; a buffer gives the encoder a device (moved with the LightningModule).
        self.register_buffer("anchor", torch.zeros((), dtype=self.dtype), persistent=False)
        self.freeze()

    can_encode = True
    """A real autoencoder (see :class:`encoders.base.VideoAutoencoder`)."""

    @property
    def latent_channels(self) -> int:
        """Number z = 3 * temporal * spatial**2 of latent channels."""
        return 3 * self.temporal * self.spatial**2

    @property
    def temporal_compression(self) -> int:
        """Frames per latent frame after the first."""
        return self.temporal

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent pixel along H and W."""
        return self.spatial

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Fold pixels into latents.

        Args:
            video: (B, 3, F, H, W) in [-1, 1], F = 1 + t k, H and W multiples of s.

        Returns:
            (B, 3 t s s, 1 + k, H / s, W / s) latents.
        """
        check_video(video, self.temporal, self.spatial)
        video = video.to(self.anchor.device, self.dtype)
        first = video[:, :, :1].expand(-1, -1, self.temporal, -1, -1)  # (B, 3, t, H, W)
        grouped = torch.cat([first, video[:, :, 1:]], dim=2)  # (B, 3, t (1 + k), H, W)
        latents = rearrange(grouped, "b c (f t) (h s1) (w s2) -> b (c t s1 s2) f h w",
                            t=self.temporal, s1=self.spatial, s2=self.spatial)
        return (latents - self.shift) / self.scale

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode single frames (e.g. reference images).

        Args:
            images: (M, 3, H, W) in [-1, 1], H and W multiples of s.

        Returns:
            (M, z, 1, H / s, W / s) latents.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (M, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}.")
        return self.encode(images.unsqueeze(2))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Unfold latents to videos; the ``t`` copies of the first frame are averaged.

        Args:
            latents: (B, z, f, h, w).
            tiled: not supported (a per-pixel unfold needs no tiling): raises ``ValueError``.

        Returns:
            (B, 3, 1 + t (f - 1), s h, s w) videos clamped to [-1, 1].
        """
        if tiled:
            raise ValueError("PatchVAE has no tiled decoding (it unfolds pixels; memory is that of the video); "
                             "set vae_tiling to False.")
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, f, h, w), got shape {tuple(latents.shape)}."
            )
        pixels = latents.to(self.anchor.device, self.dtype) * self.scale + self.shift
        grouped = rearrange(pixels, "b (c t s1 s2) f h w -> b c (f t) (h s1) (w s2)",
                            t=self.temporal, s1=self.spatial, s2=self.spatial)  # (B, 3, t f, H, W)
        first = grouped[:, :, : self.temporal].mean(dim=2, keepdim=True)  # (B, 3, 1, H, W)
        return torch.cat([first, grouped[:, :, self.temporal:]], dim=2).clamp(-1, 1)
