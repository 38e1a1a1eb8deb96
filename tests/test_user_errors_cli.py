"""Mistakes a user makes on the ``bindweave`` command line: each gets one line naming the file or
key and the fix, the right exit status and no traceback (issue 18); the GPU's default device cannot
break host-side reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bindweave.cli import app as cli
from bindweave.cli.command import run_command
from bindweave.errors import EXIT_USAGE, EXIT_USER_ERROR

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run_main(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """``bindweave <argv>`` in this process, as the console script runs it: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["bindweave"])  # pytest's own arguments are not the command's
    capsys.readouterr()
    try:
        run_command(argv)
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    return status, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one error line of stderr; fails if there is a traceback or more than one error line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 1-step fit of configs/tiny.yaml; its last.ckpt."""
    root = tmp_path_factory.mktemp("tiny")
    cli.run_cli(["fit", "-c", TINY, *QUIET, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                 "--trainer.default_root_dir", str(root), "--trainer.logger", "false"])
    return root / "checkpoints" / "last.ckpt"


# ----------------------------------------------------------------------------------------------
# Checkpoints (--ckpt_path)
# ----------------------------------------------------------------------------------------------


def test_missing_empty_truncated_checkpoints_are_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "b.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "c.ckpt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])
    cases = {tmp_path / "a.ckpt": "no such checkpoint", empty: "empty file", truncated: "truncated"}
    for path, problem in cases.items():
        status, err = run_main(["predict", "-c", TINY, "--ckpt_path", str(path)], capsys, monkeypatch)
        line = error_line(err)
        assert status == EXIT_USER_ERROR, err
        assert line.startswith("bindweave predict: error: ") and str(path) in line, line
        assert problem in line.split(str(path), 1)[1], line  # in the message, not in the (tmp) path


def test_checkpoint_of_another_model_shape_names_the_setting(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    status, err = run_main(["predict", "-c", TINY, *QUIET, "--ckpt_path", str(tiny_checkpoint),
                            "--trainer.default_root_dir", str(tmp_path), "--model.dit.init_args.dim", "32",
                            "--model.dit.init_args.num_heads", "2"], capsys, monkeypatch)
    line = error_line(err)
    assert status == EXIT_USER_ERROR
    assert str(tiny_checkpoint) in line and "dit.dim=64 (this config: 32)" in line
    assert "pass the config it was trained with" in line


def test_console_script_exit_status_and_single_line(tmp_path):
    """The installed entry point itself (a real process), on a missing checkpoint."""
    result = subprocess.run([sys.executable, "-m", "bindweave.cli", "predict", "-c", TINY, "--ckpt_path",
                             str(tmp_path / "nope.ckpt")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR
    assert error_line(result.stderr).endswith("(e.g. <default_root_dir>/checkpoints/last.ckpt).")


# ----------------------------------------------------------------------------------------------
# init_weights (export folders)
# ----------------------------------------------------------------------------------------------

SPRITES_DEMO = ["-c", str(ROOT / "configs/sprites-reader.yaml"), "-c", str(ROOT / "configs/predict.yaml"),
                "-c", str(ROOT / "configs/sprites/demo.yaml")]


def test_init_weights_missing_or_corrupt(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.yaml").write_text((ROOT / "models/sprites/config.yaml").read_text())
    (corrupt / "model.safetensors").write_bytes((ROOT / "models/sprites/model.safetensors").read_bytes()[:3000])
    cases = {tmp_path / "no-such-export": "no such export folder", corrupt: "corrupt safetensors file"}
    for folder, problem in cases.items():
        status, err = run_main(["predict", *SPRITES_DEMO, "--model.init_weights", str(folder),
                                "--trainer.default_root_dir", str(tmp_path / "out")], capsys, monkeypatch)
        line = error_line(err)
        assert status == EXIT_USER_ERROR and str(folder) in line and problem in line, line


# ----------------------------------------------------------------------------------------------
# Config mistakes
# ----------------------------------------------------------------------------------------------


def test_config_typos_put_the_error_first_with_a_suggestion(tmp_path, capsys, monkeypatch):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_stpes: 3\n")
    cases = [
        (["fit", "-c", TINY, "--trainer.max_stpes", "3"], "unknown option 'trainer.max_stpes'; did you mean 'trainer.max_steps'?"),
        (["fit", "-c", TINY, "-c", str(typo)], "did you mean 'trainer.max_steps'?"),
        (["fit", "-c", TINY, "--model.identity.class_path", "conditioners.IdentityConditionr"],
         "did you mean 'conditioners.IdentityConditioner'?"),
        (["fit", "-c", str(tmp_path / "missing.yaml")], f"-c {tmp_path / 'missing.yaml'}: no such config file"),
    ]
    for argv, expected in cases:
        status, err = run_main(argv, capsys, monkeypatch)
        assert status == EXIT_USAGE, err
        assert len(err.strip().splitlines()) == 1, err  # no usage dump before it
        assert err.startswith("bindweave fit: error: ") and expected in err, err


def test_help_still_lists_every_option(capsys, monkeypatch):
    status, _ = run_main(["fit", "--help"], capsys, monkeypatch)
    assert status == 0


# ----------------------------------------------------------------------------------------------
# The GPU's default device (issue 18.1): host buffers stay on the CPU
# ----------------------------------------------------------------------------------------------


def test_weights_read_on_the_cpu_whatever_the_default_device():
    """Lightning builds models under the accelerator's default device; a host buffer made there
    cannot be filled from a file. ``meta`` stands in for ``cuda`` on a CPU machine."""
    from bindweave.weights.loading import Checkpoint

    checkpoint = Checkpoint.open(ROOT / "models" / "sprites", prefix="model")
    key = next(k for k in checkpoint.keys() if len(checkpoint.shape(k)) == 2)
    expected = checkpoint.read(key)
    with torch.device("meta"):
        got = checkpoint.read(key)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_demo_model_builds_under_a_non_cpu_default_device(monkeypatch):
    """The README demo's model (export folder read in ``configure_model``) builds under a non-CPU
    default device, as under Lightning on a GPU."""
    monkeypatch.chdir(ROOT)
    parsed = cli.BindWeaveCLI(cli.BindWeave, cli.L.LightningDataModule, subclass_mode_data=True, run=False,
                              args=SPRITES_DEMO)
    with torch.device("meta"):
        parsed.model.configure_model()
    assert parsed.model.dit.patch_embedding.weight.is_meta


# ----------------------------------------------------------------------------------------------
# Every run writes under its own root (issue 18.11)
# ----------------------------------------------------------------------------------------------


def test_two_roots_keep_their_own_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for root in ("run-a", "run-b"):
        cli.run_cli(["fit", "-c", TINY, *QUIET, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                     "--trainer.logger", "false", "--trainer.default_root_dir", root])
    for root in ("run-a", "run-b"):
        assert (tmp_path / root / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "outputs").exists()  # nothing written to the config's own root


@pytest.mark.parametrize("config", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")))
def test_no_config_fixes_a_checkpoint_folder(config):
    """A checkpoint callback with a fixed ``dirpath`` would make two runs of different roots clobber
    each other's ``last.ckpt``: configs leave it to ``callbacks.RunCheckpoint``."""
    import yaml

    text = yaml.safe_load((ROOT / config).read_text()) or {}
    callbacks = (text.get("trainer") or {}).get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if "Checkpoint" in str(callback.get("class_path", "")):
            assert callback["class_path"] == "callbacks.RunCheckpoint", config
            assert "dirpath" not in (callback.get("init_args") or {}), config


