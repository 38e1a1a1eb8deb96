"""``bindweave weights check`` and ``bindweave data pack`` as a user runs them: a mistake or a bad
file is one ``bindweave <command>: error: ...`` line naming the file, exit status 1, no traceback;
a run that works exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bindweave.cli.data import main as data_main
from bindweave.model.dit import CrossAttentionBranch, WanDiT
from bindweave.weights.loading import save_sharded
from bindweave.weights.wan_official import bindweave_to_wan, wan_config_for
from bindweave.cli.weights import main as weights_main
from tests.data_helpers import ROOT, make_clips


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, command: str) -> str:
    """The one error line of ``err`` (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"bindweave {command}: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# bindweave weights check
# ---------------------------------------------------------------------------------------------


def healthy_folder(root: Path) -> Path:
    """A tiny Wan2.1 T2V DiT (official layout) and a stand-in Qwen2.5-VL-3B folder (config, one
    safetensors file, processor files): no problem, and the mllm/qwen2.5-vl-3b preset is ready."""
    torch.manual_seed(0)
    dit = WanDiT(in_channels=16, out_channels=16, dim=32, ffn_dim=48, num_heads=2, num_layers=2, freq_dim=32,
                 branches=[CrossAttentionBranch("text", 24)])
    save_sharded(bindweave_to_wan(dit.state_dict()), root / "Wan2.1-tiny", "diffusion_pytorch_model")
    (root / "Wan2.1-tiny" / "config.json").write_text(json.dumps(wan_config_for(dit)))
    mllm = root / "Qwen2.5-VL-3B"
    save_sharded({"lm_head.weight": torch.zeros(2, 2)}, mllm, "model")
    (mllm / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "vision_config": {}, "hidden_size": 2048}))
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        (mllm / name).write_text("{}")
    return root


