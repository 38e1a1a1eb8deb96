"""Frozen encoders from every released format, against the reference implementations (transformers'
UMT5 / CLIP / Qwen2.5-VL, open_clip, diffusers' Wan VAE) and the official Wan code's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import transformers
from open_clip.model import _build_vision_tower
from safetensors.torch import load_file, save_file

from bindweave.weights.loading import WeightsError
from bindweave.weights.wan_official import diffusers_vae_to_wan, open_clip_to_wan_clip, transformers_t5_to_wan
from encoders import CLIPVisionEncoder, MLLMEncoder, T5TextEncoder, WanVAE
from encoders.text import TINY_T5_CONFIG, load_wan_t5
from tests.tiny_parts import tiny

FIXTURES = Path(__file__).parent / "fixtures" / "wan_official"


def official(name: str) -> tuple[dict, dict]:
    """(weights in official keys, other tensors) of a fixture written by the official Wan code."""
    tensors = load_file(FIXTURES / f"{name}.safetensors")
    return ({k[2:]: v.float() for k, v in tensors.items() if k.startswith("w/")},
            {k: v for k, v in tensors.items() if not k.startswith("w/")})


# ---------------------------------------------------------------------------------------------
# UMT5: Wan's models_t5_umt5-xxl-enc-bf16.pth
# ---------------------------------------------------------------------------------------------


def test_t5_from_wan_pth_matches_transformers(tmp_path):
    # A transformers UMT5EncoderModel + tokenizer; Wan's T5 fixes the relative attention distance at 128.
    config = {**TINY_T5_CONFIG, "relative_attention_max_distance": 128}
    reference = T5TextEncoder(tiny_config=config, max_length=32, dtype="float32")
    reference.tokenizer.save_pretrained(tmp_path / "google" / "umt5-xxl")
    state = {k: v.to(torch.bfloat16) for k, v in transformers_t5_to_wan(reference.model.state_dict()).items()}
    assert "token_embedding.weight" in state and "blocks.1.ffn.gate.0.weight" in state
    torch.save(state, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    loaded = T5TextEncoder(pretrained_path=str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"),
                           tokenizer_path=str(tmp_path / "google" / "umt5-xxl"), max_length=32, dtype="float32")
    model = loaded.model
    assert model.shared.weight is model.encoder.embed_tokens.weight  # tied weights stay tied
    with torch.no_grad():
        for p in reference.model.parameters():  # the reference in the file's precision
            p.copy_(p.to(torch.bfloat16))
    prompts = ["a red ball", "two cats and a dog on a sofa"]
    expected, actual = reference(prompts), loaded(prompts)
    assert torch.equal(actual.mask, expected.mask)
    torch.testing.assert_close(actual.tokens, expected.tokens)


def test_t5_matches_official_wan_output(tmp_path):
    weights, io = official("t5")
    torch.save(weights, tmp_path / "t5.pth")
    model = load_wan_t5(str(tmp_path / "t5.pth"), torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=io["in/ids"], attention_mask=io["in/mask"]).last_hidden_state
    torch.testing.assert_close(out, io["out"], rtol=1e-5, atol=1e-5)


def test_t5_pth_needs_tokenizer_and_right_keys(tmp_path):
    torch.save({"shared.weight": torch.zeros(4, 2)}, tmp_path / "hf.pth")
    with pytest.raises(ValueError, match="tokenizer_path"):
        T5TextEncoder(pretrained_path=str(tmp_path / "hf.pth"))
    with pytest.raises(WeightsError, match="hf.pth: not a Wan T5 encoder checkpoint"):
        load_wan_t5(str(tmp_path / "hf.pth"), torch.float32)


# ---------------------------------------------------------------------------------------------
# CLIP: open_clip, Wan's .pth and transformers' CLIPVisionModel give the same tokens
# ---------------------------------------------------------------------------------------------

TOWER = {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8}


def open_clip_tokens(visual, images: torch.Tensor, block: int) -> torch.Tensor:
    """Reference: open_clip's own blocks, on CLIP-normalised images in [-1, 1]."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = visual._embeds(((images + 1) / 2 - mean) / std)
        for resblock in visual.transformer.resblocks[: block + 1]:
            x = resblock(x)
    return x


@pytest.fixture
def open_clip_dir(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16, "vision_cfg": TOWER}}))
    return tmp_path


def test_clip_from_wan_pth_matches_open_clip(open_clip_dir, tmp_path):
    torch.manual_seed(0)
    visual = _build_vision_tower(16, TOWER).eval()
    state = open_clip_to_wan_clip(visual.state_dict())
    state.update({"textual.token_embedding.weight": torch.zeros(8, 4), "log_scale": torch.zeros(())})
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "clip.pth")
    encoder = CLIPVisionEncoder(model_name=f"local-dir:{open_clip_dir}", pretrained_path=str(tmp_path / "clip.pth"),
                                dtype="float32")
    assert encoder.checkpoint_format == "wan"
    with torch.no_grad():
        for p in visual.parameters():
            p.copy_(p.half())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(encoder(images), open_clip_tokens(visual, images, 1))


