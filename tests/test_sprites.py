"""The procedural sprites task (issue #8): generator, shards, ground-truth metrics and configs."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bindweave.tasks.sprites import evaluate as E
from bindweave.tasks.sprites import scenes as S

CONFIG = S.SpritesConfig()
FLIP = {"right": "left", "left": "right", "up": "down", "down": "up", "jumps": "still", "still": "jumps"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small test split written through the CLI (``bindweave data sprites``)."""
    from bindweave.cli.data import main

    out = tmp_path_factory.mktemp("sprites") / "test"
    main(["sprites", "--out", str(out), "--split", "test", "--num-samples", "6", "--seed", "3",
          "--samples-per-shard", "3", "--relation-probability", "1.0"])
    return out


def test_samples_are_a_pure_function_of_split_seed_and_index():
    a = S.make_sample("train", 7, 5, CONFIG)
    b = S.make_sample("train", 7, 5, CONFIG)
    assert a[0] == b[0] and a[2] == b[2]
    assert np.array_equal(a[3], b[3]) and all(np.array_equal(x, y) for x, y in zip(a[4], b[4]))
    assert {k: v for k, v in a[1].items() if k != "mp4"} == {k: v for k, v in b[1].items() if k != "mp4"}
    others = [S.make_sample("train", 8, 5, CONFIG)[2]["prompt"], S.make_sample("train", 7, 6, CONFIG)[2]["prompt"]]
    assert a[2]["prompt"] not in others


def test_parallel_generation_writes_the_same_samples(tmp_path):
    def contents(folder: Path) -> tuple[list, str]:
        import webdataset as wds

        samples = wds.DataPipeline(wds.SimpleShardList(sorted(map(str, folder.glob("shard-*.tar")))),
                                   wds.tarfile_to_samples())
        return [{k: v for k, v in sample.items() if k != "__url__"} for sample in samples], \
            (folder / "requests.jsonl").read_text()

    serial = S.generate(tmp_path / "serial", "val", 7, seed=2, samples_per_shard=3)
    parallel = S.generate(tmp_path / "parallel", "val", 7, seed=2, samples_per_shard=3, workers=3)
    assert contents(tmp_path / "serial") == contents(tmp_path / "parallel")
    assert len(serial["shards"]) == len(parallel["shards"]) == 3 and serial["motions"] == parallel["motions"]
    with pytest.raises(ValueError, match="workers"):
        S.generate(tmp_path / "none", "val", 1, workers=0)


def test_splits_have_disjoint_appearances():
    by_split: dict[str, set] = {name: set() for name in S.SPLITS}
    for appearance in S.all_appearances():
        by_split[appearance.split()].add(appearance)
    assert sum(map(len, by_split.values())) == len(S.all_appearances()) > 8000
    assert min(len(v) for v in by_split.values()) > 500  # hundreds of unseen appearances to test on
    for split in S.SPLITS:
        for index in range(6):
            record = S.make_sample(split, 0, index, CONFIG)[2]
            assert record["split"] == split
            assert all(S.Appearance(**s["appearance"]).split() == split for s in record["sprites"]["subjects"])


def test_prompt_and_references_determine_every_frame():
    """The video re-renders from the prompt alone plus the appearances (what the references show),
    from the JSON record, and from the lossless mp4."""
    relations = 0
    for index in range(12):
        key, files, record, video, references = S.make_sample("val", 1, index, S.SpritesConfig(relation_probability=0.5))
        appearances = [S.Appearance(**s["appearance"]) for s in record["sprites"]["subjects"]]
        scene = S.scene_from_prompt(record["prompt"], appearances, CONFIG.num_frames, CONFIG.height, CONFIG.width,
                                    CONFIG.sprite_scale)
        assert np.array_equal(S.render(scene), video)
        assert np.array_equal(S.render_record(record), video)
        assert np.array_equal(S.decode_video(files["mp4"]), video)
        assert 1 <= len(references) == record["num_references"] <= 4
        assert (references[0] == 255).all(axis=-1).mean() > 0.1  # the subject alone, on white
        assert record["prompt"].startswith(f"On a {record['sprites']['background']} background")
        relations += any(s["relation"] for s in record["sprites"]["subjects"])
        # The boxes of the record are where the renderer put each subject.
        owner = S.render(scene, with_owner=True)[1]
        for i, track in enumerate(record["sprites"]["boxes"]):
            x0, y0, x1, y1 = track[0]
            ys, xs = np.nonzero(owner[0] == i)
            if len(xs):
                assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    assert relations > 0
    with pytest.raises(ValueError):
        S.scene_from_prompt("a red circle moves left", appearances, 17, 64, 64, 0.3)


