"""``bindweave weights export --layout release|wan|diffusers`` round-trips (issue #20, item 4): each
layout loads back through our loaders with equal weights; the diffusers one into
``WanTransformer3DModel`` (strict); the release one has exactly the official key set
(tests/fixtures/bindweave_official/keys.json, from the official ``convert_ckpt.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bindweave.cli.weights import main as weights_main
from bindweave.model.dit import CrossAttentionBranch, WanDiT
from bindweave.weights.dit_loading import load_dit
from bindweave.weights.layouts import dit_from_config, layout_state_dict
from bindweave.weights.bindweave_release import load_release_connector
from tests.pipeline_helpers import cli_module, tiny_model_config, write_checkpoint

KEYS = json.loads((Path(__file__).parent / "fixtures" / "bindweave_official" / "keys.json").read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    module = cli_module(tiny_model_config())
    return module, write_checkpoint(module, tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def fresh_dit(module) -> WanDiT:
    """An empty DiT of the module's architecture, from its config (as the export reads it)."""
    return dit_from_config(module.hparams).to_empty(device="cpu")


@pytest.mark.parametrize("layout,fmt", [("release", "bindweave_release"), ("wan", "wan"), ("diffusers", "diffusers")])
def test_export_layouts_load_back_with_equal_weights(checkpoint, tmp_path, capsys, layout, fmt):
    module, ckpt = checkpoint
    weights_main(["export", str(ckpt), str(tmp_path / layout), "--layout", layout])
    assert f"{layout} layout" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / layout).iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    dit = fresh_dit(module)
    load_dit(dit, tmp_path / layout, fmt)
    for key, value in module.dit.state_dict().items():
        torch.testing.assert_close(dit.state_dict()[key], value, rtol=0, atol=0)
    config = json.loads((tmp_path / layout / "config.json").read_text())
    if layout == "release":
        connector = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU("tanh"), torch.nn.Linear(32, 32))
        load_release_connector(connector, tmp_path / layout)
        ours = module.model.conditioners["relational"].connector
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(connector.state_dict()[key], value, rtol=0, atol=0)
    if layout == "diffusers":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        model.load_state_dict(load_file(tmp_path / layout / "diffusion_pytorch_model.safetensors"), strict=True)
    if layout == "wan":
        assert config["_class_name"] == "WanModel" and config["model_type"] == "i2v"


def test_release_layout_has_the_official_key_set():
    """A DiT and connector of the fixture's tiny official config, in the release layout: exactly the
    keys the official convert_ckpt.py gives (diffusers DiT keys + text_projector.linear_{1,2})."""
    cfg = KEYS["config"]
    dit = WanDiT(in_channels=cfg["in_dim"], out_channels=cfg["out_dim"], dim=cfg["hidden_size"], ffn_dim=cfg["ffn_dim"],
                 num_heads=cfg["num_heads"], num_layers=cfg["num_layers"], freq_dim=cfg["freq_dim"],
                 branches=[CrossAttentionBranch("text", cfg["text_dim"], "mlp"),
                           CrossAttentionBranch("image", cfg["img_dim"], "norm_mlp", keep_tokens=257, overflow_to="text")])
    connector = torch.nn.Sequential(torch.nn.Linear(cfg["mllm_dim"], cfg["text_dim"]), torch.nn.GELU("tanh"),
                                    torch.nn.Linear(cfg["text_dim"], cfg["text_dim"]))
    state = {**{f"dit.{k}": v for k, v in dit.state_dict().items()},
             **{f"conditioners.relational.connector.{k}": v for k, v in connector.state_dict().items()}}
    with pytest.raises(Exception, match="overflow of branch 'image'"):
        layout_state_dict(state, dit, "diffusers")  # diffusers does not route CLIP tokens: refused
    release_config = {"dit": {"init_args": {"branches": [{"name": "text", "context_dim": 16, "embedder": "mlp"}, {
        "name": "image", "context_dim": 20, "embedder": "norm_mlp", "keep_tokens": 257, "overflow_to": "text"}]}}}
    assert dit_from_config(release_config, release=True).branches["image"].overflow_to is None  # the release routes
    assert dit_from_config(release_config).branches["image"].overflow_to == "text"
    plain = WanDiT(in_channels=cfg["in_dim"], out_channels=cfg["out_dim"], dim=cfg["hidden_size"], ffn_dim=cfg["ffn_dim"],
                   num_heads=cfg["num_heads"], num_layers=cfg["num_layers"], freq_dim=cfg["freq_dim"],
                   branches=[CrossAttentionBranch("text", cfg["text_dim"], "mlp"),
                             CrossAttentionBranch("image", cfg["img_dim"], "norm_mlp")])
    weights, config = layout_state_dict(state, plain, "release")
    assert sorted(weights) == sorted(KEYS["release_key"].values())
    for official, release in KEYS["release_key"].items():
        assert list(weights[release].shape) == KEYS["dit"][official], release
