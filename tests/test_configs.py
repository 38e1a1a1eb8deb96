"""The shipped configs parse, layer, and agree with the code's presets."""

import subprocess
import sys
from pathlib import Path

import pytest
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
    assert config["trainer"]["precision"] == "bf16-true"


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
