"""Loading DiT weights from disk: every released layout, parity with diffusers and the official Wan
code, zero-init of new conditions, and clear errors for bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from bindweave.weights.diffusers_format import bindweave_config_for, bindweave_to_diffusers, diffusers_config_for
from bindweave.model.dit import CrossAttentionBranch, WanDiT
from bindweave.weights.loading import Checkpoint, WeightsError, save_sharded
from bindweave.weights.dit_loading import PretrainedWanDiT, detect_dit_format, dit_arguments_from_checkpoint, load_dit
from bindweave.weights.wan_official import bindweave_to_wan, wan_config_for, wan_dit_arguments

FIXTURES = Path(__file__).parent / "fixtures" / "wan_official"
TEXT, IMAGE = CrossAttentionBranch("text", 24), CrossAttentionBranch("image", 20, "norm_mlp")
ARCH = dict(out_channels=16, dim=32, ffn_dim=48, num_heads=2, num_layers=2, freq_dim=32)


def random_dit(image: bool = True, seed: int = 0, **overrides) -> WanDiT:
    torch.manual_seed(seed)
    args = {**ARCH, "in_channels": 36 if image else 16, "branches": [TEXT, IMAGE] if image else [TEXT], **overrides}
    dit = WanDiT(**args)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
    return dit.eval()


def inputs(in_channels: int, image: bool, text_len: int = 512, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, in_channels, 3, 4, 6, generator=g)
    t = torch.tensor([10.0, 700.0])
    ctx = {"text": torch.randn(2, text_len, 24, generator=g)}
    if image:
        ctx["image"] = torch.randn(2, 257, 20, generator=g)
    return x, t, ctx


def diffusers_out(model: WanTransformer3DModel, x, t, ctx) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, ctx["text"], encoder_hidden_states_image=ctx.get("image"), return_dict=False)[0]


def write_layout(dit: WanDiT, folder: Path, layout: str) -> Path:
    """Save ``dit`` the way a release ships it: sharded safetensors + config.json in that layout."""
    state = dit.state_dict()
    if layout == "diffusers":
        state = bindweave_to_diffusers(state)
        state["blocks.0.attn2.norm_added_q.weight"] = torch.ones(dit.dim)  # real I2V files carry this unused norm
        config = {"_class_name": "WanTransformer3DModel", **diffusers_config_for(dit)}
    elif layout in ("wan", "comfy"):
        state = bindweave_to_wan(state)
        config = wan_config_for(dit)
        if layout == "comfy":
            state = {"model.diffusion_model." + k: v for k, v in state.items()}
    else:
        config = None
    save_sharded(state, folder, "diffusion_pytorch_model", max_shard_bytes=60_000)
    if config:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def i2v_reference():
    """A random Wan I2V DiT in diffusers (the reference implementation) and ours, same weights."""
    dit = random_dit(image=True)
    reference = WanTransformer3DModel(**diffusers_config_for(dit)).eval()
    reference.load_state_dict(bindweave_to_diffusers(dit.state_dict()))
    return dit, reference


# ---------------------------------------------------------------------------------------------
# Parity: every layout, through the loader, against diffusers and the official code
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["diffusers", "wan", "comfy", "bindweave"])
def test_dit_layouts_load_and_match_diffusers(i2v_reference, tmp_path, layout):
    dit, reference = i2v_reference
    folder = write_layout(dit, tmp_path, layout)
    assert len(list(folder.glob("*.safetensors"))) > 1  # really sharded
    expected_format = {"comfy": "wan"}.get(layout, layout)
    assert detect_dit_format(Checkpoint.open(folder).keys()) == expected_format
    loaded = PretrainedWanDiT(str(folder), in_channels=36, branches=[TEXT, IMAGE], **ARCH).eval()
    assert all(not p.is_meta for p in loaded.parameters())
    if layout == "diffusers":
        assert loaded.load_report.ignored == ["blocks.0.attn2.norm_added_q.weight"]
    x, t, ctx = inputs(36, image=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, ctx), diffusers_out(reference, x, t, ctx), rtol=1e-4, atol=1e-4)


def test_official_wan_dit_matches_official_output(tmp_path):
    """Weights and output written by the official Wan2.1 ``WanModel`` (fixtures/wan_official): the
    official I2V layout loads through our loader and reproduces the official forward."""
    fixture = load_file(FIXTURES / "dit_i2v.safetensors")
    config = {**json.loads((FIXTURES / "keys.json").read_text())["dit_i2v_config"], "_class_name": "WanModel"}
    save_file({k[2:]: v.float() for k, v in fixture.items() if k.startswith("w/")},
              tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = wan_dit_arguments(config)
    assert args["in_channels"] == 36 and [b.name for b in args["branches"]] == ["text", "image"]
    args["branches"] = [TEXT, IMAGE]  # the fixture's text (24) and image (20) widths
    dit = PretrainedWanDiT(str(tmp_path), **args).eval()
    x = torch.cat([fixture["in/x"], fixture["in/y"]], dim=1)  # Wan concatenates y on channels
    text = torch.zeros(2, 512, 24)  # Wan pads the prompt with zeros to 512 tokens and attends to them
    text[0, :7], text[1, :5] = fixture["in/ctx0"], fixture["in/ctx1"]
    with torch.no_grad():
        out = dit(x, fixture["in/t"], {"text": text, "image": fixture["in/clip"]})
    torch.testing.assert_close(out, fixture["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_official_key_layout_is_covered_both_ways(kind):
    """Our mapping produces exactly the official key set and shapes (recorded from WanModel)."""
    official = json.loads((FIXTURES / "keys.json").read_text())[f"dit_{kind}"]
    ours = random_dit(image=kind == "i2v")
    assert {k: list(v.shape) for k, v in bindweave_to_wan(ours.state_dict()).items()} == official


def test_architecture_from_config_or_shapes(i2v_reference, tmp_path):
    dit, _ = i2v_reference
    for layout in ("wan", "diffusers", "bindweave"):
        folder = write_layout(dit, tmp_path / layout, layout)
        args = dit_arguments_from_checkpoint(folder)
        assert (args["in_channels"], args["dim"], args["ffn_dim"], args["num_layers"]) == (36, 32, 48, 2), layout
        assert [(b.name, b.context_dim) for b in args["branches"]] == [("text", 24), ("image", 20)]
        assert args["num_heads"] == (2 if layout != "bindweave" else 1)  # no config.json: head size 128
    assert bindweave_config_for(diffusers_config_for(dit))["num_heads"] == 2


# ---------------------------------------------------------------------------------------------
# New conditions: T2V weights into an I2V-shaped DiT
# ---------------------------------------------------------------------------------------------


def test_t2v_checkpoint_where_i2v_expected_is_an_error(tmp_path):
    folder = write_layout(random_dit(image=False), tmp_path, "wan")
    with pytest.raises(WeightsError) as error:
        PretrainedWanDiT(str(folder), in_channels=36, branches=[TEXT, IMAGE], **ARCH)
    message = str(error.value)
    assert "diffusion_pytorch_model" in message and "patch_embedding.weight" in message
    assert "expected (32, 36, 1, 2, 2)" in message and "'image' branch" in message
    assert "allow_new_conditions" in message


def test_t2v_checkpoint_with_new_conditions_reproduces_t2v(tmp_path):
    """Zero-init rule: new input channels and the new image branch change nothing at step 0."""
    t2v = random_dit(image=False)
    reference = WanTransformer3DModel(**diffusers_config_for(t2v)).eval()
    reference.load_state_dict(bindweave_to_diffusers(t2v.state_dict()))
    folder = write_layout(t2v, tmp_path, "diffusers")
    dit = PretrainedWanDiT(str(folder), allow_new_conditions=True, in_channels=36, branches=[TEXT, IMAGE],
                           **ARCH).eval()
    assert dit.patch_embedding.weight[:, 16:].abs().max() == 0
    assert dit.blocks[0].cross_attn.branches["image"].to_v.weight.abs().max() == 0
    assert dit.blocks[0].cross_attn.branches["image"].to_k.weight.abs().max() > 0
    assert any("image" in k for k in dit.load_report.fresh)
    x, t, ctx = inputs(36, image=True)
    with torch.no_grad():
        expected = diffusers_out(reference, x[:, :16], t, {"text": ctx["text"]})
        torch.testing.assert_close(dit(x, t, ctx), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input: wrong shapes, missing shards, corrupt files, missing / unexpected keys
# ---------------------------------------------------------------------------------------------


def test_wrong_size_checkpoint_names_file_key_and_expected_shape(tmp_path):
    """A smaller model's checkpoint (the '1.3B into 14B' case, at tiny sizes) into a wider DiT."""
    write_layout(random_dit(image=True), tmp_path, "wan")
    with pytest.raises(WeightsError) as error:
        PretrainedWanDiT(str(tmp_path), in_channels=36, branches=[TEXT, IMAGE], **{**ARCH, "dim": 48, "num_heads": 2})
    message = str(error.value)
    assert "diffusion_pytorch_model-0000" in message
    assert "patch_embedding.weight has shape (32, 36, 1, 2, 2), expected (48, 36, 1, 2, 2)" in message
    assert "nothing was loaded" in message and "1.3B" in message