@pytest.mark.slow  # a real process (~13 s); the same messages are checked in-process in the default run
def test_check_names_a_garbage_safetensors_without_config_as_a_user_runs_it(tmp_path):
    garbage = tmp_path / "downloads" / "model.safetensors"
    garbage.parent.mkdir()
    garbage.write_bytes(b"<html>rate limited</html>" * 4)  # what a failed download often is
    result = subprocess.run([sys.executable, "-m", "bindweave.cli", "weights", "check", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr, "weights check")
    assert str(garbage) in line and "download it again" in line
    assert "[PROBLEM] file" in result.stdout and str(garbage) in result.stdout
    assert "    - " not in result.stdout  # no preset shopping list without --verbose


def test_check_reports_every_unreadable_file(tmp_path, capsys):
    """A truncated shard inside a recognised DiT folder, a stray garbage file and a config.json that
    does not parse: all three listed, each with what to do; exit 1, the error line names the first."""
    folder = healthy_folder(tmp_path)
    shard = sorted((folder / "Wan2.1-tiny").glob("diffusion_pytorch_model*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-64])  # an interrupted download
    stray = folder / "Qwen2.5-VL-3B" / "extra" / "adapter.safetensors"
    stray.parent.mkdir()
    stray.write_bytes(b"\x00" * 3)
    (folder / "other").mkdir()
    (folder / "other" / "config.json").write_text("{not json")
    code, out, err = run_main(weights_main, ["check", str(folder)], capsys)
    assert code == 1
    line = error_line(err, "weights check")
    assert "3 problems" in line and str(shard) in line
    for path in (shard, stray, folder / "other" / "config.json"):
        assert f"{path}: " in out, out
    assert out.count("download it again, or delete it if nothing needs it") == 2, out
    assert out.count("[PROBLEM]") == 3, out


def test_check_of_a_healthy_folder_exits_0_and_lists_presets_only_when_verbose(tmp_path, capsys):
    folder = healthy_folder(tmp_path)
    code, out, err = run_main(weights_main, ["check", str(folder)], capsys)
    assert code == 0 and err == ""
    assert "[ok] dit" in out and "[ok] mllm" in out and "PROBLEM" not in out
    preset_lines = [line for line in out.splitlines() if "preset" in line]
    assert preset_lines == ["presets ready: mllm/qwen2.5-vl-3b (6 not; --verbose lists what each still needs)"]
    assert "Wan-AI/" not in out

    code, out, err = run_main(weights_main, ["check", str(folder), "--verbose"], capsys)
    assert code == 0 and err == ""
    assert "  mllm/qwen2.5-vl-3b: ready" in out and "  wan2.1-i2v-14b: missing" in out
    assert "    - DiT (Wan-AI/Wan2.1-I2V-14B-480P" in out

    code, out, _ = run_main(weights_main, ["check", str(folder), "--json"], capsys)
    assert code == 0 and json.loads(out)["presets"]["mllm/qwen2.5-vl-3b"] == []


@pytest.mark.parametrize("what", ["missing", "file"])
def test_check_of_a_missing_folder_or_a_file_is_one_line(tmp_path, capsys, what):
    path = tmp_path / "nowhere"
    if what == "file":
        path.write_bytes(b"")
    code, out, err = run_main(weights_main, ["check", str(path)], capsys)
    assert code == 1 and out == ""
    line = error_line(err, "weights check")
    assert str(path) in line and ("no such folder" if what == "missing" else "not a folder") in line


# ---------------------------------------------------------------------------------------------
# bindweave data pack
# ---------------------------------------------------------------------------------------------


def pack_args(manifest: Path, output: Path, *extra: str) -> list[str]:
    return ["pack", "--input", str(manifest), "--output", str(output), "--fps", "8", "--workers", "1",
            "--no_progress", *extra]


@pytest.mark.slow  # a real process (~13 s); the same messages are checked in-process in the default run
def test_pack_rejecting_every_item_into_a_new_folder_as_a_user_runs_it(tmp_path):
    """The clips hold 9 frames at 8 fps; 50 frames are asked for: every item is short."""
    manifest = make_clips(tmp_path / "clips", count=2)
    output = tmp_path / "new"
    result = subprocess.run([sys.executable, "-m", "bindweave.cli", "data", *pack_args(manifest, output, "--num_frames", "50")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr, "data pack")
    assert str(manifest) in line and "all 2 item(s) rejected (short_video 2" in line and str(output) in line
    for i in range(2):  # each item, and why
        assert f"- clip-{i}: short_video: {tmp_path / 'clips' / f'clip{i}.mp4'}: 1.00 s, 9 frames" in result.stdout
    assert not output.exists()


def test_pack_rejecting_every_item_into_an_existing_folder_leaves_it_as_it_was(tmp_path, capsys):
    manifest = make_clips(tmp_path / "clips", count=2)
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    code, out, err = run_main(data_main, pack_args(manifest, output, "--num_frames", "50"), capsys)
    assert code == 1 and str(manifest) in error_line(err, "data pack")
    assert "Rejected 2:" in out and "- clip-1: short_video:" in out
    assert sorted(p.name for p in output.iterdir()) == ["notes.txt"]

    # An existing shard set with --overwrite: kept whole (shards and summary), not replaced by nothing.
    code, out, err = run_main(data_main, pack_args(manifest, output, "--num_frames", "5"), capsys)
    assert code == 0 and "Wrote 2 samples to 1 shard(s)" in out and err == ""
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    code, out, err = run_main(data_main, pack_args(manifest, output, "--num_frames", "50", "--overwrite"), capsys)
    assert code == 1 and str(output) in error_line(err, "data pack")
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before


def test_pack_that_writes_exits_0_and_lists_each_rejection(tmp_path, capsys):
    manifest = make_clips(tmp_path / "clips", count=2)
    with manifest.open("a") as f:
        f.write(json.dumps({"id": "gone", "video": "nowhere.mp4", "references": ["clip0_ref0.png"], "prompt": "p"}) + "\n")
    output = tmp_path / "out"
    code, out, err = run_main(data_main, pack_args(manifest, output, "--num_frames", "5"), capsys)
    assert code == 0 and err == ""
    assert "Wrote 2 samples to 1 shard(s)" in out and "Rejected 1:" in out
    assert f"- gone: missing_file: video {tmp_path / 'clips' / 'nowhere.mp4'}" in out
    assert sorted(p.name for p in output.iterdir()) == ["shard-000000.tar", "shard.pack.json"]


@pytest.mark.parametrize("mistake", ["missing input", "binary input", "output is a file", "existing shards"])
def test_pack_input_mistakes_are_one_line(tmp_path, capsys, mistake):
    manifest = make_clips(tmp_path / "clips", count=1)
    output = tmp_path / "out"
    if mistake == "missing input":
        manifest, named = tmp_path / "nowhere.jsonl", tmp_path / "nowhere.jsonl"
    elif mistake == "binary input":
        manifest = named = tmp_path / "clips" / "clip0.mp4"
    elif mistake == "output is a file":
        output.write_text("")
        named = output
    else:
        assert run_main(data_main, pack_args(manifest, output, "--num_frames", "5"), capsys)[0] == 0
        named = output
    code, _, err = run_main(data_main, pack_args(manifest, output, "--num_frames", "5"), capsys)
    assert code == 1 and str(named) in error_line(err, "data pack")
