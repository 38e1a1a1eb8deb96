"""The shipped sprites model (models/sprites) through the README's demo command: on the CPU, every
video gets the background its prompt names and its subjects' colours from its references."""

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from bindweave.cli.app import run_cli
from bindweave.tasks.sprites.scenes import BACKGROUNDS, COLOURS
from bindweave.data.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]
PALETTE = {name: np.array(rgb, float) for name, rgb in COLOURS.items()}


def nearest_colours(pixels: np.ndarray) -> list[str]:
    """Sprite palette name nearest each (N, 3) pixel."""
    names = list(PALETTE)
    table = np.stack([PALETTE[n] for n in names])  # (C, 3)
    return [names[i] for i in np.abs(pixels[:, None] - table[None]).sum(-1).argmin(1)]


def reference_colours(paths: list[Path]) -> set[str]:
    """Palette colours that cover a real share of the references' non-white pixels."""
    found: set[str] = set()
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(float)
        names = nearest_colours(pixels[(pixels < 240).any(1)])
        found |= {n for n in set(names) if names.count(n) > 0.05 * len(names)}
    return found


def test_shipped_model_demo_follows_prompt_backgrounds_and_reference_colours(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo config names repository paths
    run_cli(["predict", "-c", "configs/sprites.yaml", "-c", "configs/predict.yaml", "-c", "configs/sprites/demo.yaml",
             "--trainer.default_root_dir", str(tmp_path)])
    requests = [json.loads(line) for line in (ROOT / "examples/sprites/requests.jsonl").read_text().splitlines()]
    assert sorted(len(r["references"]) for r in requests) == [1, 2, 3, 4]
    shares, chances = [], []
    for request in requests:
        video = read_video(tmp_path / "videos" / f"{request['id']}.mp4").numpy().astype(float)  # (F, H, W, 3)
        assert video.shape == (17, 64, 64, 3)
        pixels = video.reshape(-1, 3)
        named = re.search(r"On an? (\w+(?: \w+)?) background", request["prompt"]).group(1)
        median = np.median(pixels, 0)
        assert min(BACKGROUNDS, key=lambda n: np.abs(median - BACKGROUNDS[n]).max()) == named, request["id"]
        colours = reference_colours([ROOT / "examples/sprites" / p for p in request["references"]])
        foreground = pixels[np.abs(pixels - np.array(BACKGROUNDS[named])).max(1) > 60]
        assert len(foreground) > 0.02 * len(pixels), request["id"]  # subjects were drawn
        shares.append(np.mean([n in colours for n in nearest_colours(foreground[::5])]))
        chances.append(len(colours) / len(PALETTE))
    # Subjects take their colours from the references: well above a palette-uniform guess (the
    # shipped model scores 0.58-0.72 against 0.17-0.50 at the demo's CFG 1, 0.41-0.68 at CFG 4;
    # identity and shapes are not there yet).
    assert np.mean(shares) > np.mean(chances) + 0.1, (shares, chances)
