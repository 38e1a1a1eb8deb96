"""The Wan video VAE with Wan's per-channel latent normalisation.

Videos of 1 + 4k frames map to 1 + k latent frames at 1/8 of the resolution (Wan2.1). Latents are
normalised channel-wise with the ``latents_mean`` / ``latents_std`` of the VAE config, as the Wan
pipelines do: ``normalised = (z - mean) / std``; ``decode`` inverts it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from bindweave.weights.loading import Checkpoint, WeightsError, assert_materialized, load_into
from bindweave.weights.wan_official import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    vae_config_from_wan,
    wan_vae_to_diffusers_key,
)
from encoders.base import FrozenEncoder, check_video

# Tiny Wan VAE: width 4, 4 latent channels, same 4x temporal / 8x spatial compression as Wan2.1.
TINY_VAE_CONFIG = {
    "base_dim": 4,
    "z_dim": 4,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    "latents_mean": [0.1, -0.2, 0.3, 0.0],
    "latents_std": [0.5, 2.0, 1.5, 1.0],
}


def load_wan_vae(path: str, dtype: torch.dtype, latents_mean: list[float] | None = None,
                 latents_std: list[float] | None = None) -> AutoencoderKLWan:
    """An ``AutoencoderKLWan`` from Wan's own ``Wan2.1_VAE.pth`` (official ``WanVAE_`` keys).

    The architecture is read from the tensor shapes. The file stores no latent normalisation: for 16
    latent channels Wan2.1's (``wan/modules/vae.py``) is used unless ``latents_mean``/``latents_std``
    are given; other sizes need them.
    """
    checkpoint = Checkpoint.open(path)
    shapes = {k: checkpoint.shape(k) for k in checkpoint.keys()}
    try:
        config = vae_config_from_wan(shapes)
    except (KeyError, ValueError) as e:
        raise WeightsError(
            f"{path}: not a Wan VAE checkpoint (expected Wan2.1_VAE.pth keys: encoder.conv1.weight, "
            f"encoder.downsamples.N..., conv1/conv2; {e}). A diffusers VAE is a folder: pass the folder."
        ) from None
    z_dim = config["z_dim"]
    if latents_mean is None and latents_std is None and z_dim == 16:
        latents_mean, latents_std = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
    if latents_mean is None or latents_std is None:
        raise ValueError(
            f"{path} has {z_dim} latent channels: give latents_mean and latents_std ({z_dim} values each).")
    with torch.device("meta"):
        vae = AutoencoderKLWan(**config, latents_mean=list(latents_mean), latents_std=list(latents_std))
    num_res_blocks = config["num_res_blocks"]
    sources = {}
    for key in checkpoint.keys():
        target = wan_vae_to_diffusers_key(key, num_res_blocks)
        if target is not None:
            sources[target] = key
    load_into(vae, checkpoint, sources, dtype=dtype, hint="Expected Wan2.1's VAE (Wan2.1_VAE.pth).")
    assert_materialized(vae, f"VAE from {path}")
    return vae


class WanVAE(FrozenEncoder):
    """A frozen ``AutoencoderKLWan`` that returns normalised latents.

    Args:
        pretrained_path: local VAE weights: a diffusers folder (e.g. ``Wan2.1-T2V-14B-Diffusers/vae``)
            or Wan's own ``Wan2.1_VAE.pth`` (read with ``weights_only=True``, architecture from its
            shapes). Exclusive with ``tiny_config``.
        tiny_config: random weights from ``AutoencoderKLWan`` kwargs instead (``base_dim``,
            ``z_dim``, ``dim_mult``, ``num_res_blocks``, ``temperal_downsample``, ...). With a
            ``z_dim`` other than 16, give ``latents_mean`` and ``latents_std`` of that length.
            See ``TINY_VAE_CONFIG``.
        sample: sample the posterior instead of taking its mean (Wan takes the mean).
        tiling: encode/decode in overlapping spatial tiles to save memory on large frames.
        latents_mean: per-channel latent mean for a ``.pth`` file, which stores none (default:
            Wan2.1's for 16 channels). Not used with a diffusers folder, whose config has it.
        latents_std: per-channel latent std for a ``.pth`` file, as ``latents_mean``.
        dtype: dtype of the weights and of the computation (Wan and diffusers run the VAE in
            float32).
    """

    can_train = False  # it encodes the flow loss's targets

    def __init__(
        self,
        pretrained_path: str | None = None,
        tiny_config: dict | None = None,
        sample: bool = False,
        tiling: bool = False,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__(dtype)
        self.check_source(pretrained_path, tiny_config, "a local diffusers VAE folder")
        if pretrained_path is not None and Path(pretrained_path).is_file():
            self.vae = load_wan_vae(pretrained_path, self.dtype, latents_mean, latents_std)
        elif pretrained_path is not None:
            self.vae = AutoencoderKLWan.from_pretrained(pretrained_path, torch_dtype=self.dtype)
        else:
            with self.random_init():
                self.vae = AutoencoderKLWan(**copy.deepcopy(tiny_config))
        config = self.vae.config
        for name in ("latents_mean", "latents_std"):
            if len(config[name]) != config.z_dim:
                raise ValueError(
                    f"VAE config has z_dim={config.z_dim} but {len(config[name])} values in {name}: "
                    f"give {name} with {config.z_dim} values."
                )
        if tiling:
            self.vae.enable_tiling()
        self.sample = sample
        self.register_buffer("mean", torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.latents_std).view(1, -1, 1, 1, 1), persistent=False)
        self.freeze()

    can_encode = True
    """A real autoencoder (see :class:`encoders.base.VideoAutoencoder`)."""

    @property
    def latent_channels(self) -> int:
        """Number z of latent channels."""
        return self.vae.config.z_dim

    @property
    def temporal_compression(self) -> int:
        """Frames per latent frame after the first (4 for Wan2.1)."""
        return 2 ** sum(self.vae.config.temperal_downsample)

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent pixel along H and W (8 for Wan2.1)."""
        return 2 ** (len(self.vae.config.dim_mult) - 1) * (self.vae.config.patch_size or 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode videos to normalised latents.

        Args:
            video: (B, 3, F, H, W) in [-1, 1], F = 1 + 4k, H and W multiples of 8.

        Returns:
            (B, z, 1 + (F - 1) // 4, H / 8, W / 8) normalised latents.
        """
        check_video(video, self.temporal_compression, self.spatial_compression)
        posterior = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
        z = posterior.sample() if self.sample else posterior.mode()  # (B, z, f, h, w)
        return (z - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode single frames (e.g. reference images).

        Args:
            images: (M, 3, H, W) in [-1, 1], H and W multiples of 8.

        Returns:
            (M, z, 1, H / 8, W / 8) normalised latents.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (M, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}.")
        return self.encode(images.unsqueeze(2))  # (M, z, 1, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Decode normalised latents to videos.

        Args:
            latents: (B, z, f, h, w) normalised latents.
            tiled: decode in overlapping spatial tiles for this call (diffusers' tiling; seams
                blended, so pixels differ slightly from untiled decoding).

        Returns:
            (B, 3, 1 + 4 (f - 1), 8 h, 8 w) videos clamped to [-1, 1].
        """
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be (B, {self.latent_channels}, f, h, w), got shape {tuple(latents.shape)}."
            )
        z = latents.to(self.device, self.dtype) * self.std + self.mean  # (B, z, f, h, w)
        was_tiling = self.vae.use_tiling
        if tiled:
            self.vae.enable_tiling()
        try:
            return self.vae.decode(z).sample.clamp(-1, 1)  # (B, 3, F, H, W)
        finally:
            self.vae.use_tiling = was_tiling