def test_shards_are_read_by_the_project_datamodule(shards):
    from bindweave.data.datamodule import WebDataModule

    data = WebDataModule(urls=str(shards / "shard-*.tar"), val_urls=str(shards / "shard-*.tar"), num_frames=17, fps=8,
                         buckets=[(64, 64)], augmentation=None, batch_size=3, num_workers=0)
    data.setup("validate")
    batches = list(data.val_dataloader())
    assert sum(len(b["id"]) for b in batches) == 6
    records = {r["id"]: r for r in map(json.loads, (shards / "requests.jsonl").read_text().splitlines())}
    ground_truth = E.read_ground_truth(str(shards / "shard-*.tar"))
    for batch in batches:
        for i, sample_id in enumerate(batch["id"]):
            truth = ground_truth[sample_id]["record"]
            assert torch.equal(batch["frames"][i], torch.from_numpy(S.render_record(truth)))
            assert batch["prompt"][i] == records[sample_id]["prompt"] == truth["prompt"]
            assert batch["num_references"][i] == len(records[sample_id]["references"])
    assert all((shards / p).exists() for r in records.values() for p in r["references"])


def _scene_variants(record: dict) -> dict[str, np.ndarray]:
    scene = S.scene_from_json(record)
    video = S.render(scene)
    noisy = np.clip(video.astype(np.int64) + np.random.default_rng(0).normal(0, 40, video.shape), 0, 255).astype(np.uint8)
    wrong_motion = copy.deepcopy(scene)
    for s in wrong_motion.subjects:
        s.motion, s.relation = FLIP[s.motion], None
    wrong_subject = copy.deepcopy(scene)
    rng = random.Random(record["id"])
    for s in wrong_subject.subjects:
        s.appearance = S.random_appearance(rng, "train")
    return {"truth": video, "noisy": noisy, "wrong_motion": S.render(wrong_motion), "wrong_subject": S.render(wrong_subject)}


def test_metrics_rank_truth_corruption_wrong_motion_and_wrong_subject(shards):
    truth = E.read_ground_truth(str(shards / "shard-*.tar"))
    scores: dict[str, list[dict]] = {}
    for item in list(truth.values())[:3]:
        for name, video in _scene_variants(item["record"]).items():
            scores.setdefault(name, []).append(E.evaluate_sample(video, item["record"], item["references"]))
    mean = {name: E.summarise(dict(enumerate(runs))) for name, runs in scores.items()}
    t, noisy, motion, subject = mean["truth"], mean["noisy"], mean["wrong_motion"], mean["wrong_subject"]
    assert t["psnr"] == E.PSNR_CAP and t["ssim"] > 0.999 and t["subject_mse"] == 0 and t["background_mse"] == 0
    assert t["motion_accuracy"] == 1.0 and t["relation_accuracy"] == 1.0 and t["position_error"] < 0.02
    assert t["identity"] > 0.9
    assert noisy["psnr"] < 25 and noisy["ssim"] < 0.5 and noisy["subject_mse"] > 0.01
    assert motion["motion_accuracy"] <= 0.5 and motion["position_error"] > 0.1 and motion["subject_mse"] > 0.1
    assert subject["identity"] < 0.5 and subject["subject_mse"] > 0.1
    assert t["relation_accuracy"] > motion["relation_accuracy"]  # the relation samples lose their crossing


