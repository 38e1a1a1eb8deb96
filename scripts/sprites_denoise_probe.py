"""Where does a trained sprites model go wrong: its x̂₀ error per noise level, subject vs background.

A diagnostic for issue #8 (results in docs/results.md). For a few batches of a sprites split it
noises each video to fixed σ levels (same noise for every model), asks each exported model for x̂₀
(``prediction: sample``; a velocity model's output is turned into x̂₀ = x_σ − σ·v), decodes it and
reports the pixel MSE over the subjects' pixels and over the background. A model that uses its
references should beat ``noref`` on the subjects at high σ, where the noisy input no longer shows
them. ``--pca`` adds the floor a width-D token bottleneck sets: the error of keeping the top D
principal components of the DiT's input tokens (a linear patch embedding can keep no more).

    python scripts/sprites_denoise_probe.py --data 'data/sprites/test/shard-*.tar' \\
        --model full=outputs/export-full --model noref=outputs/export-noref --pca 256
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import yaml

from bindweave.data.datamodule import WebDataModule

from bindweave.model.batch import to_model_batch
from bindweave.inference.pretrained import load_pretrained
from callbacks.denoise_probe import denoise_measures, masked_mse, subject_pixels

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 0.99)


def test_batches(data: str, count: int, batch_size: int, num_frames: int | None = None,
                 size: tuple[int, int] | None = None) -> list[dict]:
    """The first ``count`` batches of the shards, decoded as the sprites config decodes them
    (or at another clip length / size, for data generated with other settings)."""
    settings = yaml.safe_load((ROOT / "configs" / "sprites.yaml").read_text())["data"]["init_args"]
    if num_frames is not None:
        settings["num_frames"] = num_frames
    if size is not None:
        settings["buckets"] = [list(size)]
    settings.update(urls=data, val_urls=data, batch_size=batch_size, num_workers=0, pin_memory=False,
                    worker_start_method=None)
    module = WebDataModule(**settings)
    module.setup("validate")
    batches = []
    for batch in module.val_dataloader():
        batches.append(to_model_batch(batch))
        if len(batches) == count:
            break
    return batches


@torch.no_grad()
def denoise_errors(module, batches: list[dict]) -> dict[float, tuple[float, float, float]]:
    """{σ: (subject MSE, background MSE, layout AUC)} of the decoded x̂₀ over all batches."""
    sums = {sigma: [0.0, 0.0, 0.0] for sigma in SIGMAS}
    for index, batch in enumerate(batches):
        for sigma, values in denoise_measures(module, module.vae, batch, SIGMAS, index).items():
            for i, value in enumerate(values):
                sums[sigma][i] += value / len(batches)
    return {sigma: tuple(values) for sigma, values in sums.items()}


def pca_floor(module, batches: list[dict], width: int) -> tuple[float, float]:
    """Subject and background MSE after keeping ``width`` principal components of the DiT's
    (patch-embedded) latent tokens of the video."""
    videos = torch.cat([batch["video"].float() for batch in batches])
    latents = module.vae.encode(videos)  # (B, C, T, H, W)
    b, c, t, h, w = latents.shape
    pt, ph, pw = module.dit.patch_size
    tokens = latents.view(b, c, t // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    grid = tokens.shape[:4]
    tokens = tokens.reshape(-1, c * pt * ph * pw)  # (N, token size)
    mean = tokens.mean(0)
    _, _, basis = torch.pca_lowrank(tokens - mean, q=min(tokens.shape), center=False)
    kept = (tokens - mean) @ basis[:, :width] @ basis[:, :width].T + mean
    kept = kept.view(*grid, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, t, h, w)
    return masked_mse(module.vae.decode(kept).clamp(-1, 1), videos, subject_pixels(videos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="shards of a sprites split (glob)")
    parser.add_argument("--model", action="append", required=True, help="NAME=EXPORT_FOLDER (repeatable)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pca", type=int, nargs="*", default=[], help="token widths for the PCA floor")
    parser.add_argument("--num-frames", type=int, default=None, help="clip length (default: the config's)")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="clip size (default: the config's)")
    args = parser.parse_args()

    torch.manual_seed(0)
    batches = test_batches(args.data, args.batches, args.batch_size, args.num_frames, args.size)
    print(f"{sum(len(b['video']) for b in batches)} samples; x̂₀ MSE in [-1, 1] pixels, subject / background\n")
    print("| model | " + " | ".join(f"σ = {s}" for s in SIGMAS) + " |")
    print("| --- |" + " ---: |" * len(SIGMAS))
    module, aucs = None, {}
    for entry in args.model:
        name, _, folder = entry.partition("=")
        module = load_pretrained(folder, dtype="float32")
        errors = denoise_errors(module, batches)
        print(f"| {name} | " + " | ".join(f"{s:.3f} / {b:.3f}" for s, b, _ in errors.values()) + " |", flush=True)
        aucs[name] = [auc for _, _, auc in errors.values()]
    print("\nLayout AUC of x̂₀ (0.5: no idea where the subjects are; 1.0: exactly there)\n")
    print("| model | " + " | ".join(f"σ = {s}" for s in SIGMAS) + " |")
    print("| --- |" + " ---: |" * len(SIGMAS))
    for name, values in aucs.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    for width in args.pca:
        subject, background = pca_floor(module, batches, width)
        print(f"\nPCA floor, {width} of {module.dit.out_channels * math.prod(module.dit.patch_size)} token dims: "
              f"subject {subject:.4f} / background {background:.4f}")


if __name__ == "__main__":
    main()