def test_clip_matches_official_wan_output(open_clip_dir, tmp_path):
    weights, io = official("clip")
    torch.save(weights, tmp_path / "models_clip.pth")
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    images = (io["in/images"] * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)) * 2 - 1  # Wan's input, un-normalised
    for layer, name in ((-2, "out/penultimate"), (-1, "out/last")):
        encoder = CLIPVisionEncoder(model_name=f"local-dir:{open_clip_dir}", layer=layer,
                                    pretrained_path=str(tmp_path / "models_clip.pth"), dtype="float32")
        torch.testing.assert_close(encoder(images), io[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["", "vision_model."], ids=["transformers5", "transformers4"])
def test_clip_from_transformers_folder_matches_transformers(tmp_path, prefix):
    """diffusers' image_encoder/ (a CLIPVisionModel): hidden_states[-2] is what Wan feeds."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=32, patch_size=8, hidden_act="gelu")
    reference = transformers.CLIPVisionModel(config).eval()
    reference.save_pretrained(tmp_path)
    if prefix:  # checkpoints written by transformers 4.x (the released Wan2.1 diffusers folders)
        state = load_file(tmp_path / "model.safetensors")
        save_file({prefix + k: v for k, v in state.items()}, tmp_path / "model.safetensors")
    encoder = CLIPVisionEncoder(pretrained_path=str(tmp_path), dtype="float32")
    assert encoder.checkpoint_format == "transformers" and encoder.num_tokens == 17
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    pixels = ((images + 1) / 2 - encoder.mean) / encoder.std
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(encoder(images), expected, rtol=1e-5, atol=1e-5)


def test_clip_wrong_architecture_is_reported(open_clip_dir, tmp_path):
    torch.manual_seed(0)
    wide = _build_vision_tower(16, {**TOWER, "width": 48}).eval()
    torch.save(open_clip_to_wan_clip(wide.state_dict()), tmp_path / "clip.pth")
    with pytest.raises(WeightsError, match=r"clip.pth: visual.patch_embedding.weight has shape \(48, 3, 8, 8\), "
                                           r"expected \(32, 3, 8, 8\)"):
        CLIPVisionEncoder(model_name=f"local-dir:{open_clip_dir}", pretrained_path=str(tmp_path / "clip.pth"))


# ---------------------------------------------------------------------------------------------
# VAE: Wan2.1_VAE.pth
# ---------------------------------------------------------------------------------------------


def test_vae_from_wan_pth_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    reference = tiny(WanVAE)  # diffusers AutoencoderKLWan
    torch.save(diffusers_vae_to_wan(reference.vae.state_dict()), tmp_path / "Wan2.1_VAE.pth")
    config = reference.vae.config
    loaded = WanVAE(pretrained_path=str(tmp_path / "Wan2.1_VAE.pth"), latents_mean=list(config.latents_mean),
                    latents_std=list(config.latents_std), dtype="float32")
    assert {k: loaded.vae.config[k] for k in ("base_dim", "z_dim", "num_res_blocks")} == \
        {k: config[k] for k in ("base_dim", "z_dim", "num_res_blocks")}
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latents = loaded.encode(video)
    torch.testing.assert_close(latents, reference.encode(video))
    torch.testing.assert_close(loaded.decode(latents), reference.decode(latents))
    with pytest.raises(ValueError, match="4 latent channels: give latents_mean and latents_std"):
        WanVAE(pretrained_path=str(tmp_path / "Wan2.1_VAE.pth"))


def test_vae_matches_official_wan_output(tmp_path):
    weights, io = official("vae")
    torch.save(weights, tmp_path / "Wan2.1_VAE.pth")
    vae = WanVAE(pretrained_path=str(tmp_path / "Wan2.1_VAE.pth"), latents_mean=io["in/mean"].tolist(),
                 latents_std=io["in/std"].tolist(), dtype="float32")
    torch.testing.assert_close(vae.encode(io["in/video"]), io["out/latent"], rtol=1e-5, atol=1e-5)
    raw = vae.vae.decode(io["out/latent"] * vae.std + vae.mean).sample  # official decode does not clamp
    torch.testing.assert_close(raw, io["out/decoded"], rtol=1e-5, atol=1e-5)


def test_official_vae_keys_are_covered_both_ways():
    from diffusers import AutoencoderKLWan

    from bindweave.weights.wan_official import vae_config_from_wan, wan_vae_to_diffusers

    keys = json.loads((FIXTURES / "keys.json").read_text())
    for blocks in (1, 2):
        official_keys = keys[f"vae_nrb{blocks}"]
        config = vae_config_from_wan({k: tuple(v) for k, v in official_keys.items()})
        with torch.device("meta"):
            vae = AutoencoderKLWan(**config)
        ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
        assert wan_vae_to_diffusers(official_keys) == ours
        assert diffusers_vae_to_wan(ours) == official_keys


# ---------------------------------------------------------------------------------------------
# MLLM: a sharded bf16 Qwen2.5-VL folder against transformers
# ---------------------------------------------------------------------------------------------


def test_mllm_from_sharded_folder_matches_transformers(tmp_path):
    small = tiny(MLLMEncoder)
    small.model.save_pretrained(tmp_path, max_shard_size="100KB")
    small.processor.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = MLLMEncoder(pretrained_path=str(tmp_path), image_size=56, dtype="float32")
    reference = transformers.AutoModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    images = torch.rand(1, 2, 3, 56, 56) * 2 - 1
    out = loaded(["two friends"], images)
    batch = loaded.processor(text=loaded._texts(["two friends"], [2]), images=list((images[0] + 1) / 2),
                             padding=True, return_tensors="pt", do_rescale=False)
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
    torch.testing.assert_close(out.tokens, expected)
