"""``bindweave data`` as a user runs it, and ``fit`` of the tiny config on packed shards."""

import pytest
import torch
import yaml

from bindweave.cli.app import run_cli
from bindweave.cli.data import main
from tests.data_helpers import ROOT, TINY, TINY_SHARDS, make_clips, make_video, raw_sample, write_tar


def test_fit_on_packed_shards_through_the_cli_skips_a_broken_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sizes = [(32, 48), (48, 32), (32, 48), (48, 32), (32, 48), (32, 32)]
    manifest = make_clips(tmp_path / "clips", count=6, sizes=sizes)
    main(["pack", "--input", str(manifest), "--output", str(tmp_path / "train"), "--num_frames", "5", "--fps", "8",
          "--samples_per_shard", "2", "--workers", "1", "--no_progress"])
    video = make_video(tmp_path / "v.mp4").read_bytes()
    write_tar(tmp_path / "train" / "shard-000003.tar", [raw_sample("broken", video[:300]), raw_sample("fine", video)])
    cli = run_cli([
        "fit", "-c", TINY, "-c", TINY_SHARDS, "--data.init_args.urls", str(tmp_path / "train" / "shard-{000000..000003}.tar"),
        "--data.init_args.val_urls", str(tmp_path / "train" / "shard-000000.tar"), "--data.init_args.samples_per_epoch", "8",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false",
    ])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 4 and torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    # The worker given shard 3 has 3 valid samples in its 2 shards but must fill 2 batches of 2:
    # its first pass reads "broken".
    assert metrics["data/skipped"] >= 1 and metrics["data/skipped/corrupt_video"] == metrics["data/skipped"]
    assert (tmp_path / "outputs" / "tiny" / "checkpoints" / "last.ckpt").exists()


def test_data_help_and_errors(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("pack", "inspect", "cache"))
    with pytest.raises(SystemExit):
        main(["pack", "--help"])
    assert "--samples_per_shard" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        main(["inspect", "/nowhere/shard-{000000..000001}.tar"])
    assert error.value.code == 1 and "match no file" in capsys.readouterr().err


def test_paper_data_configs_layer_on_the_14b_config(capsys):
    configs = ROOT / "configs"
    with pytest.raises(SystemExit):
        run_cli(["fit", "-c", str(configs / "bindweave-wan2.1-i2v-14b.yaml"), "-c", str(configs / "data" / "webdataset.yaml"),
                 "-c", str(configs / "data" / "curriculum.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    data = printed["data"]["init_args"]
    assert printed["data"]["class_path"] == "bindweave.data.datamodule.WebDataModule" and data["urls"] is None
    assert (data["num_frames"], data["fps"], data["max_references"]) == (81, 16.0, 4)
    assert [(s["name"], s["steps"]) for s in data["curriculum"]] == [("curated", 1000), ("full", 5000)]
    assert printed["trainer"]["max_steps"] == 6000
