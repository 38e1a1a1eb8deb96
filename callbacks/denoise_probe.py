"""What the denoiser knows from its conditions alone, logged while training.

Sampling starts from pure noise, where only the prompt and references can say what the clip holds;
a loss curve cannot show whether the model has learned that (it falls as the model learns to denoise
what its input still shows). :class:`DenoiseProbe` asks the model for x̂₀ of fixed validation clips
at fixed σ (1.0 by default: pure noise) and logs, per σ, the pixel error over the clips' subjects and
over their backgrounds and the *layout AUC* (does x̂₀ put anything where the subjects are). Subjects
are the pixels that differ from the clip's most common colour: worlds with a uniform background
(the sprites task, docs/sprites.md). ``scripts/sprites_denoise_probe.py`` uses the same measures.
"""

from __future__ import annotations

import lightning as L
import torch

from bindweave.model.batch import to_model_batch


def background_colour(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, 1, 1, 1): each video's most common colour (its uniform background). video: (B, 3, F, H, W)."""
    return video.flatten(2).mode(dim=2).values[..., None, None, None]


def subject_pixels(video: torch.Tensor, background: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, F, H, W) True where a pixel differs from the video's background colour.
    video: (B, 3, F, H, W) in [-1, 1]; background: :func:`background_colour` of it (computed if None)."""
    background = background_colour(video) if background is None else background
    return (video - background).abs().amax(1, keepdim=True) > 0.02


def layout_auc(prediction: torch.Tensor, background: torch.Tensor, mask: torch.Tensor) -> float:
    """Does x̂₀ put *something* where the subjects are? ROC AUC of each pixel's distance from the
    video's background colour (max over channels) as a score for "a subject is here", against the
    true subject pixels: 0.5 knows nothing of the layout, 1.0 marks exactly the subjects' pixels
    (whatever colours it paints them). background: (B, 3, 1, 1, 1), the true video's."""
    score = (prediction - background).abs().amax(1).flatten()  # (B·F·H·W,)
    truth = mask[:, 0].flatten()
    ordered, order = score.sort()
    _, counts = torch.unique_consecutive(ordered, return_counts=True)  # tied scores share their mean rank
    ends = counts.cumsum(0).to(score.dtype)
    ranks = torch.empty_like(score)
    ranks[order] = ((2 * ends - counts + 1) / 2).repeat_interleave(counts)
    positives = truth.sum().item()
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return float("nan")  # no subject, or nothing but subject: undefined
    return (ranks[truth].sum().item() - positives * (positives + 1) / 2) / (positives * negatives)


