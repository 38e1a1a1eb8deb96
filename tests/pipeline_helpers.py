"""A tiny BindWeave as `bindweave fit` would checkpoint it (config in the hyperparameters), without
training: the pipeline, predict and callback tests load it like a user's checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning
import torch
import yaml
from lightning.pytorch.cli import instantiate_module
from PIL import Image, ImageDraw

from bindweave.lightning_compat import build_as_lightning_cli
from bindweave.weights.export import trainable_state_dict
from bindweave.training.module import BindWeave

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_model_config(num_steps: int = 2, **sampling) -> dict:
    """The ``model:`` section of configs/tiny.yaml, with fewer sampling steps."""
    config = copy.deepcopy(yaml.safe_load(TINY.read_text())["model"])
    config["sampling"].update(num_steps=num_steps, **sampling)
    return config


def cli_module(config: dict) -> BindWeave:
    """Built from a config as LightningCLI builds it: the config lands in the hyperparameters."""
    with build_as_lightning_cli(config):
        module = instantiate_module(BindWeave, copy.deepcopy(config))
    module.configure_model()
    # A DiT whose output depends on its inputs (the zero-initialised head would give the same video
    # for every prompt and seed).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.nn.init.normal_(module.dit.head.proj.weight, std=0.3)
    return module.eval()


def write_checkpoint(module: BindWeave, path: Path) -> Path:
    """A Lightning-format checkpoint: trainable weights + the config, as `bindweave fit` writes."""
    torch.save({"state_dict": trainable_state_dict(module), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def draw_reference(path: Path, colour: tuple[int, int, int], shape: str = "circle", size=(48, 40)) -> Path:
    """A shape on a transparent background (exercises the RGBA -> RGB path)."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    box = (6, 4, size[0] - 6, size[1] - 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour + (255,))
    image.save(path)
    return path
