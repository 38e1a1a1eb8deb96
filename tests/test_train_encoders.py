"""``model.train_encoders``: a pretrained encoder (T5, CLIP, the MLLM) trains with the rest instead of
staying frozen: gradients, train mode, its own learning rate, its weights in checkpoints and exports
(loaded over the pretrained ones), FSDP units, and a feature cache that leaves out its features."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from bindweave.cli.app import run_cli
from bindweave.cli.data import pack
from bindweave.data.feature_cache import cache_shards
from bindweave.data.samples import SampleDecoder
from bindweave.data.shards import expand_urls
from bindweave.errors import UserError
from bindweave.parallel.fsdp import trainable_parts
from bindweave.weights.export import load_trainable_weights, trainable_state_dict
from conditioners import RelationalConditioner
from encoders import MLLMEncoder, T5TextEncoder, WanVAE
from encoders.mllm import TINY_MLLM_CONFIG
from encoders.base import frozen_encoders, frozen_prefixes, pretrained_encoders
from tests.data_helpers import TINY, make_clips
from tests.helpers import synthetic_batch, tiny_module
from tests.test_data_cache import DECODER, one_batch, seeded_loss
from tests.tiny_parts import tiny, tiny_factory

ROOT = Path(__file__).resolve().parents[1]
T5 = "conditioners.relational.text_encoder"


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train(module, steps: int = 3) -> None:
    """A few AdamW steps on one synthetic batch (head and connector made non-zero so every part gets gradients)."""
    torch.nn.init.normal_(module.dit.head.proj.weight, std=0.5)
    torch.nn.init.normal_(module.conditioners["relational"].connector[2].weight, std=0.5)
    optimizer = module.configure_optimizers()
    batch = synthetic_batch(size=2)
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        module.flow_loss(batch).backward()
        optimizer.step()


def test_a_trained_text_encoder_gets_gradients_its_own_rate_and_train_mode_the_others_stay_frozen():
    module = tiny_module(optimizer=partial(torch.optim.AdamW, lr=1e-3), train_encoders=[T5],
                         lr_multipliers={f"model.{T5}": 0.1})
    relational = module.conditioners["relational"]
    t5, mllm, clip = relational.text_encoder, relational.mllm, module.conditioners["identity"].image_encoder
    assert t5.trainable and all(p.requires_grad for p in t5.parameters())
    assert not any(p.requires_grad for e in (mllm, clip, module.vae) for p in e.parameters())
    module.train()
    assert t5.training and not mllm.training and not clip.training and not module.vae.training
    module.eval()
    assert not t5.training

    rates = {id(p): g["lr"] for g in module.configure_optimizers().param_groups for p in g["params"]}
    assert [rates[id(p)] for p in t5.parameters()] == pytest.approx([1e-4] * len(list(t5.parameters())))
    assert rates[id(relational.connector[0].weight)] == pytest.approx(1e-3)

    encoders = {"t5": t5, "mllm": mllm, "clip": clip, "vae": module.vae}
    before = {name: _weights(e) for name, e in encoders.items()}
    _train(module)
    changed = {name: any(not torch.equal(v, before[name][k]) for k, v in _weights(e).items()) for name, e in encoders.items()}
    assert changed == {"t5": True, "mllm": False, "clip": False, "vae": False}

    # Frozen, the same model never changes the encoder (the switch is what trains it).
    frozen = tiny_module(optimizer=partial(torch.optim.AdamW, lr=1e-3))
    start = _weights(frozen.conditioners["relational"].text_encoder)
    _train(frozen)
    assert all(torch.equal(v, start[k]) for k, v in _weights(frozen.conditioners["relational"].text_encoder).items())


@pytest.mark.parametrize("path, layer", [(T5, None), ("conditioners.identity.image_encoder", None),
                                         ("conditioners.relational.mllm", -1), ("conditioners.relational.mllm", -2)])
def test_every_weight_of_a_trained_encoder_gets_a_gradient(path, layer):
    """What DDP needs (no unused trained weight): one backward reaches every weight the switch
    unfroze; an MLLM read at an inner ``layer`` keeps the layers after it (and the final norm) frozen."""
    relational = None
    if layer is not None:
        mllm = partial(MLLMEncoder, tiny_config=TINY_MLLM_CONFIG, image_size=56, dtype="float32", layer=layer)
        relational = RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder), mllm=mllm, dropout=0.0)
    module = tiny_module(train_encoders=[path], **({"relational": relational} if relational else {}))
    torch.nn.init.normal_(module.dit.head.proj.weight, std=0.5)
    torch.nn.init.normal_(module.conditioners["relational"].connector[2].weight, std=0.5)
    module.flow_loss(synthetic_batch(size=2)).backward()
    encoder = module.model.get_submodule(path)
    trained = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trained and [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None] == []
    if layer == -2:  # the tiny MLLM has 2 decoder layers: hidden_states[1] follows the first only
        assert not any(n.startswith(("model.language_model.layers.1.", "model.language_model.norm.")) for n in trained)
        assert any(n.startswith("model.language_model.layers.0.") for n in trained)


@pytest.mark.parametrize("path, layer", [(T5, "model.encoder.block.0.layer.1"),  # inside a checkpointed layer
                                         ("conditioners.identity.image_encoder", "visual.transformer.resblocks.0.mlp"),
                                         ("conditioners.relational.mllm", "model.language_model.layers.0.mlp")])
def test_activation_checkpointing_recomputes_a_trained_encoders_layers_with_the_same_gradients(path, layer):
    """``parallelism.activation_checkpointing`` reaches trained encoders: their layers run again in
    the backward pass (twice the forward calls of a part of a layer), and every gradient is what it was."""
    from bindweave.training.module import ParallelismConfig

    results = {}
    for mode in ("none", "full"):
        torch.manual_seed(0)  # the same DiT and connector
        module = tiny_module(train_encoders=[path], parallelism=ParallelismConfig(activation_checkpointing=mode))
        torch.nn.init.normal_(module.dit.head.proj.weight, std=0.5)
        torch.nn.init.normal_(module.conditioners["relational"].connector[2].weight, std=0.5)
        encoder = module.model.get_submodule(path)
        calls = []
        encoder.get_submodule(layer).register_forward_pre_hook(lambda *_: calls.append(1))  # a recompute may stop before it returns
        module.train()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            module.flow_loss(synthetic_batch(size=2)).backward()
        results[mode] = len(calls), {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}
    assert results["full"][0] == 2 * results["none"][0] > 0
    for name, grad in results["none"][1].items():
        torch.testing.assert_close(results["full"][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_trained_encoder_is_kept_by_checkpoints_exports_and_fsdp_and_loads_over_the_pretrained_one(tmp_path):
    module = tiny_module(train_encoders=[T5])
    _train(module, steps=2)
    trained_t5 = _weights(module.conditioners["relational"].text_encoder)

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith(f"model.{T5}.") for k in keys)
    assert not any(".mllm." in k or ".image_encoder." in k or k.startswith("model.vae.") for k in keys)
    assert f"{T5}." not in frozen_prefixes(module.model)
    assert T5 not in [n for n, m in module.model.named_modules() if m in frozen_encoders(module.model)]
    assert module.conditioners["relational"].text_encoder in pretrained_encoders(module.model)  # sampling offloads it
    parts = trainable_parts(module.conditioners)  # FSDP units beside the DiT, gradients reduced
    assert module.conditioners["relational"].text_encoder in parts and module.conditioners["relational"].mllm not in parts

    fresh = tiny_module(train_encoders=[T5])  # the pretrained (here: seeded random) encoder
    assert any(not torch.equal(v, trained_t5[k]) for k, v in _weights(fresh.conditioners["relational"].text_encoder).items())
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    for key, value in _weights(fresh.conditioners["relational"].text_encoder).items():
        assert torch.equal(value, trained_t5[key]), key

    # An export holds it; a frozen-T5 export loads into a model that trains T5 (T5 starts pretrained).
    from bindweave.weights.export import write_export

    write_export(trainable_state_dict(module.model), {"format": "x", "model": {}}, tmp_path / "trained")
    loader = tiny_module(train_encoders=[T5])
    load_trainable_weights(loader, tmp_path / "trained")
    assert all(torch.equal(v, trained_t5[k]) for k, v in _weights(loader.conditioners["relational"].text_encoder).items())
    frozen = tiny_module()
    write_export(trainable_state_dict(frozen.model), {"format": "x", "model": {}}, tmp_path / "frozen")
    stage_two = tiny_module(train_encoders=[T5])
    load_trainable_weights(stage_two, tmp_path / "frozen")
    torch.testing.assert_close(stage_two.dit.head.proj.weight, frozen.dit.head.proj.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not belong to this model config.*unexpected.*text_encoder"):
        load_trainable_weights(tiny_module(), tmp_path / "trained")  # a frozen-T5 config would ignore the trained T5


def test_wrong_train_encoders_are_one_line_naming_the_encoders_there_are():
    from bindweave.training.lora import LoraConfig

    with pytest.raises(UserError, match="'conditioners.relational.connector' is not an encoder of this model; the "
                                        "encoders it can train: conditioners.identity.image_encoder, "
                                        "conditioners.relational.mllm, conditioners.relational.text_encoder"):
        tiny_module(train_encoders=["conditioners.relational.connector"])
    with pytest.raises(UserError, match="'vae' is not an encoder path"):
        tiny_module(train_encoders=["vae"])
    with pytest.raises(UserError, match="WanVAE cannot be trained: the flow loss compares its outputs"):
        tiny(WanVAE).unfreeze()  # a VAE held by a conditioner of one's own refuses too
    with pytest.raises(UserError, match="train_encoders and lora together"):
        tiny_module(train_encoders=[T5], lora=LoraConfig())


def test_the_feature_cache_leaves_out_a_trained_encoders_features_and_the_step_encodes_them(tmp_path):
    """T5-only relational condition with T5 trained: the cache holds the VAE, CLIP and slot features
    but not T5's; a model training from it builds T5 and encodes the cached prompts in each step: the
    same loss as online encoding, with gradients reaching T5. A trained encoder that reads pixels
    (CLIP, or T5 beside an MLLM that reads the references) cannot train from a cache: one line."""
    manifest = make_clips(tmp_path / "clips", count=3)
    pack(str(manifest), str(tmp_path / "raw"), num_frames=5, fps=8, progress=False)
    raw_shards = expand_urls(str(tmp_path / "raw" / "shard-*.tar"))
    t5_only = partial(RelationalConditioner, text_encoder=tiny_factory(T5TextEncoder))
    online = tiny_module(relational=t5_only(), train_encoders=[T5])
    torch.nn.init.normal_(online.dit.head.proj.weight, std=0.5)
    cache_shards(online, raw_shards, tmp_path / "cache", SampleDecoder(**DECODER))
    assert sorted(json.loads((tmp_path / "cache" / "cache.json").read_text())["features"]) == ["identity", "multi_reference"]

    cached = tiny_module(relational=t5_only(), train_encoders=[T5], feature_cache=str(tmp_path / "cache"))
    assert cached.conditioners["relational"].text_encoder.trainable and not cached.vae.can_encode
    cached.load_state_dict(online.state_dict(), strict=False)
    cached_batch = one_batch(expand_urls(str(tmp_path / "cache" / "shard-*.tar")), cached=True)
    raw_batch = one_batch(raw_shards, cached=False)
    drops = [[True, False, False], None, None]  # sample 0's prompt dropped: the null prompt goes through T5 too
    loss = seeded_loss(cached, cached_batch, drops)
    torch.testing.assert_close(loss, seeded_loss(online, raw_batch, drops), rtol=1e-5, atol=1e-6)
    loss.backward()
    t5 = cached.conditioners["relational"].text_encoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in t5.parameters() if p.ndim == 2)
    # Sampling mid-fit builds the frozen encoders and keeps the trained T5's parameters (the tied embedding too).
    held = {n: p for n, p in cached.named_parameters()}
    assert cached.attach_encoders()
    t5 = cached.conditioners["relational"].text_encoder
    assert t5.model.encoder.embed_tokens.weight is t5.model.shared.weight is held[f"model.{T5}.model.shared.weight"]
    assert all(p is held[n] for n, p in cached.named_parameters() if n in held)

    with pytest.raises(UserError, match="conditioners.relational trains an encoder .* reads the batch's references"):
        cache_shards(tiny_module(train_encoders=[T5]), raw_shards, tmp_path / "c2", SampleDecoder(**DECODER))
    with pytest.raises(UserError, match="conditioners.identity trains an encoder .* reads the batch's references"):
        tiny_module(relational=t5_only(), train_encoders=["conditioners.identity.image_encoder"],
                    feature_cache=str(tmp_path / "cache"))


def test_fit_trains_the_named_encoder_and_its_export_samples_with_it(tmp_path, monkeypatch):
    """Through the CLI: ``--model.train_encoders`` on configs/tiny.yaml trains T5 (its weights leave
    their pretrained values and are in ``last.ckpt``); the export holds them and loads them back."""
    from bindweave.cli.command import run_command
    from bindweave.inference.pretrained import load_pretrained

    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "-c", TINY, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                   "--trainer.enable_progress_bar", "false", "--model.train_encoders", f"[{T5}]"])
    trained = _weights(cli.model.conditioners["relational"].text_encoder)
    pretrained = _weights(tiny_module().conditioners["relational"].text_encoder)  # configs/tiny.yaml's T5 is TINY_T5_CONFIG's
    stored = torch.load(tmp_path / "outputs" / "tiny" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    keys = [k for k in stored if k.startswith(f"model.{T5}.")]
    assert keys and not any(".mllm." in k for k in stored)
    assert any(not torch.equal(stored[f"model.{T5}.{k}"], v) for k, v in pretrained.items() if f"model.{T5}.{k}" in stored)

    run_command(["weights", "export", str(tmp_path / "outputs" / "tiny" / "checkpoints" / "last.ckpt"), str(tmp_path / "export")])
    assert yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())["model"]["train_encoders"] == [T5]
    assert f"and the encoders it trained: {T5}" in (tmp_path / "export" / "README.md").read_text()  # the model card
    loaded = load_pretrained(tmp_path / "export")
    for key, value in _weights(loaded.conditioners["relational"].text_encoder).items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
