"""LoRA: training adapters only (fresh adapters change nothing, checkpoints hold adapters only,
exports adapter-only or merged), and loading LoRA files of every Wan layout onto tiny models, each
checked against a weight delta merged by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from bindweave.errors import UserError
from bindweave.training.lora import (LoraConfig, apply_lora, load_lora, loaded_loras, merge_lora, save_lora,
                                     set_lora_scale, unload_lora)
from tests.helpers import synthetic_batch, tiny_module

# Official Wan module names (kohya/ComfyUI files use them) -> our WanDiT modules, written out here
# independently of bindweave/weights/wan_official.py.
OFFICIAL = {"self_attn.q": "self_attn.to_q", "self_attn.k": "self_attn.to_k", "self_attn.v": "self_attn.to_v",
            "self_attn.o": "self_attn.to_out", "cross_attn.q": "cross_attn.to_q", "cross_attn.o": "cross_attn.to_out",
            "cross_attn.k": "cross_attn.branches.text.to_k", "cross_attn.v": "cross_attn.branches.text.to_v",
            "cross_attn.k_img": "cross_attn.branches.image.to_k", "cross_attn.v_img": "cross_attn.branches.image.to_v",
            "ffn.0": "ffn.0", "ffn.2": "ffn.2"}
DIFFUSERS = {"attn1.to_q": "self_attn.to_q", "attn2.add_k_proj": "cross_attn.branches.image.to_k",
             "ffn.net.0.proj": "ffn.0", "attn2.to_out.0": "cross_attn.to_out"}


def dit_output(model, seed: int = 0) -> torch.Tensor:
    """The DiT's output on fixed random inputs (tiny_module's DiT: 12 channels, 32-d text and image tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 3, 4, 4, generator=g)
    context = {"text": torch.randn(2, 5, 32, generator=g), "image": torch.randn(2, 3, 32, generator=g)}
    with torch.no_grad():
        return model.dit(x, torch.tensor([300.0, 800.0]), context)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    module = tiny_module()
    with torch.no_grad():  # a head that passes the blocks' changes to the output
        torch.nn.init.normal_(module.dit.head.proj.weight, std=0.3)
    return module


def random_lora(dit, modules: dict[str, str], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{their module name: (down, up)} for our modules named by ``modules`` (their name -> ours), every block."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, block in enumerate(dit.blocks):
        for theirs, ours in modules.items():
            layer = block.get_submodule(ours)
            out[f"blocks.{i}.{theirs}"] = (torch.randn(rank, layer.in_features, generator=g),
                                          torch.randn(layer.out_features, rank, generator=g) * 0.3)
    return out


def merged_by_hand(base, lora, modules, scale: float):
    """A copy of ``base`` with W += scale · B @ A for each LoRA module (their names mapped by ``modules``)."""
    merged = copy.deepcopy(base.model)
    with torch.no_grad():
        for name, (down, up) in lora.items():
            _, i, theirs = name.split(".", 2)
            merged.dit.blocks[int(i)].get_submodule(modules[theirs]).weight += scale * up @ down
    return merged


def test_a_fresh_lora_changes_no_output_and_trains_only_adapters(base):
    module = copy.deepcopy(base)
    batch = synthetic_batch()
    before, loss_before = dit_output(module.model), module.flow_loss(batch, generator=torch.Generator().manual_seed(0))
    targets = apply_lora(module.model, LoraConfig(rank=4, also_train=["conditioners.relational.connector"]))
    assert len(targets["dit"]) == 2 * 12  # q, k, v, o; cross q, o, text k, v, image k, v; ffn 0, 2 per block
    assert torch.equal(dit_output(module.model), before)  # B = 0: bit-identical
    assert torch.equal(module.flow_loss(batch, generator=torch.Generator().manual_seed(0)), loss_before)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".connector." in n for n in trainable)
    # A few steps change the adapters and the connector, nothing else.
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_B." in n}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        module.flow_loss(synthetic_batch(seed=step), generator=torch.Generator().manual_seed(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, parameter in module.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    assert all(not torch.equal(dict(module.named_parameters())[n], v) for n, v in adapters.items())
    assert not torch.equal(dit_output(module.model), before)


