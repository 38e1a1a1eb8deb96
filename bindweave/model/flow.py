"""Rectified flow in Wan's convention: the noise schedule, timestep sampling and the Euler sampler.

``x_σ = (1 − σ)·x₀ + σ·ε`` with σ ∈ [0, 1] (σ = 1 is pure noise), the DiT predicts the velocity
``v = ε − x₀`` at timestep ``1000·σ``, and the shift ``σ' = sσ / (1 + (s − 1)σ)`` moves sampling and
training towards the noisy end for large videos (Wan uses s = 5 for T2V, 3 for 480p I2V).
"""

from __future__ import annotations

from typing import Literal

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Apply Wan's timestep shift to σ values in [0, 1]."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class RectifiedFlow:
    """Training side of rectified flow: timestep sampling, noising and the velocity target.

    Args:
        shift: timestep shift applied to the sampled σ (1.0 = none).
        timestep_sampling: ``uniform`` σ ~ U(0, 1), or ``logit_normal`` σ = sigmoid(N(0, 1)) (SD3).
        pure_noise_fraction: share of training samples drawn at exactly σ = 1. Just below 1 the
            clip still shows through its noise in aggregate (at σ = 0.99 the mean colour of a
            64 × 64 × 17 clip stands ~2 noise deviations out), so a model can learn to read global
            content from its input instead of its conditions and then fail from the pure noise
            that sampling starts at (docs/results.md, sixth session).
    """

    def __init__(
        self, shift: float = 5.0, timestep_sampling: Literal["uniform", "logit_normal"] = "uniform",
        pure_noise_fraction: float = 0.0,
    ) -> None:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}.")
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'logit_normal', got {timestep_sampling!r}.")
        if not 0.0 <= pure_noise_fraction < 1.0:
            raise ValueError(f"pure_noise_fraction must be in [0, 1), got {pure_noise_fraction}.")
        self.shift = shift
        self.timestep_sampling = timestep_sampling
        self.pure_noise_fraction = pure_noise_fraction

    def sample_sigmas(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """σ for each sample of a training batch: (B,) in (0, 1)."""
        if self.timestep_sampling == "uniform":
            sigmas = torch.rand(batch_size, device=device, generator=generator)
        else:
            sigmas = torch.sigmoid(torch.randn(batch_size, device=device, generator=generator))
        sigmas = shift_sigmas(sigmas, self.shift)
        if self.pure_noise_fraction > 0:
            pure = torch.rand(batch_size, device=device, generator=generator) < self.pure_noise_fraction
            sigmas = torch.where(pure, torch.ones_like(sigmas), sigmas)
        return sigmas

    @staticmethod
    def noisy(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """x_σ = (1 − σ)·x₀ + σ·ε, σ broadcast over all but the batch dimension."""
        s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    @staticmethod
    def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target v = ε − x₀."""
        return noise - x0


def sample_from_velocity(
    noisy: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, min_sigma: float = 0.0
) -> torch.Tensor:
    """The clean sample x̂₀ = x_σ − σ·v̂ that a velocity implies at x_σ (the exact inverse of
    :func:`velocity_from_sample` with the same ``min_sigma``). ``sigmas``: (B,); float32."""
    s = sigmas.float().clamp_min(min_sigma).view(-1, *([1] * (noisy.ndim - 1)))
    return noisy.float() - s * velocity.float()


def velocity_from_sample(
    noisy: torch.Tensor, sample: torch.Tensor, sigmas: torch.Tensor, min_sigma: float = 0.05
) -> torch.Tensor:
    """The velocity implied by a clean-sample prediction x̂₀ at x_σ: v̂ = (x_σ − x̂₀) / σ.

    For DiTs that predict x₀ (``BindWeave(prediction="sample")``, after Li & He 2025, "Back to
    Basics: Let Denoising Generative Models Denoise"): a token that must carry more values than the
    model's width (e.g. pixel patches) can still hold a clean image, which lies on a low-dimensional
    manifold, but not the noise a velocity contains. σ is clamped below at ``min_sigma`` so the
    division stays bounded near the clean end. ``sigmas``: (B,), broadcast over the rest; float32.
    """
    s = sigmas.float().clamp_min(min_sigma).view(-1, *([1] * (noisy.ndim - 1)))
    return (noisy.float() - sample.float()) / s


def foreground_weights(latents: torch.Tensor, weight: float, threshold: float = 0.05) -> torch.Tensor:
    """Per-latent-pixel loss weights that make rare content count: ``weight`` where a latent pixel
    differs from its clip's median latent pixel by more than ``threshold`` in any channel, 1 elsewhere.

    For worlds with a uniform background and small subjects (the sprites task, where each subject
    is a few percent of the pixels): under a plain MSE the subjects' share of the loss is so small
    that where they go and what they look like are learned last, if at all (docs/results.md).
    The median of each channel over the clip is the background wherever it covers more than half
    of the clip. latents: (B, z, T, h, w) clean latents -> (B, 1, T, h, w) float32 weights.
    """
    median = latents.float().flatten(2).median(dim=2).values[..., None, None, None]  # (B, z, 1, 1, 1)
    differs = (latents.float() - median).abs().amax(dim=1, keepdim=True) > threshold  # (B, 1, T, h, w)
    return 1.0 + (weight - 1.0) * differs.float()


def euler_sigmas(num_steps: int, shift: float, device: torch.device | None = None) -> torch.Tensor:
    """σ grid of the flow Euler sampler: (num_steps + 1,) from 1 down to 0, shifted."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, device=device), shift)


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dσ = v from σ to σ_next (computed in float32)."""
    return (x.float() + (sigma_next - sigma) * velocity.float()).to(x.dtype)
