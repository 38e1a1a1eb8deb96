"""Checkpoints are forever: one saved before ``BindWeaveModel`` held the DiT and the conditioners
(keys ``dit.*``, ``conditioners.*``; ``tests/fixtures/tiny-before-model-object.ckpt``, a 1-step fit
of configs/tiny.yaml at commit a7d1fe3) still loads, through the pipeline and the CLI, weight for weight."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bindweave.cli import run_cli
from bindweave.pipeline import BindWeavePipeline

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / "tests" / "fixtures" / "tiny-before-model-object.ckpt"


def old_weights() -> dict[str, torch.Tensor]:
    state = torch.load(OLD, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("dit.") for k in state) and not any(k.startswith("model.") for k in state)
    return state


def test_old_checkpoint_loads_into_the_pipeline_weight_for_weight():
    pipe = BindWeavePipeline.from_checkpoint(OLD)
    now = pipe.model.state_dict()
    for key, value in old_weights().items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, msg=key)


def test_old_checkpoint_predicts_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bindweave"])
    cli = run_cli(["predict", "-c", str(ROOT / "configs/tiny.yaml"), "--ckpt_path", str(OLD),
                   "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                   "--trainer.logger", "false", "--model.sampling.num_steps", "2"])
    now = cli.model.model.state_dict()
    for key, value in old_weights().items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, msg=key)
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == cli.datamodule.hparams.num_predict_samples