def test_eval_cli_writes_a_table_and_json(shards, tmp_path, capsys):
    from bindweave.tasks.sprites.cli import main

    truth = E.read_ground_truth(str(shards / "shard-*.tar"))
    first, second = list(truth)[:2]
    E.save_video(tmp_path / "gt" / f"{first}.mp4", S.render_record(truth[first]["record"]))
    E.save_video(tmp_path / "gt" / f"{second}.mp4", _scene_variants(truth[second]["record"])["wrong_motion"])
    runs = main(["--data", str(shards / "shard-*.tar"), "--run", f"mine={tmp_path / 'gt'}", "--out",
                 str(tmp_path / "r.json"), "--table", str(tmp_path / "r.md"), "--limit", "2", "--reference_points"])
    table = capsys.readouterr().out
    assert "| mine | 2 |" in table and "motion acc" in table and "| ref: background only | 2 |" in table
    by_subjects = main(["--data", str(shards / "shard-*.tar"), "--ground_truth", "--limit", "3", "--by_subjects",
                        "--table", str(tmp_path / "s.md")])
    assert "| ground truth | 0.000 / " in (tmp_path / "s.md").read_text() and by_subjects["ground truth"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["mine"]["samples"][first]["psnr"] == E.PSNR_CAP
    assert saved["mine"]["samples"][second]["motion_accuracy"] < 1.0
    assert runs["mine"]["summary"]["samples"] == 2 and (tmp_path / "r.md").read_text().startswith("| run")
    parallel = main(["--data", str(shards / "shard-*.tar"), "--run", f"mine={tmp_path / 'gt'}", "--workers", "2"])
    assert parallel["mine"]["samples"] == runs["mine"]["samples"] and len(parallel["mine"]["missing"]) == 4
    E.save_video(tmp_path / "bad" / f"{first}.mp4", _scene_variants(truth[first]["record"])["wrong_subject"])
    E.save_video(tmp_path / "bad" / f"{second}.mp4", _scene_variants(truth[second]["record"])["wrong_subject"])
    main(["--data", str(shards / "shard-*.tar"), "--run", f"mine={tmp_path / 'gt'}", "--run", f"bad={tmp_path / 'bad'}",
          "--baseline", "bad", "--limit", "2", "--table", str(tmp_path / "c.md")])
    compared = (tmp_path / "c.md").read_text().split("\n\n")[1]
    assert compared.startswith("| run − bad |") and "| mine | -" in compared  # the truth's subjects are closer
    with pytest.raises(SystemExit):  # a baseline that is not a run
        main(["--data", str(shards / "shard-*.tar"), "--run", f"mine={tmp_path / 'gt'}", "--baseline", "noref"])
    with pytest.raises(SystemExit):
        main(["--data", str(shards / "shard-*.tar"), "--run", f"x={tmp_path / 'missing'}"])
    with pytest.raises(SystemExit):
        main(["--data", str(shards / "shard-*.tar"), "--run", f"empty={tmp_path}"])  # no <id>.mp4 there


def test_reference_points_place_each_kind_of_mistake(shards):
    truth = E.read_ground_truth(str(shards / "shard-*.tar"))
    runs = E.evaluate_reference_points(truth)
    assert list(runs) == [f"ref: {name}" for name in E.REFERENCE_POINTS]
    mean = {name.removeprefix("ref: "): run["summary"] for name, run in runs.items()}
    empty, others, colours = mean["background only"], mean["other subjects, right places"], mean["right colours, other shapes"]
    moved, still = mean["right subjects, another start row"], mean["right subjects, no motion"]
    assert empty["background_mse"] == 0 and empty["identity"] < 0.05 and empty["subject_mse"] > 0.3
    assert colours["subject_mse"] < others["subject_mse"] and colours["identity"] > others["identity"]
    assert moved["identity"] > 0.8 and moved["position_error"] > 0.1 and moved["subject_mse"] > 0.3
    assert still["identity"] > 0.8 and still["motion_accuracy"] < 1.0
    parallel = E.evaluate_reference_points(truth, workers=2)  # the same videos whatever the workers
    exact = ("subject_mse", "background_mse", "identity", "position_error", "motion_accuracy")  # numpy: bit-equal
    for name, run in runs.items():
        for sample_id, scores in run["samples"].items():
            assert {k: scores[k] for k in exact} == {k: parallel[name]["samples"][sample_id][k] for k in exact}


def test_paired_difference_pairs_samples_by_id():
    baseline = {"samples": {"a": {"subject_mse": 1.0}, "b": {"subject_mse": 0.5}, "c": {"subject_mse": 0.9},
                            "d": {"subject_mse": None}}}
    run = {"samples": {"b": {"subject_mse": 0.2}, "a": {"subject_mse": 0.6}, "d": {"subject_mse": 0.1}}}
    d = E.paired_difference(run, baseline, "subject_mse")  # pairs a and b only: -0.4, -0.3
    assert d["samples"] == 2 and d["mean"] == pytest.approx(-0.35) and d["stderr"] == pytest.approx(0.05)
    assert d["relative"] == pytest.approx(-0.35 / 0.75)
    assert E.paired_difference(run, baseline, "identity") is None
    table = E.format_comparison({"noref": baseline, "full": run}, "noref")
    assert "| full | -0.350 ± 0.050 (-47%) | – | – | – |" in table and "| noref |" not in table
    with pytest.raises(ValueError, match="no run of that name"):
        E.format_comparison({"full": run}, "noref")


def test_by_subjects_groups_scenes_by_their_number_of_subjects():
    one, two = {"subject_mse": 0.2, "identity": 0.5, "subjects": [{}]}, {"subject_mse": 0.4, "identity": None, "subjects": [{}, {}]}
    run = {"samples": {"a": one, "b": dict(one, subject_mse=0.4), "c": two}}
    table = E.format_by_subjects({"full": run})
    assert "| 1 subject: subject MSE / identity (samples) | 2 subjects:" in table
    assert "| full | 0.300 / 0.500 (2) | – (1) |" in table


TINY = [  # the sprites config at test size: byte tokenizers, a 1-layer DiT
    "--model.relational.init_args.text_encoder.init_args.tiny_tokenizer", "bytes",
    "--model.relational.init_args.mllm.init_args.tiny_tokenizer", "bytes",
    "--model.dit.init_args.dim", "32", "--model.dit.init_args.ffn_dim", "64", "--model.dit.init_args.num_heads", "2",
    "--model.dit.init_args.num_layers", "1", "--model.dit.init_args.freq_dim", "32",
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.logger", "false",
    "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
    "--data.init_args.pin_memory", "false",
]


def test_sprites_config_fits_on_sprites_shards(shards, tmp_path, monkeypatch):
    from bindweave.cli.app import run_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["bindweave"])
    urls = str(shards / "shard-*.tar")
    cli = run_cli(["fit", "-c", str(ROOT / "configs/sprites.yaml"), *TINY, "--trainer.max_steps", "2",
                   "--trainer.limit_val_batches", "0", "--data.init_args.urls", urls, "--data.init_args.val_urls", urls])
    assert cli.trainer.global_step == 2 and Path("outputs/sprites/checkpoints/last.ckpt").exists()
    assert set(cli.model.conditioners) == {"relational", "identity", "multi_reference"}


