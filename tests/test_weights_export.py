"""Exports (safetensors + config.yaml), the released BindWeave layout, and ``bindweave weights``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import WanTransformer3DModel

from bindweave.weights.bindweave_release import load_release
from bindweave.weights.diffusers_format import bindweave_to_diffusers, diffusers_config_for
from bindweave.weights.export import export_checkpoint, save_pretrained, trainable_state_dict
from bindweave.inference.pretrained import load_pretrained
from bindweave.weights.loading import WeightsError, save_sharded
from bindweave.weights.wan_official import bindweave_to_wan, diffusers_vae_to_wan, open_clip_to_wan_clip, \
    transformers_t5_to_wan, wan_config_for
from bindweave.cli.weights import check_folder, format_report, main
from tests.tiny_parts import tiny

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    """The ``model:`` section of configs/tiny.yaml: a model built from a config, as the CLI does."""
    return yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]


def build(config: dict):
    """A BindWeave built from a config, with its hyperparameters set as LightningCLI sets them."""
    from lightning.pytorch.cli import instantiate_module

    from bindweave.lightning_compat import build_as_lightning_cli
    from bindweave.training.module import BindWeave

    with build_as_lightning_cli(config):
        module = instantiate_module(BindWeave, config)
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def trained(tiny_config):
    """A built tiny BindWeave whose DiT and connector are 'trained' (random, non-zero)."""
    module = build(tiny_config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return module.eval()


def dit_output(module) -> torch.Tensor:
    torch.manual_seed(3)
    dit = module.dit
    x = torch.randn(1, dit.in_channels, 2, 4, 4)
    context = {name: torch.randn(1, 5, b.context_dim) for name, b in dit.branches.items()}
    with torch.no_grad():
        return dit(x.to(dit.patch_embedding.weight.dtype), torch.tensor([500.0]), context).float()


def test_save_and_load_pretrained(trained, tmp_path):
    save_pretrained(trained, tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").is_file() and not list(tmp_path.glob("*.ckpt"))
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["model"]["dit"]["class_path"] == "bindweave.model.dit.WanDiT"
    loaded = load_pretrained(tmp_path)
    expected = trainable_state_dict(trained.model)
    actual = trainable_state_dict(loaded.model)
    assert set(actual) == set(expected) and any(k.startswith("conditioners.relational.connector") for k in actual)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    torch.testing.assert_close(dit_output(loaded), dit_output(trained))
    assert load_pretrained(tmp_path, dtype="bfloat16").dit.patch_embedding.weight.dtype == torch.bfloat16


def test_int8_quantization_error_is_half_a_step_per_output_channel():
    from bindweave.weights.quantize import SCALE_SUFFIX, dequantize, quantize, quantize_state_dict

    torch.manual_seed(0)
    weight = torch.randn(64, 96) * torch.linspace(0.01, 3, 64)[:, None]  # rows of very different ranges
    weight[5] = 0
    q, scale = quantize(weight)
    assert q.dtype == torch.int8 and scale.shape == (64, 1) and q.abs().max() == 127
    error = (dequantize(q, scale) - weight).abs()
    assert error[5].max() == 0 and (error <= scale / 2 + 1e-6).all()
    state = quantize_state_dict({"w": weight, "bias": torch.randn(64), "table": torch.randn(1, 6, 64)})
    assert set(state) == {"w", "w" + SCALE_SUFFIX, "bias", "table"} and state["table"].dtype == torch.float32
    with pytest.raises(ValueError, match="already quantized"):
        quantize_state_dict(state)


def test_int8_export_halves_the_bytes_and_loads_back(trained, tmp_path):
    from bindweave.weights.loading import Checkpoint
    from bindweave.weights.quantize import SCALE_SUFFIX

    save_pretrained(trained, tmp_path / "fp32")
    main(["export", str(tmp_path / "fp32"), str(tmp_path / "bf16"), "--dtype", "bfloat16"])  # an export re-exported
    main(["export", str(tmp_path / "bf16"), str(tmp_path / "int8"), "--int8"])
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("bf16", "int8")}
    assert size["int8"] < 0.6 * size["bf16"], size
    stored, int8 = Checkpoint.open(tmp_path / "bf16"), Checkpoint.open(tmp_path / "int8")
    assert set(int8.keys()) == set(stored.keys()) and not any(k.endswith(SCALE_SUFFIX) for k in int8.keys())
    key = "dit.blocks.0.ffn.0.weight"
    assert int8.entries[key].dtype == torch.int8 and int8.dtype(key) == torch.bfloat16
    assert int8.shape(key) == stored.shape(key)
    for k in stored.keys():  # every weight within half a step (1/254 of its row's largest value), plus bfloat16 rounding
        a, b = stored.read(k).float(), int8.read(k).float()
        bound = a.abs().amax(dim=tuple(range(1, a.dim())), keepdim=True) / 254 * 1.01 + a.abs() / 128 if a.dim() > 1 else 0
        assert ((a - b).abs() <= bound).all(), k
    loaded = load_pretrained(tmp_path / "int8")
    assert loaded.dit.patch_embedding.weight.dtype == torch.bfloat16
    reference = load_pretrained(tmp_path / "bf16", dtype="float32")
    out, ref = dit_output(load_pretrained(tmp_path / "int8", dtype="float32")), dit_output(reference)
    assert (out - ref).abs().mean() < 0.02 * ref.abs().mean()  # a storage format, not another model
    # Re-exporting in place replaces the folder whole; a folder with other files is refused.
    main(["export", str(tmp_path / "int8"), str(tmp_path / "int8"), "--dtype", "float32"])
    assert Checkpoint.open(tmp_path / "int8").entries[key].dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "fp32", "int8"]  # no temporary folders left
    real_rename = Path.rename

    def failing_swap(self, target):  # the new folder cannot be moved in: the old export must survive
        if ".tmp-" in self.name:
            raise OSError("disk full")
        return real_rename(self, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "rename", failing_swap)
        with pytest.raises(OSError, match="disk full"):
            export_checkpoint(tmp_path / "fp32", tmp_path / "int8", int8=True)
    assert Checkpoint.open(tmp_path / "int8").entries[key].dtype == torch.float32  # the previous export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "fp32", "int8"]
    (tmp_path / "bf16" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "int8"), str(tmp_path / "bf16")])
    assert (tmp_path / "bf16" / "notes.txt").read_text() == "mine"


def test_corrupt_int8_scales_are_named(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from bindweave.weights.quantize import SCALE_SUFFIX

    save_pretrained(trained, tmp_path / "fp32")
    main(["export", str(tmp_path / "fp32"), str(tmp_path / "int8"), "--int8"])
    path = tmp_path / "int8" / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(SCALE_SUFFIX))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, path)
    with pytest.raises(WeightsError, match="does not fit"):
        load_pretrained(tmp_path / "int8")


def test_export_keeps_every_dit_option(tiny_config, tmp_path):
    """Options beyond Wan's (absolute positions, positioned branches) travel with the export: a model
    loaded without them would sample differently from the one trained."""
    config = copy.deepcopy(tiny_config)
    dit_args = config["dit"]["init_args"]
    dit_args["absolute_position"] = True
    dit_args["branches"] = [{**branch, "position": True, "refiner_layers": 1} for branch in dit_args["branches"]]
    module = build(config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.dit.parameters():
            p.normal_(0, 0.1)
    save_pretrained(module, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.dit.absolute_position and all(b.position for b in loaded.dit.branches.values())
    assert set(loaded.dit.context_refiners) == set(loaded.dit.branches)
    torch.testing.assert_close(dit_output(loaded), dit_output(module))


def test_wan_layouts_refuse_options_they_cannot_express(tiny_config):
    config = copy.deepcopy(tiny_config)
    config["dit"]["init_args"]["branches"][0]["position"] = True
    dit = build(config).dit
    for to_config in (diffusers_config_for, wan_config_for):
        with pytest.raises(ValueError, match="position on branch 'text'.*bindweave weights export"):
            to_config(dit)
    config["dit"]["init_args"]["branches"][0]["position"] = False
    config["dit"]["init_args"]["absolute_position"] = True
    with pytest.raises(ValueError, match="absolute_position"):
        diffusers_config_for(build(config).dit)
    config["dit"]["init_args"]["absolute_position"] = False
    config["dit"]["init_args"]["branches"][1]["refiner_layers"] = 2
    with pytest.raises(ValueError, match="refiner layers on branch 'image'"):
        wan_config_for(build(config).dit)


def test_save_pretrained_needs_a_config_for_python_built_models(tmp_path):
    from helpers import tiny_module

    with pytest.raises(ValueError, match="built in Python"):
        save_pretrained(tiny_module(), tmp_path)


def test_export_from_lightning_checkpoint_and_cli(trained, tiny_config, tmp_path):
    checkpoint = {"state_dict": trainable_state_dict(trained.model),
                  "hyper_parameters": {**tiny_config, "_instantiator": "lightning.pytorch.cli.instantiate_module"}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    main(["export", str(tmp_path / "last.ckpt"), str(tmp_path / "out")])
    loaded = load_pretrained(tmp_path / "out")
    torch.testing.assert_close(dit_output(loaded), dit_output(trained))
    # A checkpoint with something other than weights in it is refused, not unpickled.
    torch.save({**checkpoint, "callback": Path("/")}, tmp_path / "odd.ckpt")
    with pytest.raises(WeightsError, match="weights_only=True"):
        export_checkpoint(tmp_path / "odd.ckpt", tmp_path / "odd")


def test_init_weights_loads_an_export_into_a_config_built_model(trained, tiny_config, tmp_path):
    save_pretrained(trained, tmp_path / "export", max_shard_bytes=40_000)
    exported = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())["model"]
    assert "init_weights" not in exported  # the export holds the weights itself
    module = build({**tiny_config, "init_weights": str(tmp_path / "export")})
    expected, actual = trainable_state_dict(trained.model), trainable_state_dict(module.model)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    torch.testing.assert_close(dit_output(module), dit_output(trained))
    # An export of another architecture is refused, naming the config to use.
    wider = {**tiny_config, "init_weights": str(tmp_path / "export")}
    wider["dit"] = {**wider["dit"], "init_args": {**wider["dit"]["init_args"], "num_layers": 1}}
    with pytest.raises(WeightsError, match="do not belong to this model config.*unexpected.*config.yaml"):
        build(wider)


def test_load_pretrained_is_strict(trained, tmp_path):
    state = trainable_state_dict(trained.model)
    save_pretrained(trained, tmp_path)
    del state["conditioners.relational.connector.2.bias"]
    save_sharded(state, tmp_path, "model")
    with pytest.raises(WeightsError, match=r"missing \['conditioners.relational.connector.2.bias'\]"):
        load_pretrained(tmp_path)
    state = trainable_state_dict(trained.model)
    state["dit.head.proj.weight"] = torch.zeros(3, 3)
    save_sharded(state, tmp_path, "model")
    with pytest.raises(WeightsError, match=r"model.safetensors: head.proj.weight|dit.head.proj.weight has shape \(3, 3\)"):
        load_pretrained(tmp_path)


def test_released_bindweave_layout_maps_to_dit_and_connector(trained, tiny_config, tmp_path):
    """A tiny state dict with the release's key names (diffusers DiT + text_projector + norm_added_q)."""
    dit, connector = trained.dit, trained.conditioners["relational"].connector
    release = bindweave_to_diffusers(dit.state_dict())
    release.update({f"blocks.{i}.attn2.norm_added_q.weight": torch.ones(dit.dim) for i in range(len(dit.blocks))})
    release.update({"condition_embedder.text_projector.linear_1.weight": connector[0].weight,
                    "condition_embedder.text_projector.linear_1.bias": connector[0].bias,
                    "condition_embedder.text_projector.linear_2.weight": connector[2].weight,
                    "condition_embedder.text_projector.linear_2.bias": connector[2].bias})
    save_sharded(release, tmp_path, "diffusion_pytorch_model", max_shard_bytes=50_000)
    target = build(tiny_config)
    dit_report, connector_report = load_release(target, tmp_path)
    assert len(connector_report.loaded) == 4 and len(dit_report.ignored) == len(dit.blocks) + 4
    torch.testing.assert_close(target.conditioners["relational"].connector[2].weight, connector[2].weight)
    reference = WanTransformer3DModel(**diffusers_config_for(dit)).eval()  # the release's own implementation
    reference.load_state_dict({k: v for k, v in release.items() if "text_projector" not in k and "norm_added_q" not in k})
    torch.manual_seed(0)
    x, t = torch.randn(1, dit.in_channels, 2, 4, 4), torch.tensor([300.0])
    text, image = torch.randn(1, 512, 32), torch.randn(1, 257, 32)
    with torch.no_grad():
        expected = reference(x, t, text, encoder_hidden_states_image=image, return_dict=False)[0]
        torch.testing.assert_close(target.dit(x, t, {"text": text, "image": image}), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# bindweave weights check
# ---------------------------------------------------------------------------------------------


def _official_folder(trained, folder: Path) -> Path:
    """A tiny official Wan2.1 layout: DiT shards + config.json, the VAE/T5/CLIP .pth and the tokenizer."""
    from open_clip.model import _build_vision_tower

    from encoders import T5TextEncoder, WanVAE

    dit = trained.dit
    save_sharded(bindweave_to_wan(dit.state_dict()), folder, "diffusion_pytorch_model", max_shard_bytes=40_000)
    (folder / "config.json").write_text(json.dumps(wan_config_for(dit)))
    torch.save(diffusers_vae_to_wan(tiny(WanVAE).vae.state_dict()), folder / "Wan2.1_VAE.pth")
    t5 = tiny(T5TextEncoder)
    torch.save(transformers_t5_to_wan(t5.model.state_dict()), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    t5.tokenizer.save_pretrained(folder / "google" / "umt5-xxl")
    visual = _build_vision_tower(16, {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8})
    torch.save(open_clip_to_wan_clip(visual.state_dict()), folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    return folder


def test_check_official_folder(trained, tmp_path):
    folder = _official_folder(trained, tmp_path / "Wan2.1-tiny")
    report = check_folder(tmp_path)
    kinds = {c.kind: c for c in report.components}
    assert set(kinds) == {"dit", "vae", "t5", "clip"}, format_report(report)
    assert all(not c.problems for c in report.components), format_report(report)
    assert kinds["dit"].format == "wan" and kinds["dit"].details["in_channels"] == 12
    assert kinds["dit"].details["shards"] > 1
    needs = report.presets["wan2.1-i2v-14b"]
    assert len(needs) == 1 and "dim 64, 2 layers (needs dim 5120, 40 layers)" in needs[0]  # tiny DiT, wrong size
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in report.presets["mllm/qwen2.5-vl-7b"][0]
    # A missing shard and a missing tokenizer are named.
    sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[0].unlink()
    for file in (folder / "google" / "umt5-xxl").iterdir():
        file.unlink()
    text = format_report(check_folder(folder))
    assert "diffusion_pytorch_model-00001-of-" in text and "missing" in text
    assert "umt5-xxl: tokenizer folder missing" in text
    assert "DiT (Wan-AI/Wan2.1-I2V-14B-480P" in text and "VAE" not in text.split("wan2.1-i2v-14b")[1].split("\n  w")[0]


def test_check_diffusers_and_export_folders(trained, tmp_path):
    diffusers_dir = tmp_path / "diffusers"
    model = WanTransformer3DModel(**diffusers_config_for(trained.dit))
    model.load_state_dict(bindweave_to_diffusers(trained.dit.state_dict()))
    model.save_pretrained(diffusers_dir / "transformer")
    trained.vae.vae.save_pretrained(diffusers_dir / "vae")
    save_pretrained(trained, tmp_path / "export")
    mllm = trained.conditioners["relational"].mllm
    mllm.model.save_pretrained(tmp_path / "Qwen2.5-VL-tiny")
    mllm.processor.save_pretrained(tmp_path / "Qwen2.5-VL-tiny")
    report = check_folder(tmp_path)
    found = {(c.kind, c.format) for c in report.components if not c.problems}
    assert {("dit", "diffusers"), ("vae", "diffusers"), ("export", "bindweave"), ("mllm", "transformers")} <= found, \
        format_report(report)


def test_weights_cli_as_a_user_runs_it(tmp_path, capsys):
    result = subprocess.run([sys.executable, "-m", "bindweave.cli", "weights", "check", str(tmp_path), "--json"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["components"] == []
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path / "no.ckpt"), str(tmp_path / "out")])
    assert exit_.value.code == 1 and "no.ckpt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# End to end: a config naming an official Wan2.1 folder builds the model from those files
# ---------------------------------------------------------------------------------------------


def test_config_with_official_weights_builds_and_trains(trained, tmp_path):
    """configs/weights/*.yaml at tiny sizes: PretrainedWanDiT + Wan's .pth VAE/T5/CLIP from one folder."""
    import lightning as L

    from bindweave.cli.app import BindWeaveCLI
    from bindweave.training.module import BindWeave
    from encoders.vae import TINY_VAE_CONFIG
    from helpers import synthetic_batch

    folder = _official_folder(trained, tmp_path / "Wan2.1-tiny")
    clip_dir = tmp_path / "clip-config"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}}}))
    weights = yaml.safe_load((ROOT / "configs" / "weights" / "wan2.1-i2v-14b-official.yaml").read_text())
    text = yaml.safe_dump(weights).replace("/path/to/Wan2.1-I2V-14B-480P", str(folder))
    weights = yaml.safe_load(text)
    model = weights["model"]
    model["dit"]["init_args"].update(dtype="float32", **{k: v for k, v in trained.hparams["dit"]["init_args"].items()})
    model["vae"]["init_args"].update(latents_mean=TINY_VAE_CONFIG["latents_mean"], latents_std=TINY_VAE_CONFIG["latents_std"])
    model["relational"]["init_args"]["text_encoder"]["init_args"].update(max_length=32, dtype="float32")
    model["identity"]["init_args"]["image_encoder"]["init_args"].update(model_name=f"local-dir:{clip_dir}", dtype="float32")
    (tmp_path / "weights.yaml").write_text(yaml.safe_dump(weights))
    cli = BindWeaveCLI(BindWeave, L.LightningDataModule, subclass_mode_data=True, run=False,
                       args=["-c", str(ROOT / "configs" / "tiny.yaml"), "-c", str(tmp_path / "weights.yaml")])
    module = cli.model
    module.configure_model()
    for key, value in trained.dit.state_dict().items():
        torch.testing.assert_close(module.dit.state_dict()[key], value, rtol=0, atol=0)
    assert module.vae.vae.config.z_dim == 4
    loss = module.flow_loss(synthetic_batch(2))
    assert torch.isfinite(loss)
    loss.backward()
    assert module.dit.patch_embedding.weight.grad is not None


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "weights").glob("*.yaml")))
def test_weights_configs_layer_on_the_paper_config(name):
    import lightning as L

    from bindweave.cli.app import BindWeaveCLI
    from bindweave.training.module import BindWeave

    cli = BindWeaveCLI(BindWeave, L.LightningDataModule, subclass_mode_data=True, run=False, args=[
        "-c", str(ROOT / "configs" / "bindweave-wan2.1-i2v-14b.yaml"), "-c", str(ROOT / "configs" / "weights" / name),
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32"])  # parsed; nothing is loaded
    config = cli.config
    model = config.model
    assert model.dit.class_path == "bindweave.weights.dit_loading.PretrainedWanDiT"
    assert model.dit.init_args.pretrained_path.startswith("/path/to/Wan2.1-")
    encoders = [model.vae, model.relational.init_args.text_encoder, model.identity.init_args.image_encoder]
    assert all(e.init_args.tiny_config is None and e.init_args.pretrained_path.startswith("/path/to/") for e in encoders)
    assert model.relational.init_args.mllm.init_args.pretrained_path == "/path/to/Qwen2.5-VL-7B-Instruct"


def test_load_pretrained_runs_eager_whatever_the_export_was_trained_with(trained, tmp_path):
    """An export of a run trained with ``parallelism.compile`` loads eager (a CPU would compile every
    block on the first video); the caller can still ask for it."""
    save_pretrained(trained, tmp_path)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["model"]["parallelism"] = {"compile": True, "activation_checkpointing": "full"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = load_pretrained(tmp_path)
    assert not loaded.parallelism.compile and loaded.parallelism.activation_checkpointing == "none"
    torch.testing.assert_close(dit_output(loaded), dit_output(trained))
    asked = load_pretrained(tmp_path, model_overrides={"parallelism": {"compile": True}})
    assert asked.parallelism.compile