def test_lora_config_errors_name_the_setting(base):
    for config, words in [(LoraConfig(parts=["ditt"]), "no submodule 'ditt'"),
                          (LoraConfig(target_modules=["dit.blocks.*.nothing"]), "match no Linear layer"),
                          (LoraConfig(parts=["vae"]), "frozen encoder")]:
        with pytest.raises(UserError, match=words):
            apply_lora(copy.deepcopy(base.model), config)


def test_bf16_and_activation_checkpointing_with_lora(base):
    from bindweave.parallel.per_block import apply_activation_checkpointing

    model = copy.deepcopy(base.model)
    model.dit.to(torch.bfloat16)
    apply_lora(model, LoraConfig(rank=4))
    apply_activation_checkpointing(model.dit, "full")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, 3, 4, 4, generator=g)
    context = {"text": torch.randn(1, 5, 32, generator=g), "image": torch.randn(1, 3, 32, generator=g)}
    out = model.dit(x, torch.tensor([500.0]), context)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in model.dit.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)


@pytest.mark.slow  # inductor compiles on the CPU
def test_compiled_lora_blocks_match_eager(base):
    from bindweave.parallel.per_block import apply_compile

    model = copy.deepcopy(base.model)
    apply_lora(model, LoraConfig(rank=4))
    with torch.no_grad():
        for name, parameter in model.dit.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.1)
    eager = dit_output(model)
    apply_compile(model.dit)
    torch.testing.assert_close(dit_output(model), eager, rtol=1e-4, atol=1e-5)


# -- LoRA files --------------------------------------------------------------------------------


def test_kohya_musubi_lora_equals_a_hand_merged_delta(base, tmp_path):
    model = copy.deepcopy(base.model)
    lora = random_lora(model.dit, OFFICIAL, rank=2, seed=1)
    state = {}
    for name, (down, up) in lora.items():
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(3.0)
    save_file(state, tmp_path / "musubi.safetensors")
    assert load_lora(model, tmp_path / "musubi.safetensors", scale=0.5) == "musubi"
    expected = dit_output(merged_by_hand(base, lora, OFFICIAL, scale=0.5 * 3.0 / 2))
    torch.testing.assert_close(dit_output(model), expected, rtol=1e-4, atol=1e-5)


def test_comfyui_and_diffusers_loras_together_then_scaled_and_unloaded(base, tmp_path):
    model = copy.deepcopy(base.model)
    comfy = random_lora(model.dit, {k: OFFICIAL[k] for k in ("self_attn.q", "cross_attn.k_img", "cross_attn.v_img", "ffn.2")}, 4, seed=2)
    save_file({f"diffusion_model.{name}.lora_{side}.weight": t for name, (a, b) in comfy.items()
               for side, t in (("A", a), ("B", b))}, tmp_path / "comfy.safetensors")
    diffusers = random_lora(model.dit, DIFFUSERS, 3, seed=3)
    save_file({f"transformer.{name}.lora_{side}.weight": t for name, (a, b) in diffusers.items()
               for side, t in (("A", a), ("B", b))}, tmp_path / "style.safetensors")
    original = dit_output(model)
    load_lora(model, tmp_path / "comfy.safetensors")
    load_lora(model, tmp_path / "style.safetensors", scale=2.0, name="style")
    assert loaded_loras(model) == ["comfy", "style"]
    both = merged_by_hand(base, comfy, OFFICIAL, 1.0)
    with torch.no_grad():
        for name, (down, up) in diffusers.items():
            _, i, theirs = name.split(".", 2)
            both.dit.blocks[int(i)].get_submodule(DIFFUSERS[theirs]).weight += 2.0 * up @ down
    torch.testing.assert_close(dit_output(model), dit_output(both), rtol=1e-4, atol=1e-5)
    set_lora_scale(model, "style", 0.0)
    torch.testing.assert_close(dit_output(model), dit_output(merged_by_hand(base, comfy, OFFICIAL, 1.0)),
                               rtol=1e-4, atol=1e-5)
    unload_lora(model)
    assert loaded_loras(model) == [] and torch.equal(dit_output(model), original)
    assert type(model.dit.blocks[0].self_attn.to_q) is torch.nn.Linear


