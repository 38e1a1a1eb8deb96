"""Checkpoints are forever. Two saved by earlier code still load, through the pipeline and the CLI,
weight for weight (each a 1-step fit of configs/tiny.yaml):

* ``tiny-before-model-object.ckpt`` (commit a7d1fe3): before ``BindWeaveModel`` held the DiT and the
  conditioners (keys ``dit.*``, ``conditioners.*``, upgraded to ``model.*`` on load);
* ``tiny-before-package-tree.ckpt`` (commit 1662b7b): before ``bindweave/`` became subpackages (its
  pickled state names ``bindweave.synthetic``; its keys are ``model.*``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bindweave.cli.app import run_cli
from bindweave.inference.pipeline import BindWeavePipeline

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
OLD_CHECKPOINTS = [FIXTURES / "tiny-before-model-object.ckpt", FIXTURES / "tiny-before-package-tree.ckpt"]


def old_weights(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under today's keys (``model.`` dropped: the pipeline's model is the
    ``BindWeaveModel`` itself)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    if path.name == "tiny-before-model-object.ckpt":
        assert any(k.startswith("dit.") for k in state) and not any(k.startswith("model.") for k in state)
        return state
    assert all(k.startswith("model.") for k in state)
    return {k.removeprefix("model."): v for k, v in state.items()}


@pytest.mark.parametrize("old", OLD_CHECKPOINTS, ids=lambda p: p.stem)
def test_old_checkpoint_loads_into_the_pipeline_weight_for_weight(old):
    pipe = BindWeavePipeline.from_checkpoint(old)
    now = pipe.model.state_dict()
    for key, value in old_weights(old).items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("old", OLD_CHECKPOINTS, ids=lambda p: p.stem)
def test_old_checkpoint_predicts_through_the_cli(old, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bindweave"])
    cli = run_cli(["predict", "-c", str(ROOT / "configs/tiny.yaml"), "--ckpt_path", str(old),
                   "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                   "--trainer.logger", "false", "--model.sampling.num_steps", "2"])
    now = cli.model.model.state_dict()
    for key, value in old_weights(old).items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, msg=key)
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == cli.datamodule.hparams.num_predict_samples
