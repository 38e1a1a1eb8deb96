"""Model cards (issue #24): every export writes README.md; models/sprites has its generated card with
the held-out numbers of docs/results.md; and the progress helper of long commands."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bindweave.cli.command import run_command
from bindweave.progress import progress
from bindweave.weights.export import read_config
from tests.pipeline_helpers import cli_module, tiny_model_config, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_checkpoint(cli_module(tiny_model_config()), tmp_path_factory.mktemp("card") / "tiny.ckpt")
    state = torch.load(path, weights_only=True)
    state.update(global_step=1234, epoch=2, datamodule_hyper_parameters={
        "_class_path": "bindweave.data.synthetic.SyntheticDataModule", "num_samples": 64, "batch_size": 4})
    torch.save(state, path)
    return path


def test_every_export_writes_a_model_card(checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    run_command(["weights", "export", str(checkpoint), str(out)])
    assert "model card" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    for expected in ("# export", "| DiT | `WanDiT`: dim", "optimizer steps: 1,234", "epochs: 2",
                     "data: `bindweave.data.synthetic.SyntheticDataModule` (num_samples: `64`, batch_size: `4`)",
                     "No measured scores", "BindWeavePipeline.from_pretrained(", f"bindweave demo --pretrained {out}",
                     "sampling defaults | 5 frames of 32×32"):
        assert expected in card, expected
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["steps"] == 1234
    assert read_config(out)["dit"]["class_path"] == "bindweave.model.dit.WanDiT"
    # Re-exported in place (int8): the folder's card is rewritten and keeps how it was trained.
    run_command(["weights", "export", str(out), str(out), "--int8"])
    card = (out / "README.md").read_text()
    assert "stored int8" in card and "optimizer steps: 1,234" in card
    # Scores measured later go in with `weights card`.
    (tmp_path / "scores.md").write_text("| run | subject MSE |\n| --- | --- |\n| this | 0.5 |\n")
    run_command(["weights", "card", str(out), "--scores", str(tmp_path / "scores.md"), "--name", "Tiny"])
    card = (out / "README.md").read_text()
    assert card.startswith("# Tiny\n") and "| this | 0.5 |" in card and "No measured scores" not in card
    with pytest.raises(SystemExit):
        run_command(["weights", "card", str(out), "--scores", str(tmp_path / "missing.md")])


def test_shipped_sprites_card_is_generated_with_the_docs_numbers(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import sprites_card
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    shipped = ROOT / "models" / "sprites"
    copy = tmp_path / "sprites"
    copy.mkdir()
    for name in ("config.yaml", "model.safetensors"):
        shutil.copy(shipped / name, copy / name)
    monkeypatch.chdir(tmp_path)
    sprites_card.main(copy)
    generated = (copy / "README.md").read_text().replace(str(copy), "models/sprites")
    assert generated == (shipped / "README.md").read_text(), "models/sprites/README.md is stale: run scripts/sprites_card.py"
    results = (ROOT / "docs" / "results.md").read_text()
    assert "| **full, shipped** (seed 0) | 4,776 | 19.79 | 0.627 | **0.216** | 0.027 | 0.416 | 0.033 | **0.940** | 0.954 |" in results
    assert "| **this model** | 4,776 | 19.79 | 0.627 | 0.216 | 0.027 | 0.416 | 0.033 | 0.940 | 0.954 |" in generated
    assert "| noref (seed 0) | 5,627 | 15.47 | 0.557 | 0.855 | 0.032 | 0.065 | 0.386 | 0.435 | 0.662 |" in results
    assert "| noref | 5,627 | 15.47 | 0.557 | 0.855 | 0.032 | 0.065 | 0.386 | 0.435 | 0.662 |" in generated


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_lines_off_a_terminal_and_a_bar_on_one():
    quiet = Stream(tty=False)
    assert list(progress(range(5), desc="export", unit="tensor", stream=quiet)) == list(range(5))
    assert quiet.getvalue() == ""  # a short run says nothing in a log
    log = Stream(tty=False)
    assert list(progress(iter(range(3)), total=3, desc="eval", unit="sample", stream=log, every=0)) == [0, 1, 2]
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("eval: 1/3 (33%), ") and lines[-1].startswith("eval: 3/3 (100%)") and lines[-1].endswith(" done")
    terminal = Stream(tty=True)
    assert list(progress(range(4), desc="inspect", stream=terminal)) == list(range(4))
    assert "inspect:" in terminal.getvalue() and "/4 [" in terminal.getvalue()  # a tqdm bar
    silent = Stream(tty=True)
    assert list(progress(range(4), enabled=False, stream=silent)) == list(range(4)) and silent.getvalue() == ""