@pytest.mark.parametrize("variant", ["noref", "t5-only", "t5-mllm", "no-clip", "no-slots"])
def test_ablation_configs_build(variant, shards, monkeypatch):
    import lightning as L

    from bindweave.cli.app import BindWeaveCLI
    from bindweave.training.module import BindWeave

    monkeypatch.setattr("sys.argv", ["bindweave"])
    tiny = list(TINY)
    if variant in ("noref", "t5-only"):  # no MLLM to shrink
        at = tiny.index("--model.relational.init_args.mllm.init_args.tiny_tokenizer")
        del tiny[at : at + 2]
    cli = BindWeaveCLI(BindWeave, L.LightningDataModule, subclass_mode_data=True, run=False, save_config_callback=None,
                       args=["-c", str(ROOT / "configs/sprites.yaml"), "-c", str(ROOT / f"configs/sprites/{variant}.yaml"),
                             *tiny, "--data.init_args.urls", str(shards / "shard-*.tar")])
    cli.model.configure_model()  # checks every branch and the input channels
    names = set(cli.model.conditioners)
    assert ("identity" in names) == (variant in ("t5-only", "no-slots"))
    assert ("multi_reference" in names) == (variant in ("t5-only", "no-clip"))
    assert (cli.model.conditioners["relational"].mllm is None) == (variant in ("noref", "t5-only"))
    assert cli.trainer.default_root_dir.endswith(f"sprites-{variant}")