def masked_mse(prediction: torch.Tensor, video: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(MSE over the mask's pixels, MSE over the rest; NaN for an empty side); prediction, video:
    (B, 3, F, H, W); mask: (B, 1, F, H, W)."""
    error = (prediction - video).pow(2).mean(1, keepdim=True)  # (B, 1, F, H, W)
    weight = mask.float()
    inside, outside = weight.sum().item(), (1 - weight).sum().item()
    return (error * weight).sum().item() / inside if inside else float("nan"), \
        (error * (1 - weight)).sum().item() / outside if outside else float("nan")


@torch.no_grad()
def denoised_sample(module, latents: torch.Tensor, cond, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """x̂₀ (B, z, T, h, w) of the clean ``latents`` noised to ``sigma`` with ``noise``, under the
    conditioning ``cond`` (``module.model.encode_conditions``), whatever the model predicts."""
    sigmas = torch.full((len(latents),), sigma, device=latents.device)
    noisy = module.flow.noisy(latents, noise, sigmas)
    output = module.model.video_output(noisy, sigmas, cond).float()  # (B, z, T, h, w)
    return output if module.model.prediction == "sample" else noisy.float() - sigma * output


@torch.no_grad()
def denoise_measures(module, vae, batch: dict, sigmas: tuple[float, ...], seed: int) -> dict[float, tuple[float, float, float]]:
    """{σ: (subject MSE, background MSE, layout AUC)} of the decoded x̂₀ of one model batch, its
    clips noised with the same noise (drawn from ``seed``) at every σ. The truth is the batch's
    pixels, or for a feature-cached batch what its latents decode to with ``vae``."""
    if "video_latents" in batch:  # cached: the truth is what its latents decode to
        latents = batch["video_latents"].float()  # (B, z, T, h, w)
        video = vae.decode(latents).float().clamp(-1, 1)  # (B, 3, F, H, W)
    else:
        video = batch["video"].float()
        latents = module.vae.encode(video).float()
    background = background_colour(video)  # once per batch, not per σ
    subjects = subject_pixels(video, background)
    cond = module.model.encode_conditions(batch)
    noise = torch.randn(latents.shape, generator=torch.Generator(latents.device).manual_seed(seed), device=latents.device)
    measures = {}
    for sigma in sigmas:
        decoded = vae.decode(denoised_sample(module, latents, cond, noise, sigma)).float().clamp(-1, 1)
        measures[sigma] = (*masked_mse(decoded, video, subjects), layout_auc(decoded, background, subjects))
    return measures


class DenoiseProbe(L.Callback):
    """Every ``every_n_steps`` optimizer steps, log x̂₀'s subject / background MSE and layout AUC on
    the first ``batches`` validation batches at each σ of ``sigmas`` (same noise every time), as
    ``probe/subject_mse@<σ>``, ``probe/background_mse@<σ>``, ``probe/layout_auc@<σ>``.

    At σ = 1 these say what the model has learned from its conditions alone: what sampling starts
    from. Works with pixel batches and with feature-cached ones (their latents are decoded with the
    config's VAE, built once by the callback). Meant for uniform-background worlds (sprites).

    Args:
        every_n_steps: probe interval in optimizer steps.
        sigmas: noise levels to probe.
        batches: validation batches to use (the first ones, in order).
    """

    def __init__(self, every_n_steps: int = 500, sigmas: tuple[float, ...] = (1.0, 0.99, 0.9), batches: int = 2) -> None:
        if every_n_steps < 1 or batches < 1 or not sigmas or not all(0 < s <= 1 for s in sigmas):
            raise ValueError(f"DenoiseProbe needs every_n_steps >= 1, batches >= 1 and sigmas in (0, 1], got "
                             f"{every_n_steps}, {batches} and {sigmas}.")
        self.every_n_steps, self.sigmas, self.batches = every_n_steps, tuple(sigmas), batches
        self._decoder = None

    def _vae(self, module):
        if module.vae.can_encode:  # a real VAE (encoders.base.VideoAutoencoder), not a feature cache's stand-in
            return module.vae
        if self._decoder is None:  # trained from a feature cache: the model holds no VAE
            self._decoder = module.vae_factory().to(module.device).eval()
        return self._decoder

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, module) -> dict[str, float]:
        """{metric name: value} averaged over the probe batches."""
        loaders = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else []
        vae = self._vae(module)
        sums: dict[str, float] = {}
        count = 0
        for index, batch in enumerate(loaders):
            if index == self.batches:
                break
            batch = to_model_batch(trainer.strategy.batch_to_device(batch))
            for sigma, (subject_mse, background_mse, auc) in denoise_measures(module, vae, batch, self.sigmas, index).items():
                for name, value in ((f"probe/subject_mse@{sigma}", subject_mse),
                                    (f"probe/background_mse@{sigma}", background_mse),
                                    (f"probe/layout_auc@{sigma}", auc)):
                    sums[name] = sums.get(name, 0.0) + value
            count += 1
        return {name: value / count for name, value in sums.items()} if count else {}

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return  # every rank probes (a sharded DiT needs them all); the logger writes rank 0's
        was_training = module.training
        module.eval()
        try:
            metrics = self.measure(trainer, module)
        finally:
            module.train(was_training)
        if metrics and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)


__all__ = ["DenoiseProbe", "background_colour", "denoise_measures", "denoised_sample", "layout_auc", "masked_mse",
           "subject_pixels"]
