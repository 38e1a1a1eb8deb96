"""The shipped configs parse, layer, and agree with the code's presets."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bindweave.model.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def print_config(*configs: str) -> dict:
    args = [a for c in configs for a in ("-c", str(ROOT / c))]
    out = subprocess.run([sys.executable, "-m", "bindweave.cli", "fit", *args, "--print_config"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def branches(preset):
    return [dict(name=b.name, context_dim=b.context_dim, embedder=b.embedder) for b in preset["branches"]]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "dit").glob("*.yaml")), ids=lambda p: p.stem)
def test_dit_preset_files_match_code_presets(path):
    dit = yaml.safe_load(path.read_text())["model"]["dit"]["init_args"]
    preset = PRESETS[path.stem]
    for key in ("in_channels", "dim", "ffn_dim", "num_heads", "num_layers"):
        assert dit[key] == preset[key], key
    assert dit["branches"] == branches(preset)


def test_paper_config_is_the_paper_setup():
    config = print_config("configs/bindweave-wan2.1-i2v-14b.yaml")
    model = config["model"]
    dit = model["dit"]["init_args"]
    assert {k: dit[k] for k in ("in_channels", "dim", "num_layers")} == {"in_channels": 36, "dim": 5120, "num_layers": 40}
    assert model["optimizer"]["init_args"]["lr"] == 5e-6
    assert model["sampling"]["num_steps"] == 50 and model["sampling"]["guidance_scale"] == 5.0
    assert "Qwen2.5-VL-7B" in model["relational"]["init_args"]["mllm"]["init_args"]["pretrained_path"]
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert_keeps_adamws_small_steps(config)


def assert_keeps_adamws_small_steps(config: dict) -> None:
    """At the paper's lr (5e-6) AdamW moves each weight by ~lr a step, below a bf16 weight's rounding
    step at Wan's init scale: with bf16 storage (``bf16-true``) about 4 % of a 1536-wide layer's
    weights move at all in 3 steps. The precision a training config gives must keep the weights the
    optimizer updates in float32."""
    import lightning as L

    lr = config["model"]["optimizer"]["init_args"]["lr"]
    trainer = L.Trainer(precision=config["trainer"]["precision"], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(0)
    layer = torch.nn.Linear(1536, 1536)
    torch.nn.init.xavier_uniform_(layer.weight)  # WanDiT.initialize_weights' scale
    layer = trainer.precision_plugin.convert_module(layer)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.01)
    x = torch.randn(64, 1536)
    for _ in range(3):
        with trainer.precision_plugin.forward_context():
            loss = layer(x.to(layer.weight.dtype)).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = (layer.weight != before).float().mean().item()
    assert moved > 0.99, f"{config['trainer']['precision']}: only {moved:.1%} of the weights moved"


@pytest.mark.slow  # CI time: `pytest -m slow` runs it (~20 s)
def test_mllm_presets_layer_without_losing_the_rest():
    config = print_config("configs/bindweave-wan2.1-i2v-14b.yaml", "configs/mllm/qwen2.5-vl-3b.yaml")
    relational = config["model"]["relational"]["init_args"]
    assert "Qwen2.5-VL-3B" in relational["mllm"]["init_args"]["pretrained_path"]
    assert "text_encoder" in relational["text_encoder"]["init_args"]["pretrained_path"]
    assert config["model"]["identity"]["class_path"].endswith("IdentityConditioner")
    ablation = print_config("configs/bindweave-wan2.1-i2v-14b.yaml", "configs/mllm/none.yaml")
    assert ablation["model"]["relational"]["init_args"]["mllm"] is None


@pytest.mark.parametrize("strategy", [pytest.param(p, marks=[] if p.stem == "fsdp2" else pytest.mark.slow)  # CI time: the
                                      for p in sorted((ROOT / "configs" / "strategy").glob("*.yaml"))],  # rest with -m slow
                         ids=lambda p: p.stem)
def test_strategy_presets_layer_on_the_paper_config(strategy):
    config = print_config("configs/bindweave-wan2.1-i2v-14b.yaml", f"configs/strategy/{strategy.name}")
    expected = yaml.safe_load(strategy.read_text())["trainer"]["strategy"]["class_path"]
    assert config["trainer"]["strategy"]["class_path"] == expected
    assert config["model"]["dit"]["init_args"]["dim"] == 5120  # the rest survived
    assert_keeps_adamws_small_steps(config)  # every preset trains at the paper's lr (fp32 master weights)