def test_in_memory_config_layers_over_a_variant(monkeypatch):
    import lightning as L

    from bindweave.cli.app import BindWeaveCLI
    from bindweave.data.memory import MemoryCacheDataModule
    from bindweave.training.module import BindWeave

    monkeypatch.setattr("sys.argv", ["bindweave"])
    cli = BindWeaveCLI(BindWeave, L.LightningDataModule, subclass_mode_data=True, run=False, save_config_callback=None,
                       args=["-c", str(ROOT / "configs/sprites.yaml"), "-c", str(ROOT / "configs/sprites/noref.yaml"),
                             "-c", str(ROOT / "configs/sprites/in-memory.yaml"), "--data.init_args.urls", "c/shard-*.tar"])
    assert isinstance(cli.datamodule, MemoryCacheDataModule) and cli.datamodule.batch_size == 32
    assert cli.model.feature_cache == "data/sprites/cache/train" and cli.trainer.default_root_dir.endswith("sprites-noref")


def test_denoise_probe_logs_what_the_model_knows_at_pure_noise(shards, tmp_path, monkeypatch):
    """callbacks.DenoiseProbe during a sprites fit: per-σ subject / background MSE and layout AUC of
    x̂₀ on the first validation batch land in the logger's metrics, at each step those of the model then."""
    import csv

    from bindweave.cli.app import run_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["bindweave"])
    urls = str(shards / "shard-*.tar")
    args = list(TINY)
    at = args.index("--trainer.logger")
    del args[at : at + 2]  # log to CSV here
    cli = run_cli(["fit", "-c", str(ROOT / "configs/sprites.yaml"), *args, "--trainer.max_steps", "2",
                   "--trainer.limit_val_batches", "0", "--data.init_args.urls", urls, "--data.init_args.val_urls", urls,
                   "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir",
                   "logs", "--trainer.callbacks+=callbacks.DenoiseProbe", "--trainer.callbacks.every_n_steps", "1",
                   "--trainer.callbacks.sigmas", "[1.0, 0.5]", "--trainer.callbacks.batches", "1"])
    rows = list(csv.DictReader(open(next(Path("logs").rglob("metrics.csv")))))
    probed = [row for row in rows if row.get("probe/layout_auc@1.0")]
    assert [int(row["step"]) for row in probed] == [1, 2]
    # Step 2's row is what the measures give for the trained model on the first validation batch, whose
    # noise is drawn from seed 0 (the measures themselves: test_denoise_measures_*).
    from callbacks.denoise_probe import denoise_measures
    from bindweave.model.batch import to_model_batch

    model = cli.model.eval()
    batch = to_model_batch(next(iter(cli.trainer.datamodule.val_dataloader())))
    expected = denoise_measures(model, model.vae, batch, (1.0, 0.5), 0)
    for sigma in (1.0, 0.5):
        names = ("subject_mse", "background_mse", "layout_auc")
        logged = [float(probed[-1][f"probe/{name}@{sigma}"]) for name in names]
        assert logged == pytest.approx(expected[sigma], rel=1e-5), (sigma, logged, expected[sigma])