def test_our_layout_round_trips_and_merges(base, tmp_path):
    trained = copy.deepcopy(base.model)
    apply_lora(trained, LoraConfig(rank=4, alpha=8, also_train=["conditioners.relational.connector"]))
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if ".lora_B." in name or ".connector." in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    expected = dit_output(trained)
    connector = dict(trained.conditioners.relational.connector.named_parameters())
    save_lora(trained, tmp_path / "ours.safetensors")
    fresh = copy.deepcopy(base.model)
    load_lora(fresh, tmp_path / "ours.safetensors")
    torch.testing.assert_close(dit_output(fresh), expected, rtol=1e-5, atol=1e-6)
    for name, parameter in fresh.conditioners.relational.connector.named_parameters():
        assert torch.equal(parameter, connector[name]), name  # also_train weights travel in full
    merge_lora(trained)
    assert not any(".lora_" in k for k in trained.state_dict())
    torch.testing.assert_close(dit_output(trained), expected, rtol=1e-5, atol=1e-6)


def test_a_lora_of_another_base_or_rank_is_named(base, tmp_path):
    model = copy.deepcopy(base.model)
    bad = {"deeper": {"diffusion_model.blocks.5.self_attn.q.lora_A.weight": torch.zeros(2, 32),
                      "diffusion_model.blocks.5.self_attn.q.lora_B.weight": torch.zeros(32, 2)},
           "wider": {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 64),
                     "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 2)},
           "ranks": {"dit.blocks.0.self_attn.to_q.lora_A.weight": torch.zeros(4, 32),
                     "dit.blocks.0.self_attn.to_q.lora_B.weight": torch.zeros(32, 2)},
           "t2v_of_other_names": {"transformer.blocks.0.attn2.add_q_proj.lora_A.weight": torch.zeros(2, 32),
                                  "transformer.blocks.0.attn2.add_q_proj.lora_B.weight": torch.zeros(32, 2)}}
    words = {"deeper": r"blocks\.5\.self_attn\.to_q.*2 blocks", "wider": r"blocks\.0\.self_attn\.to_q\.lora_A.*\(2, 64\)",
             "ranks": r"blocks\.0\.self_attn\.to_q\.lora_B.*rank 4", "t2v_of_other_names": "add_q_proj"}
    for name, state in bad.items():
        save_file(state, tmp_path / f"{name}.safetensors")
        with pytest.raises(UserError, match=words[name]) as error:
            load_lora(model, tmp_path / f"{name}.safetensors")
        assert "\n" not in str(error.value)
    assert loaded_loras(model) == []  # nothing was half-loaded


def test_a_lora_fit_checkpoints_adapters_only_and_exports_them_or_merged(tmp_path):
    from bindweave.cli.app import run_cli
    from bindweave.cli.weights import main as weights
    from bindweave.inference.pretrained import load_checkpoint, load_pretrained
    from bindweave.weights.export import read_config, save_pretrained, trainable_state_dict
    from tests.pipeline_helpers import TINY, cli_module, tiny_model_config

    base = cli_module(tiny_model_config())
    save_pretrained(base, tmp_path / "base")  # the pretrained base the LoRA is trained on
    run_cli(["fit", "-c", str(TINY), "--model.init_weights", str(tmp_path / "base"), "--model.lora", "{rank: 4}",
             "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
             "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert state and all(".lora_A.default." in k or ".lora_B.default." in k for k in state)
    assert len(state) == 2 * 2 * 12  # A and B of 12 layers in 2 blocks
    full = sum(t.numel() for t in trainable_state_dict(base.model).values())
    assert sum(t.numel() for t in state.values()) < 0.2 * full

    trained = load_checkpoint(checkpoint)
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in state.items() if ".lora_B." in k)
    expected = dit_output(trained.model)
    assert not torch.equal(expected, dit_output(base.model))
    weights(["export", str(checkpoint), str(tmp_path / "adapters")])
    weights(["export", str(checkpoint), str(tmp_path / "merged"), "--merge_lora"])
    assert read_config(tmp_path / "adapters")["lora"]["rank"] == 4
    assert "lora" not in read_config(tmp_path / "merged")
    torch.testing.assert_close(dit_output(load_pretrained(tmp_path / "adapters").model), expected, rtol=0, atol=0)
    merged = load_pretrained(tmp_path / "merged")
    assert not any(".lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(dit_output(merged.model), expected, rtol=1e-5, atol=1e-6)
