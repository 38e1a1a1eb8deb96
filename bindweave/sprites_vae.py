"""Train the small Wan VAE of ``configs/sprites.yaml`` on sprites videos (docs/sprites.md).

A random-weight VAE's decoder does not invert its encoder, so a DiT trained in its latent space
cannot make recognisable frames. This trains the same small ``AutoencoderKLWan`` to reconstruct
sprites clips (MSE + a small KL term), measures the per-channel latent mean and std, and saves a
diffusers folder that ``encoders.WanVAE(pretrained_path=...)`` loads:

```bash
python -m bindweave.sprites_vae --data 'data/sprites/train/shard-*.tar' --out data/sprites/vae --steps 3000
bindweave fit -c configs/sprites.yaml -c configs/sprites/trained-vae.yaml
```
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch
import webdataset as wds
import yaml

from bindweave.shards import expand_urls
from bindweave.sprites import decode_video

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sprites.yaml"


def vae_config(config: str | Path = CONFIG) -> dict:
    """The ``tiny_config`` of the VAE in a model config."""
    return copy.deepcopy(yaml.safe_load(Path(config).read_text())["model"]["vae"]["init_args"]["tiny_config"])


def clips(urls: str | list[str], seed: int = 0):
    """Endless (3, F, H, W) clips in [-1, 1] from sprites shards, shards reshuffled each pass."""
    shards = expand_urls(urls)
    for epoch in itertools.count():
        order = list(shards)
        random.Random(f"{seed}/{epoch}").shuffle(order)
        for sample in wds.DataPipeline(wds.SimpleShardList(order), wds.tarfile_to_samples()):
            frames = torch.from_numpy(decode_video(sample["mp4"]))  # (F, H, W, 3)
            yield frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (3, F, H, W)


def train(data: str | list[str], out: str | Path, steps: int = 3000, batch_size: int = 16, lr: float = 1e-3,
          kl_weight: float = 1e-6, device: str = "cuda", config: str | Path = CONFIG, seed: int = 0,
          log_every: int = 100) -> dict:
    """Train and save the VAE; returns the summary (also ``<out>/training.json``)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    kwargs = vae_config(config)
    vae = AutoencoderKLWan(**kwargs).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    stream = clips(data, seed)
    start, history = time.time(), []
    for step in range(1, steps + 1):
        x = torch.stack([next(stream) for _ in range(batch_size)]).to(device)  # (B, 3, F, H, W)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample  # (B, 3, F, H, W)
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "mse": float(mse), "seconds": round(time.time() - start, 1)})
            print(json.dumps(history[-1]), file=sys.stderr)
    # Per-channel statistics of the latent means, for WanVAE's normalisation.
    vae.eval()
    with torch.no_grad():
        x = torch.stack([next(stream) for _ in range(max(batch_size, 64))]).to(device)
        z = vae.encode(x).latent_dist.mode()  # (B, z, T, h, w)
        mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4)).clamp(min=1e-3)
        recon = vae.decode(z).sample.clamp(-1, 1)
        psnr = float(10 * torch.log10(4.0 / torch.nn.functional.mse_loss(recon, x)))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    out = Path(out)
    vae.to("cpu").save_pretrained(out)
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
               "reconstruction_psnr_db": round(psnr, 2), "history": history, "config": kwargs,
               "seconds": round(time.time() - start, 1)}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bindweave.sprites_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="sprites training shards")
    p.add_argument("--out", required=True, help="diffusers folder to write")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default=str(CONFIG), help="model config whose model.vae.init_args.tiny_config is trained")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    summary = train(args.data, args.out, args.steps, args.batch_size, args.lr, args.kl_weight, args.device, args.config,
                    args.seed, args.log_every)
    print(f"Saved the VAE to {args.out}: reconstruction PSNR {summary['reconstruction_psnr_db']} dB after "
          f"{args.steps} steps ({summary['seconds']} s).")
    return summary


if __name__ == "__main__":
    main()