def test_denoise_probe_measures():
    from callbacks.denoise_probe import background_colour, layout_auc, masked_mse, subject_pixels

    video = torch.full((2, 3, 5, 16, 16), -0.4)
    video[:, :, :, 4:8, 4:8] = 0.6  # a subject
    background = background_colour(video)
    subjects = subject_pixels(video, background)
    assert subjects.sum() == 2 * 5 * 16 and torch.allclose(background, torch.full((2, 3, 1, 1, 1), -0.4))
    assert layout_auc(video, background, subjects) == 1.0  # the truth marks exactly the subjects
    assert layout_auc(torch.full_like(video, -0.4), background, subjects) == 0.5  # nothing anywhere
    subject_mse, background_mse = masked_mse(torch.full_like(video, -0.4), video, subjects)
    assert subject_mse == pytest.approx(1.0) and background_mse == 0.0
    # Tied scores share their mean rank: subject scores 0.2, 0.5, 0.9 against background 0.0, 0.2, 0.1
    # win 8 of the 9 (subject, background) pairs and tie one: AUC 8.5/9; the complement, 0.5/9.
    scores = torch.tensor([0.0, 0.2, 0.2, 0.5, 0.9, 0.1]).view(1, 1, 1, 1, 6).expand(1, 3, 1, 1, 6)
    truth = torch.tensor([False, True, False, True, True, False]).view(1, 1, 1, 1, 6)
    assert layout_auc(-0.3 + scores, torch.full((1, 3, 1, 1, 1), -0.3), truth) == pytest.approx(8.5 / 9)
    assert layout_auc(-0.3 - scores, torch.full((1, 3, 1, 1, 1), -0.3), ~truth) == pytest.approx(0.5 / 9)


@pytest.mark.parametrize("prediction", ["sample", "velocity"])
def test_denoise_measures_of_an_oracle_and_of_a_blind_denoiser(prediction):
    """denoise_measures through the model: a DiT that knows the clean clip (x̂₀ = x₀, or the exact
    velocity (x_σ − x₀)/σ with σ read from its timestep t = 1000σ) gives back the clip at every σ:
    subject and background MSE 0, layout AUC 1. One that predicts the zero latent (pixels 0 on a
    -0.4 background with 0.6 subjects) knows nothing: AUC 0.5, MSEs 0.6² and 0.4²."""
    from functools import partial

    from bindweave.model.dit import WanDiT
    from callbacks.denoise_probe import denoise_measures
    from encoders import PatchVAE
    from tests.helpers import TINY_DIT, synthetic_batch, tiny_module

    dit = partial(WanDiT, **{**TINY_DIT, "in_channels": 192 + 4 + 192, "out_channels": 192})
    module = tiny_module(dit=dit, vae=partial(PatchVAE, spatial=4, temporal=4), prediction=prediction)
    batch = synthetic_batch(size=2)
    batch["video"] = torch.full_like(batch["video"], -0.4)
    batch["video"][:, :, :, 8:16, 4:20] = 0.6  # a subject in every frame, 128 of 1024 pixels
    x0 = module.vae.encode(batch["video"])  # (B, z, T, h, w)
    z, t = x0.shape[1:3]

    def oracle(x, timestep, *args, **kwargs):  # (B, z + C_slot, T + N, h, w) -> (B, z, T + N, h, w)
        out = torch.zeros(x.shape[0], z, *x.shape[2:])
        sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
        out[:, :, :t] = x0 if prediction == "sample" else (x[:, :z, :t] - x0) / sigma
        return out

    module.dit.forward = oracle
    for sigma, (subject_mse, background_mse, auc) in denoise_measures(module, module.vae, batch, (1.0, 0.5), 0).items():
        assert (subject_mse, background_mse, auc) == pytest.approx((0.0, 0.0, 1.0), abs=1e-9), sigma
    if prediction == "sample":
        module.dit.forward = lambda x, *args, **kwargs: torch.zeros(x.shape[0], z, *x.shape[2:])
        for sigma, measures in denoise_measures(module, module.vae, batch, (1.0, 0.5), 0).items():
            assert measures == pytest.approx((0.36, 0.16, 0.5)), sigma


