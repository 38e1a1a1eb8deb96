"""The CLI as a user runs it: fit then predict on configs/tiny.yaml, --help, --print_config."""

import subprocess
import sys
from pathlib import Path

import pytest

from bindweave.cli.app import run_cli
from bindweave.data.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_fit_then_predict_writes_videos(tmp_path, monkeypatch):
    """The README's main command, with fewer steps: tiny fit, then predict from its last.ckpt."""
    monkeypatch.chdir(tmp_path)  # the tiny config writes under ./outputs/tiny
    common = ["-c", TINY, "--trainer.enable_progress_bar", "false"]
    run_cli(["fit", *common, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"])
    run_cli(["fit", *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])  # rerun-safe
    checkpoint = tmp_path / "outputs" / "tiny" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in checkpoint.parent.glob("last*")) == ["last.ckpt"]
    out = tmp_path / "outputs" / "tiny" / "videos"
    cli = run_cli(["predict", *common, "--ckpt_path", str(checkpoint)])
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == cli.datamodule.hparams.num_predict_samples
    assert read_video(videos[0]).shape == (5, 32, 32, 3)
    assert (out / f"{videos[0].stem}.json").exists()
    # Flags on the command line win over the config stored in the checkpoint (Lightning alone lets
    # the checkpoint win): here fewer sampling steps and another sampler.
    cli = run_cli(["predict", *common, "--ckpt_path", str(checkpoint), "--model.sampling.num_steps", "2",
                   "--model.sampling.sampler", "unipc", "--trainer.default_root_dir", str(tmp_path / "again")])
    assert cli.model.sampling.num_steps == 2 and cli.model.sampling.sampler == "unipc"
    assert cli.model.sampling.height == 32  # the rest still comes from the configs


def test_print_config_is_complete_and_rerunnable(tmp_path):
    printed = subprocess.run(
        [sys.executable, "-m", "bindweave.cli", "fit", "-c", TINY, "--print_config"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    for key in ("relational:", "mllm:", "identity:", "multi_reference:", "sampling:", "branches:"):
        assert key in printed
    config = tmp_path / "config.yaml"
    config.write_text(printed)
    run_cli(["fit", "-c", str(config), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
             "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
             "--trainer.callbacks", "[]"])


def test_help_lists_the_model_options():
    result = subprocess.run([sys.executable, "-m", "bindweave.cli", "fit", "--help"], capture_output=True, text=True,
                            check=True, cwd=ROOT, env={"COLUMNS": "200", "PATH": ""})
    for option in ("--model.dit", "--model.vae", "--model.relational", "--model.identity",
                   "--model.multi_reference", "--model.extra_conditioners", "--model.optimizer",
                   "--model.flow_shift", "--model.sampling.num_steps", "--model.sampling.guidance_scale", "--data"):
        assert option in result.stdout, option


def test_unknown_class_in_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  identity:\n    class_path: conditioners.NoSuchConditioner\n")
    with pytest.raises(SystemExit):
        run_cli(["fit", "-c", TINY, "-c", str(bad)])
    assert "NoSuchConditioner" in capsys.readouterr().err


def test_bf16_true_keeps_frozen_encoder_dtypes_and_validation_is_deterministic(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    common = ["-c", TINY, "--trainer.enable_progress_bar", "false", "--trainer.precision", "bf16-true"]
    cli = run_cli(["fit", *common, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    model = cli.model
    assert model.dit.patch_embedding.weight.dtype == torch.bfloat16
    assert model.vae.vae.encoder.conv_in.weight.dtype == torch.float32  # configured dtype: float32
    assert next(model.conditioners["relational"].text_encoder.parameters()).dtype == torch.float32
    checkpoint = str(tmp_path / "outputs" / "tiny" / "checkpoints" / "last.ckpt")
    first = run_cli(["validate", *common, "--ckpt_path", checkpoint]).trainer.callback_metrics["val/loss"]
    second = run_cli(["validate", *common, "--ckpt_path", checkpoint]).trainer.callback_metrics["val/loss"]
    assert first == second
    tested = run_cli(["test", *common, "--ckpt_path", checkpoint]).trainer.callback_metrics["test/loss"]
    assert torch.isfinite(tested)


def test_fit_console_hides_the_library_warnings_nobody_can_act_on(tmp_path):
    """`bindweave fit` as a user runs it prints none of the three library warnings that say nothing
    actionable here (a streamed dataset's exact length, frozen encoders in eval mode, Lightning's own
    treespec deprecation); the run itself finishes."""
    result = subprocess.run(
        [sys.executable, "-m", "bindweave.cli", "fit", "-c", TINY, "--trainer.max_steps", "1",
         "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-2000:]
    assert "`Trainer.fit` stopped: `max_steps=1` reached" in output
    for message in ("IterableDataset` has `__len__` defined", "module(s) in eval mode", "isinstance(treespec, LeafSpec)"):
        assert message not in output, message


def test_mixed_precision_norms_warn_nothing_under_the_console_filters():
    """Under bf16 autocast the DiT's RMSNorms get bf16 activations with fp32 weights, and torch warns
    (once a process) that it takes its unfused kernel: every GPU `fit` and `predict` of a bf16-mixed
    config. The console's filters hide exactly that warning (nothing to act on). Fresh
    interpreters: torch warns only the first time."""
    script = ("import sys, torch\n"
              "if sys.argv[1] == 'filtered':\n"
              "    from bindweave.cli.command import hide_known_warnings\n"
              "    hide_known_warnings()\n"
              "torch.nn.RMSNorm(8)(torch.randn(2, 8, dtype=torch.bfloat16))\n")
    outputs = {}
    for mode in ("plain", "filtered"):
        run = subprocess.run([sys.executable, "-c", script, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        outputs[mode] = run.stderr
    assert "Mismatch dtype between input and weight" in outputs["plain"]  # torch still warns
    assert "Mismatch dtype" not in outputs["filtered"], outputs["filtered"]


def test_the_strategy_library_is_imported_quietly_only_where_a_run_names_it(tmp_path):  # (no "deepspeed" in tmp_path)
    """DeepSpeed logs to the stdout of its import (its accelerator line), which broke
    `--print_config > run.yaml`; the console script imports it first with stdout sent to stderr,
    but only when the command line or a config names it (the import takes seconds)."""
    from bindweave.cli.command import names_deepspeed

    plain, custom = tmp_path / "plain.yaml", tmp_path / "mine.yaml"
    plain.write_text("trainer:\n  precision: bf16-mixed\n")
    custom.write_text("trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.DeepSpeedStrategy\n")
    assert names_deepspeed(["fit", "-c", "configs/strategy/deepspeed-zero2.yaml"])
    assert names_deepspeed(["fit", "--config", str(custom)])  # named inside the file only
    assert not names_deepspeed(["fit", "-c", str(plain), "--trainer.max_steps", "3"])


_TOOLS_ALONE = """
import sys
from bindweave.cli.command import run_command
for words in (["--help"], ["eval", "--help"], ["weights", "--help"], ["data", "--help"], ["data", "sprites", "--help"], ["demo", "--help"]):
    try:
        run_command(words)
    except SystemExit as stop:
        assert not stop.code, (words, stop.code)
heavy = ("lightning", "encoders", "conditioners", "callbacks", "open_clip", "diffusers", "transformers")
print("imported:", sorted(name for name in heavy if name in sys.modules))
"""


def test_the_tools_start_without_lightning_or_the_model_stack():
    """`bindweave eval|weights|data|demo` load what they use: Lightning alone (with the torchmetrics,
    transformers and torchvision it imports) is ~6 s of a 2-core machine's 10-s start, the encoders' open_clip
    and diffusers ~2.5 s more."""
    result = subprocess.run([sys.executable, "-c", _TOOLS_ALONE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("imported: []"), result.stdout[-500:]
