"""What a user of `bindweave predict` sees: one line for a bad requests file, warnings about odd
references, progress per denoising step, "all N already done" on a rerun, no library noise."""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
from PIL import Image

from bindweave.cli.app import run_cli
from bindweave.cli.command import main
from bindweave.errors import UserError
from tests.pipeline_helpers import ROOT, TINY, cli_module, draw_reference, tiny_model_config, write_checkpoint

PREDICT = ROOT / "configs" / "predict.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(cli_module(tiny_model_config(num_steps=2)), tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def predict_args(checkpoint, requests) -> list[str]:
    return ["predict", "-c", str(TINY), "-c", str(PREDICT), "--ckpt_path", str(checkpoint),
            "--data.requests", str(requests), "--model.sampling.num_steps", "2"]


def test_a_missing_or_empty_requests_file_is_one_line_and_exit_status_1(checkpoint, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        run_cli(predict_args(checkpoint, "nope.jsonl"))
    message = str(caught.value)
    assert "\n" not in message and "'nope.jsonl'" in message and str(tmp_path) in message
    assert "does not exist" in message and "--data.requests" in message
    capfd.readouterr()
    monkeypatch.setattr(sys, "argv", ["bindweave", *predict_args(checkpoint, "nope.jsonl")])
    with pytest.raises(SystemExit) as exited:
        main()  # the console script
    assert exited.value.code == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("bindweave predict: error: requests file 'nope.jsonl'")
    # A file without a request is the same kind of mistake, not a run that does nothing.
    (tmp_path / "empty.jsonl").write_text("# to do\n\n")
    with pytest.raises(UserError, match="has no requests"):
        run_cli(predict_args(checkpoint, tmp_path / "empty.jsonl"))
    assert not list(tmp_path.rglob("lightning_logs"))


def test_predict_console_warnings_progress_and_a_rerun_with_everything_done(checkpoint, tmp_path, monkeypatch, capfd):
    draw_reference(tmp_path / "red.png", (220, 40, 40))
    Image.new("RGB", (3, 3), (220, 40, 40)).save(tmp_path / "small.png")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(tmp_path / "cmyk.jpg")
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "red", "prompt": "the red circle moves left", "references": ["red.png"]},
        {"id": "small", "prompt": "a tiny red circle", "references": ["small.png", "small.png"]},
        {"id": "cmyk", "prompt": "a cyan thing", "references": ["cmyk.jpg"]},
    ]))
    # As a user runs it, in a process of its own; TQDM_MININTERVAL=0 prints every step of the bars.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_MININTERVAL": "0"}
    run = subprocess.run([sys.executable, "-m", "bindweave.cli", *predict_args(checkpoint, requests)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for request_id in ("red", "small", "cmyk"):  # a step counter per video, not one tick per batch
        assert re.search(rf"{request_id}: +50%\|[^|]*\| 1/2 ", run.stderr), run.stderr[-3000:]
    assert re.search(r"Predict: +100%\|[^|]*\| 3/3 ", run.stderr)
    for noise in ("Epoch", "LeafSpec", "custom batch sampler", "does not have many workers"):
        assert noise not in run.stderr + run.stdout, noise

    out = tmp_path / "outputs" / "tiny" / "videos"
    small = json.loads((out / "small.json").read_text())["warnings"]
    assert small == ["reference 'small.png': 3x3 pixels, enlarged 10.7x to fit the 32x32 video (more than 4x: "
                     "expect a blurred subject); give one of at least 8x8 pixels"]  # once, though given twice
    cmyk = json.loads((out / "cmyk.json").read_text())["warnings"]
    assert len(cmyk) == 1 and cmyk[0].startswith("reference 'cmyk.jpg': CMYK, converted to RGB")
    assert json.loads((out / "red.json").read_text())["warnings"] == []
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Predict: 3 done, 2 with warnings")
    assert f"- small: {small[0]}\n" in summary and f"- cmyk: {cmyk[0]}\n" in summary
    assert "Predict summary (3 done, 2 with warnings)" in run.stdout and "- small: reference 'small.png'" in run.stdout
    assert not list(tmp_path.rglob("lightning_logs"))

    # A rerun with every id done: one line, exit status 0, summary.md rewritten, no Lightning warning
    # about a loader of length zero. A machine with many cores would hear Lightning suggest more
    # DataLoader workers: that warning stays hidden during predict, and only there.
    from lightning.pytorch.trainer.connectors import data_connector
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda num_devices: 8)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bindweave", *predict_args(checkpoint, requests)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main()  # returns: exit status 0
        after = [str(w.message) for w in caught]
        warnings.warn("The 'predict_dataloader' does not have many workers (after predict)", PossibleUserWarning)
    assert not [m for m in after if "does not have many workers" in m or "Total length of `DataLoader`" in m], after
    assert "after predict" in str(caught[-1].message)  # the filter went with the run
    printed = capfd.readouterr().out
    assert "Predict: all 3 already done in outputs/tiny/videos" in printed and "Predict summary" not in printed
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Predict: all 3 already done\n") and summary.count("already done |") == 3
    assert not list(tmp_path.rglob("lightning_logs"))
