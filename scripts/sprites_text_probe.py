"""Can the sprites model's frozen text features say where each subject starts and how it moves?

A diagnostic for issue #8 (results in docs/results.md). It builds the config's umt5 text encoder
(random weights, drawn exactly as `bindweave fit` draws them), encodes the prompts of fresh
`bindweave data sprites` scenes, and trains a small reader on them: four learned queries (one per
subject) cross-attend to the text tokens through two transformer-decoder layers and classify each
subject's start row, start column and motion. The reader sees the tokens either as the DiT's
cross-attention does (no token order) or with sin-cos features of the token index added
(``CrossAttentionBranch(position=True)``), optionally shifted by a random offset per sample, as the
T5 tokens are when the MLLM's tokens come first. Held-out accuracy per step is printed and
written as JSON.

    python scripts/sprites_text_probe.py --samples 3000 --steps 1000 --out outputs/text-probe.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from bindweave.model.dit import timestep_sinusoid
from bindweave.tasks.sprites.scenes import COLUMNS, MOTIONS, ROWS, prompt_of, random_scene

ROOT = Path(__file__).resolve().parents[1]


def text_encoder(config_path: Path):
    """The config's relational T5 encoder, built as the model builds it (fixed seed)."""
    from lightning.pytorch.cli import instantiate_module

    from bindweave.training.module import BindWeave

    model_config = yaml.safe_load(config_path.read_text())["model"]
    module = instantiate_module(BindWeave, model_config)
    module._build_vae_and_conditioners()
    return module.conditioners["relational"].text_encoder


def scenes_and_targets(count: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """Prompts of ``count`` random training scenes and (count, 4, 3) targets: start row, start
    column and motion index per subject (-100 where a sample has fewer subjects)."""
    rng = random.Random(seed)
    prompts, targets = [], torch.full((count, 4, 3), -100, dtype=torch.long)
    for i in range(count):
        scene = random_scene(rng, "train", num_frames=17, height=64, width=64, sprite_scale=0.3)
        prompts.append(prompt_of(scene))
        for k, subject in enumerate(scene.subjects):
            targets[i, k] = torch.tensor([list(ROWS).index(subject.row), list(COLUMNS).index(subject.column),
                                          MOTIONS.index(subject.motion)])
    return prompts, targets


def encode_prompts(encoder, prompts: list[str], chunk: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder's (N, L, C) float tokens and (N, L) mask of ``prompts``, in chunks."""
    with torch.no_grad():
        encoded = [encoder(prompts[i:i + chunk]) for i in range(0, len(prompts), chunk)]
    return torch.cat([e.tokens.float() for e in encoded]), torch.cat([e.mask for e in encoded])


def write_curves(path: Path | None, samples: int, held_out: int, curves: dict) -> None:
    """Write the accuracy curves as JSON, atomically (nothing if ``path`` is None)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"samples": samples, "held_out": held_out, "curves": curves}, indent=2))
    tmp.replace(path)


class Reader(nn.Module):
    """Four queries reading (B, L, C) tokens by cross-attention; logits (B, 4, rows + columns + motions)."""

    def __init__(self, context_dim: int, position: bool, max_shift: int, width: int = 128) -> None:
        super().__init__()
        self.embed = nn.Linear(context_dim, width)
        self.queries = nn.Parameter(torch.randn(4, width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(2)
        )
        self.head = nn.Linear(width, len(ROWS) + len(COLUMNS) + len(MOTIONS))
        self.position, self.max_shift, self.width = position, max_shift, width

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keys = self.embed(tokens)  # (B, L, W)
        if self.position:
            shift = torch.randint(0, self.max_shift + 1, (len(tokens), 1)) if self.max_shift else 0
            index = torch.arange(tokens.shape[1])[None] + shift  # (B, L)
            keys = keys + timestep_sinusoid(index.flatten(), self.width).view(*index.shape, -1)
        queries = self.queries.expand(len(tokens), -1, -1)
        for layer in self.layers:
            queries = layer(queries, keys, memory_key_padding_mask=~mask)
        return self.head(queries)  # (B, 4, 12)


SPANS = {"row": (0, 3), "column": (3, 6), "motion": (6, 12)}


def train_reader(tokens, mask, targets, held_out: int, position: bool, max_shift: int, steps: int,
                 every: int) -> list[dict]:
    torch.manual_seed(0)
    reader = Reader(tokens.shape[-1], position, max_shift)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=1e-3)
    train = len(tokens) - held_out
    curve = []
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                logits, truth = reader(tokens[train:], mask[train:]), targets[train:]
            present = truth[..., 0] >= 0
            curve.append({"step": step, **{
                name: (logits[..., a:b].argmax(-1) == truth[..., j])[present].float().mean().item()
                for j, (name, (a, b)) in enumerate(SPANS.items())}})
            print(f"  step {step:5d}  " + "  ".join(f"{k} {v:.2f}" for k, v in curve[-1].items() if k != "step"),
                  flush=True)
        index = torch.randint(0, train, (64,))
        logits, truth = reader(tokens[index], mask[index]), targets[index]
        loss = sum(F.cross_entropy(logits[..., a:b].flatten(0, 1), truth[..., j].flatten())
                   for j, (a, b) in enumerate(SPANS.values()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "sprites.yaml")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON of the accuracy curves")
    args = parser.parse_args()

    encoder = text_encoder(args.config)
    prompts, targets = scenes_and_targets(args.samples, args.seed)
    tokens, mask = encode_prompts(encoder, prompts)  # (N, L, C), (N, L)
    results = {}
    for name, position, shift in [("no order (the DiT's cross-attention)", False, 0),
                                  ("token index", True, 0), ("token index shifted by 0-40", True, 40)]:
        print(f"{name}:")
        results[name] = train_reader(tokens, mask, targets, args.held_out, position, shift, args.steps, args.every)
    print("\n| text keys | " + " | ".join(f"{k} acc (step {args.steps})" for k in SPANS) + " |")
    print("| --- |" + " ---: |" * len(SPANS))
    for name, curve in results.items():
        print(f"| {name} | " + " | ".join(f"{curve[-1][k]:.2f}" for k in SPANS) + " |")
    write_curves(args.out, args.samples, args.held_out, results)


if __name__ == "__main__":
    main()
