"""The README's custom-conditioner example works as written."""

import re
import sys
from pathlib import Path

from bindweave.cli.app import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_readme_custom_conditioner_example(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Add your own conditioner", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    config = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_conditioners.py").write_text(code)
    (tmp_path / "frame_rate.yaml").write_text(config)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "-c", str(ROOT / "configs" / "tiny.yaml"), "-c", "frame_rate.yaml",
                   "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"])
    model = cli.model
    assert "extra_0" in model.conditioners and "motion" in model.dit.branches
    assert model.dit.dim == 64  # the rest of the DiT config survived the layering
    # The new branch is wired into the loss: its projections get gradients.
    batch = next(iter(cli.datamodule.train_dataloader()))
    model.zero_grad()
    model.flow_loss(batch).backward()
    assert model.dit.blocks[0].cross_attn.branches["motion"].to_v.weight.grad.abs().sum() > 0
    sys.modules.pop("my_conditioners", None)