def test_denoise_probe_measures_are_nan_when_undefined():
    from callbacks.denoise_probe import layout_auc, masked_mse

    video = torch.zeros(1, 3, 2, 4, 4)
    nothing = torch.zeros(1, 1, 2, 4, 4, dtype=torch.bool)
    assert np.isnan(layout_auc(video, torch.zeros(1, 3, 1, 1, 1), nothing))
    subject_mse, background_mse = masked_mse(video + 1, video, nothing)
    assert np.isnan(subject_mse) and background_mse == 1.0


def test_a_sample_is_the_same_scene_it_always_was():
    """Sample i of (split, seed) is forever: the prompt and reference placements of test samples 0 and
    2 (seed 0) as commit de21bbe drew them, before the shards and the online scenes shared ``draw_scene``.
    A change to the random stream (an extra draw, another order) changes every data set."""
    config = S.SpritesConfig()
    _, _, record, _, _ = S.make_sample("test", 0, 0, config)
    assert record["prompt"] == ("On a beige background, the first subject starts at the top left and moves down while "
                                "the second subject starts at the bottom and jumps, and the third subject starts at "
                                "the top right and moves down.")
    assert record["sprites"]["references"] == [{"box": [6, 19, 48, 61], "scale": 0.649807},
                                               {"box": [14, 2, 58, 46], "scale": 0.686726},
                                               {"box": [3, 11, 42, 50], "scale": 0.60411}]
    _, _, record, _, _ = S.make_sample("test", 0, 2, config)
    assert record["sprites"]["references"] == [{"box": [4, 0, 61, 57], "scale": 0.885266},
                                               {"box": [25, 12, 56, 43], "scale": 0.479106}]


def test_an_extra_background_draws_the_same_scenes_on_a_new_colour():
    """``backgrounds=("olive",)``: sample i is the default sample i (subjects, places, motions,
    references) on the olive background, which no default scene has; the prompt says "an olive"
    and parses back to the scene it renders."""
    default = S.SpritesConfig(num_frames=5, height=32, width=32, reference_size=32)
    olive = S.SpritesConfig(num_frames=5, height=32, width=32, reference_size=32, backgrounds=("olive",))
    for index in range(6):
        _, _, plain, video, refs = S.make_sample("test", 0, index, default)
        _, _, new, new_video, new_refs = S.make_sample("test", 0, index, olive)
        assert new["prompt"] == plain["prompt"].replace(f"On a {plain['sprites']['background']} ", "On an olive ")
        assert new["sprites"]["subjects"] == plain["sprites"]["subjects"]
        assert all((a == b).all() for a, b in zip(refs, new_refs))
        owner = S.render(S.scene_from_json(new), with_owner=True)[1]
        assert (new_video[owner < 0] == S.EXTRA_BACKGROUNDS["olive"]).all()
        assert (new_video[owner >= 0] == video[owner >= 0]).all()
        parsed = S.scene_from_prompt(new["prompt"], [s.appearance for s in S.scene_from_json(new).subjects], 5, 32, 32, 0.3)
        assert (S.render(parsed) == new_video).all()
    from bindweave.tasks.sprites.online import OnlineSprites, draw_sample

    online = draw_sample("test", 0, 0, OnlineSprites(num_frames=5, reference_size=32, backgrounds=("olive",)))[0]
    assert online.background == "olive"  # the scenes drawn while training take the option too
    assert "olive" not in S.BACKGROUNDS  # default scenes never draw it
    with pytest.raises(ValueError, match="backgrounds must be names"):
        S.SpritesConfig(backgrounds=("pinkish",)).check()