def test_missing_shard_is_named(i2v_reference, tmp_path):
    write_layout(i2v_reference[0], tmp_path, "diffusers")
    shards = sorted(tmp_path.glob("*-of-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(WeightsError, match=f"missing from .*: {shards[1].name}"):
        Checkpoint.open(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(WeightsError, match=f"shards missing: {shards[1].name}"):
        Checkpoint.open(tmp_path)


def test_corrupt_files_are_named(i2v_reference, tmp_path):
    write_layout(i2v_reference[0], tmp_path, "bindweave")
    shard = sorted(tmp_path.glob("*-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated download
    with pytest.raises(WeightsError, match=f"{shard.name}: corrupt or truncated safetensors file"):
        Checkpoint.open(tmp_path)
    shard.write_bytes(b"\x00" * 4)
    with pytest.raises(WeightsError, match=f"{shard.name}: corrupt safetensors file"):
        Checkpoint.open(tmp_path)
    garbage = tmp_path / "legacy.pth"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(WeightsError, match="legacy.pth: cannot be read"):
        Checkpoint.open(garbage)


def test_pickled_code_is_refused(tmp_path):
    """A .pth holding arbitrary objects is refused by weights_only=True: no code runs."""
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": Path("/tmp")}, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        Checkpoint.open(path)


def test_missing_and_unexpected_keys_are_all_reported(i2v_reference, tmp_path):
    state = i2v_reference[0].state_dict()
    del state["blocks.1.ffn.0.weight"]
    state["blocks.0.lora_A.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "model.safetensors")
    with torch.device("meta"):
        dit = WanDiT(in_channels=36, branches=[TEXT, IMAGE], **ARCH)
    with pytest.raises(WeightsError) as error:
        load_dit(dit, tmp_path / "model.safetensors")
    message = str(error.value)
    assert "missing from the checkpoint:\n  blocks.1.ffn.0.weight (48, 32)" in message
    assert "model.safetensors: blocks.0.lora_A.weight (2, 2)" in message
    assert all(p.is_meta for p in dit.parameters())  # no partial load


def test_bf16_load_and_yaml_factory(i2v_reference, tmp_path):
    """PretrainedWanDiT as the model's DiT factory in a config, loading in bfloat16."""
    from lightning.pytorch.cli import instantiate_module

    from bindweave.training.module import BindWeave

    folder = write_layout(i2v_reference[0], tmp_path, "wan")
    dit_entry = {"class_path": "bindweave.weights.dit_loading.PretrainedWanDiT",
                 "init_args": {"pretrained_path": str(folder), "dtype": "bfloat16", "in_channels": 36, **ARCH,
                               "branches": [{"name": "text", "context_dim": 24},
                                            {"name": "image", "context_dim": 20, "embedder": "norm_mlp"}]}}
    module = instantiate_module(BindWeave, {
        "dit": dit_entry, "vae": {"class_path": "encoders.WanVAE", "init_args": {"tiny_config": {"z_dim": 4}}},
        "relational": {"class_path": "conditioners.RelationalConditioner",
                       "init_args": {"text_encoder": {"class_path": "encoders.T5TextEncoder",
                                                      "init_args": {"tiny_config": {"d_model": 8}}}}},
    })
    dit = module.dit_factory()
    assert isinstance(dit, PretrainedWanDiT) and dit.patch_embedding.weight.dtype == torch.bfloat16
    expected = i2v_reference[0].state_dict()
    for key, value in dit.state_dict().items():
        torch.testing.assert_close(value, expected[key].to(torch.bfloat16))


@pytest.mark.parametrize("layout", ["fp8", "scaled_fp8"])
def test_community_fp8_wan_files_load_as_their_dequantized_weights(tmp_path, layout):
    """The Wan community's float8 DiT files: plain ``float8_e4m3fn`` weights (cast on load) and
    ComfyUI's scaled fp8 (``<module>.scale_weight`` per tensor, a ``scaled_fp8`` marker,
    ``scale_input``s): each weight loads as fp8 × scale, and the DiT's output stays close to bf16's."""
    dit = random_dit()
    wan = bindweave_to_wan({k: v.detach() for k, v in dit.state_dict().items()})
    stored, expected = {}, {}
    for key, value in wan.items():
        if value.dim() >= 2 and key.endswith(".weight"):
            scale = value.abs().max() / 448 if layout == "scaled_fp8" else torch.tensor(1.0)
            q = (value / scale).to(torch.float8_e4m3fn)
            stored[key] = q
            expected[key] = q.float() * scale
            if layout == "scaled_fp8":
                stored[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1).float()
                stored[key.removesuffix(".weight") + ".scale_input"] = torch.ones(1)
        else:
            stored[key] = expected[key] = value
    if layout == "scaled_fp8":
        stored["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(stored, tmp_path / "wan-fp8.safetensors")

    loaded = random_dit(seed=5)
    load_dit(loaded, tmp_path / "wan-fp8.safetensors")
    for key, value in bindweave_to_wan(loaded.state_dict()).items():
        torch.testing.assert_close(value, expected[key].float(), rtol=0, atol=0, msg=key)
    x, t, ctx = inputs(36, True)
    with torch.no_grad():
        reference, got = dit(x, t, ctx), loaded(x, t, ctx)
    error = ((got - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.1, error  # e4m3's 3 mantissa bits: a few per cent


def test_a_scale_weight_without_its_fp8_weight_is_one_clear_error(tmp_path):
    save_file({"blocks.0.ffn.0.weight": torch.ones(4, 4), "blocks.0.ffn.0.scale_weight": torch.ones(1)},
              tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="scale_weight does not fit .*float8"):
        Checkpoint.open(tmp_path / "bad.safetensors")