def test_a_constructor_mistake_is_one_line_too(tmp_path, capsys, monkeypatch):
    """A UserError raised while jsonargparse instantiates a class (here the requests datamodule)."""
    status, err = run_main(["predict", "-c", TINY, "-c", str(ROOT / "configs/predict.yaml"), "--data.batch_size", "0",
                            "--trainer.default_root_dir", str(tmp_path)], capsys, monkeypatch)
    assert status == EXIT_USER_ERROR
    assert "data.batch_size must be >= 1" in error_line(err)


def test_a_shadowing_package_of_the_same_name_is_named(tmp_path, capsys, monkeypatch):
    """PyPI has unrelated `encoders` and `callbacks` packages: one installed over ours is a one-line error."""
    import types

    fake = types.ModuleType("encoders")
    fake.__file__ = str(tmp_path / "site-packages" / "encoders" / "__init__.py")
    monkeypatch.setitem(sys.modules, "encoders", fake)
    status, err = run_main(["fit", "--help"], capsys, monkeypatch)
    assert status == EXIT_USER_ERROR
    line = error_line(err)
    assert "site-packages/encoders" in line and "pip uninstall encoders" in line


@pytest.mark.parametrize("setting, says", [
    (["--model.dit.init_args.dim", "7"], "dim=7 must split into num_heads"),
    (["--model.parallelism.compile_mode", "reduce-overhead"], "reduce-overhead (CUDA graphs) cannot train"),
])
def test_a_model_setting_that_cannot_work_is_one_line(setting, says, tmp_path, capsys, monkeypatch):
    status, err = run_main(["fit", "-c", TINY, *setting, "--trainer.max_steps", "1",
                            "--trainer.default_root_dir", str(tmp_path)], capsys, monkeypatch)
    assert status == EXIT_USER_ERROR
    assert says in error_line(err)


def test_trainer_settings_lightning_refuses_are_one_line(tmp_path, capsys, monkeypatch):
    """A config with a progress-bar callback and ``enable_progress_bar false``: Lightning raises while
    building the Trainer; the command says so on one line with exit status 2."""
    status, err = run_main(["fit", "-c", str(ROOT / "configs/sprites-reader.yaml"), "--trainer.enable_progress_bar", "false",
                            "--trainer.default_root_dir", str(tmp_path)], capsys, monkeypatch)
    assert status == EXIT_USAGE
    line = error_line(err)
    assert "enable_progress_bar=False" in line and "LossProgressBar" in line and "change one of them" in line


def test_a_shadowing_package_not_yet_imported_is_named_before_a_tool_runs(tmp_path):
    """The check looks where an import would find `callbacks` without importing it (a tool imports
    none of the three packages): one found first on the path is named, exit status 1."""
    import os
    import subprocess

    shadow = tmp_path / "callbacks"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise RuntimeError('imported')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "bindweave.cli", "weights", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    line = error_line(result.stderr)
    assert str(shadow) in line and "pip uninstall callbacks" in line and "RuntimeError" not in result.stderr


def test_bindweave_alone_or_a_wrong_command_names_every_command(capsys, monkeypatch):
    """Lightning's own message listed fit/validate/test/predict only; the tools were invisible."""
    status, err = run_main([], capsys, monkeypatch)
    line = error_line(err)
    assert status == EXIT_USAGE and line.startswith("bindweave: error: no command")
    for command in ("fit", "validate", "test", "predict", "data", "demo", "eval", "weights"):
        assert command in line, command
    status, err = run_main(["predcit", "-c", TINY], capsys, monkeypatch)
    assert status == EXIT_USAGE and "unknown command 'predcit' (did you mean 'predict'?)" in error_line(err)


def test_bindweave_help_describes_every_command(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bindweave"])
    run_command(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "data", "demo", "eval", "weights"):
        assert f"\n  {command} " in out, command
