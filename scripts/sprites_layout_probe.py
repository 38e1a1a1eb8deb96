"""Can video tokens read *which subject is where* from the sprites prompt by cross-attention?

A diagnostic for issue #8 (results in docs/results.md). The DiT's video tokens know their place
(position features) and read the prompt by cross-attention; to paint subject k from reference k,
the token at (t, y, x) must find out that subject k is there. This trains readers shaped like
that: one query per latent video token (5 frames x 8 x 8, fixed 3D sin-cos features, as
``WanDiT(absolute_position=True)``), two transformer-decoder layers (self-attention among the
queries, cross-attention to the text), and a 5-way head per token: background or subject 1..4
(the front-most one whose box holds the token's centre). The keys are the config's frozen umt5
features of the prompt (drawn as ``bindweave fit`` draws them), embedded with sin-cos token-index
features (``CrossAttentionBranch(position=True)``), either as is (what the DiT's cross-attention
sees) or after a trainable text refiner (``CrossAttentionBranch(refiner_layers=2)``: transformer
layers over the prompt tokens, so "right" in "moves to the right" can differ from "at the right").

    python scripts/sprites_layout_probe.py --samples 3000 --steps 1500 --out outputs/layout-probe.json
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bindweave.model.dit import absolute_position_table, timestep_sinusoid  # noqa: E402
from bindweave.tasks.sprites.scenes import boxes, prompt_of, random_scene  # noqa: E402
from scripts.sprites_text_probe import encode_prompts, text_encoder, write_curves  # noqa: E402

GRID = (5, 8, 8)  # latent frames x tokens: 17 frames of 64 x 64, 4 x 4 x 4 patch VAE, 2 x 2 patches


def scenes_and_owners(count: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """Prompts of ``count`` training scenes and (count, 5 * 8 * 8) owner labels per token."""
    rng = random.Random(seed)
    prompts, owners = [], torch.zeros(count, *GRID, dtype=torch.long)
    for i in range(count):
        scene = random_scene(rng, "train", num_frames=17, height=64, width=64, sprite_scale=0.3)
        prompts.append(prompt_of(scene))
        tracks = boxes(scene)
        order = sorted(range(len(scene.subjects)), key=lambda k: scene.subjects[k].depth)  # back to front
        for t in range(GRID[0]):
            frame = min(16, 4 * t)
            for k in order:
                x0, y0, x1, y1 = tracks[k][frame]
                for y in range(GRID[1]):
                    for x in range(GRID[2]):
                        cy, cx = 8 * y + 4, 8 * x + 4
                        if x0 <= cx < x1 and y0 <= cy < y1:
                            owners[i, t, y, x] = k + 1
    return prompts, owners.flatten(1)


class Reader(nn.Module):
    """Video-token queries reading the prompt; (B, 320, 5) owner logits."""

    def __init__(self, context_dim: int, refiner_layers: int, width: int = 128, noise: bool = False,
                 position_each_layer: bool = False) -> None:
        super().__init__()
        # noise: the queries also carry a linear embedding of pure noise (768 values per token),
        # as the DiT's patch tokens do at σ ≈ 1, where only the prompt can place the subjects
        self.noise = nn.Linear(768, width) if noise else None
        self.position_each_layer = position_each_layer
        self.embed = nn.Sequential(nn.Linear(context_dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, width))
        self.register_buffer("places", absolute_position_table(GRID, width, torch.device("cpu")), persistent=False)
        self.query = nn.Linear(width, width)
        self.refiner = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(refiner_layers))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(2))
        self.head = nn.Linear(width, 5)
        self.width = width

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keys = self.embed(tokens)  # (B, L, W)
        keys = keys + timestep_sinusoid(torch.arange(tokens.shape[1]), self.width)[None]
        for layer in self.refiner:
            keys = layer(keys, src_key_padding_mask=~mask)
        queries = self.query(self.places).expand(len(tokens), -1, -1)  # (B, 320, W)
        if self.noise is not None:
            queries = queries + self.noise(torch.randn(len(tokens), len(self.places), 768))
        for layer in self.layers:
            if self.position_each_layer:  # the place again at every layer's input, beside whatever the stream holds
                queries = queries + self.places
            queries = layer(queries, keys, memory_key_padding_mask=~mask)
        return self.head(queries)


def train_reader(tokens, mask, owners, held_out: int, refiner_layers: int, steps: int, every: int,
                 noise: bool = False, position_each_layer: bool = False) -> list[dict]:
    torch.manual_seed(0)
    reader = Reader(tokens.shape[-1], refiner_layers, noise=noise, position_each_layer=position_each_layer)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=1e-3)
    train = len(tokens) - held_out
    curve = []
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                predicted, truth = reader(tokens[train:], mask[train:]).argmax(-1), owners[train:]
            subject = truth > 0
            curve.append({
                "step": step,
                "subject_recall": (predicted == truth)[subject].float().mean().item(),  # right subject at its tokens
                "any_subject_recall": (predicted > 0)[subject].float().mean().item(),  # some subject there
                "background_acc": (predicted == 0)[~subject].float().mean().item(),
            })
            print(f"  step {step:5d}  " + "  ".join(f"{k} {v:.2f}" for k, v in curve[-1].items() if k != "step"),
                  flush=True)
        index = torch.randint(0, train, (32,))
        logits = reader(tokens[index], mask[index])
        loss = F.cross_entropy(logits.flatten(0, 1), owners[index].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "sprites.yaml")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--refiners", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--noise", action="store_true", help="queries also carry embedded noise (the DiT at σ ≈ 1)")
    parser.add_argument("--position-each-layer", action="store_true", help="add the place at every layer's input")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the accuracy curves")
    args = parser.parse_args()

    encoder = text_encoder(args.config)
    prompts, owners = scenes_and_owners(args.samples, args.seed)
    tokens, mask = encode_prompts(encoder, prompts)  # (N, L, C), (N, L)
    print(f"subject tokens: {(owners > 0).float().mean():.3f} of all")
    results = {}
    for layers in args.refiners:
        name = f"refiner layers {layers}" + (", noisy queries" if args.noise else "") + (
            ", place at every layer" if args.position_each_layer else "")
        print(f"{name}:")
        results[name] = train_reader(tokens, mask, owners, args.held_out, layers, args.steps, args.every,
                                     args.noise, args.position_each_layer)
    print(f"\n| text keys | subject recall | any-subject recall | background acc (step {args.steps}) |")
    print("| --- | ---: | ---: | ---: |")
    for name, curve in results.items():
        print(f"| {name} | {curve[-1]['subject_recall']:.2f} | {curve[-1]['any_subject_recall']:.2f} | "
              f"{curve[-1]['background_acc']:.2f} |")
    write_curves(args.out, args.samples, args.held_out, results)


if __name__ == "__main__":
    main()
