"""scripts/sprites.sh's orchestration (runs, seeds, folders, GPUs, guidance scales, the results page),
with a stand-in `bindweave` that records each call and writes only the files the script reads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_BINDWEAVE = r'''
import json, os, sys
from pathlib import Path

import yaml

args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"argv": args, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                          "omp": os.environ.get("OMP_NUM_THREADS")}) + "\n")


def opt(name, default=None):  # the last occurrence wins, as in jsonargparse
    value = default
    for i, a in enumerate(args[:-1]):
        if a == name:
            value = args[i + 1]
    return value


if args[:2] == ["data", "sprites"]:
    out = Path(opt("--out"))
    out.mkdir(parents=True)
    (out / "sprites.json").write_text("{}")
    (out / "shard-000000.tar").write_bytes(b"")
    (out / "requests.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n')
elif args[0] in ("fit", "predict"):
    root = None
    for i, a in enumerate(args[:-1]):
        if a == "-c":
            root = ((yaml.safe_load(Path(args[i + 1]).read_text()) or {}).get("trainer") or {}).get("default_root_dir", root)
    root = Path(opt("--trainer.default_root_dir", root))
    if args[0] == "fit":
        import torch

        (root / "checkpoints").mkdir(parents=True)
        torch.save({"global_step": int(opt("--trainer.max_steps"))}, root / "checkpoints" / "last.ckpt")
    else:
        assert Path(opt("--ckpt_path")).is_file(), opt("--ckpt_path")
        (root / "videos").mkdir(parents=True)
elif args[:2] == ["weights", "export"]:
    assert Path(args[2]).is_file() and args[4:] == ["--int8"], args
    Path(args[3]).mkdir(parents=True, exist_ok=True)
elif args[0] == "eval":
    runs = [args[i + 1] for i, a in enumerate(args) if a == "--run"]
    assert all(Path(r.split("=", 1)[1]).is_dir() for r in runs), runs
    names = [r.split("=", 1)[0] for r in runs] + (["reference points"] if "--reference_points" in args else [])
    Path(opt("--table")).write_text("".join(f"| {n} |\n" for n in names) + f"baseline: {opt('--baseline')}\n")
    Path(opt("--out")).write_text("{}")
else:
    sys.exit(f"unexpected call {args}")
'''

FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
if [ "$1" = -L ]; then echo "GPU 0: Fake (UUID: a)"; echo "GPU 1: Fake (UUID: b)"; else echo "Fake GPU"; fi
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.slow  # CI time: `pytest -m slow` runs it (~20 s)
def test_sprites_script_runs_every_variant_and_seed_into_its_own_folder(tmp_path):
    work = tmp_path / "repo"
    for folder in ("scripts", "configs"):
        shutil.copytree(ROOT / folder, work / folder)
    (work / "docs").mkdir()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (tmp_path / "bindweave.py").write_text(FAKE_BINDWEAVE)
    (fake_bin / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (fake_bin / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    env.update(PATH=f"{fake_bin}:{Path(sys.executable).parent}:{env['PATH']}", FAKE_LOG=str(tmp_path / "calls.jsonl"),
               BINDWEAVE=f"{sys.executable} {tmp_path / 'bindweave.py'}", DATA=str(tmp_path / "data"),
               TRAIN="3", VAL="3", TEST="3", STEPS="5", SEEDS="0 1", VARIANTS="full noref t5-only", PARALLEL="1",
               GUIDANCE="1 4", CACHE_DEVICE="cpu", RECIPE="cached")
    done = subprocess.run(["bash", "scripts/sprites.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    fits = [c for c in calls if c["argv"][0] == "fit"]
    roots = {"full": "outputs/sprites", "noref": "outputs/sprites-noref", "t5-only": "outputs/sprites-t5-only"}
    expected = {f"{root}{'-seed1' if seed else ''}" for root in roots.values() for seed in (0, 1)}
    assert {str(p.relative_to(work).parent.parent) for p in work.glob("outputs/*/checkpoints/last.ckpt")} == expected
    assert len(fits) == 6 and sorted(c["gpu"] for c in fits) == ["0", "0", "0", "1", "1", "1"]  # round-robin
    cores = len(os.sched_getaffinity(0))  # what nproc counts
    assert {c["omp"] for c in fits} == {str(max(1, cores // 6))}  # the cores shared among the runs
    seeded = [c["argv"] for c in fits if "--seed_everything" in c["argv"]]
    assert len(seeded) == 3 and all(a[a.index("--seed_everything") + 1] == "1" for a in seeded)
    predicts = [c["argv"] for c in calls if c["argv"][0] == "predict"]
    scales = sorted(a[a.index("--model.sampling.guidance_scale") + 1] for a in predicts)
    assert scales == ["1"] * 6 + ["4"] * 6
    assert not any("--data.init_args.use_request_sizes" in a for a in predicts)  # this recipe's model is 64 x 64
    assert (work / "outputs/sprites-noref-seed1/cfg4/videos").is_dir() and (work / "outputs/sprites/cfg1/videos").is_dir()
    evals = [c["argv"] for c in calls if c["argv"][0] == "eval"]
    assert len(evals) == 5 and sum("--reference_points" in a for a in evals) == 1  # 2 scales x 2 seeds + reference points
    results = (work / "outputs/sprites-results.md").read_text()
    assert not (work / "docs/results.md").exists()  # the hand-kept page is left alone
    for scale in (1, 4):
        for seed in (0, 1):
            assert f"## Classifier-free guidance {scale}, training seed {seed}" in results
    assert "baseline: noref" in results and "| reference points |" in results and "Fake GPU" in results
    assert "| t5-only | 1 | 5 |" in results and "(3 samples, seed 0)" in results


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.slow  # CI time: `pytest -m slow` runs it (~15 s)
def test_sprites_script_reader_recipe_writes_only_the_test_split_and_gives_each_run_the_budget(tmp_path):
    """RECIPE=reader: scenes are drawn while training (no train/val shards), each run's LR schedule
    gets BUDGET through an overlay of the recipe's callbacks, predict samples at the model's size."""
    import yaml

    work = tmp_path / "repo"
    for folder in ("scripts", "configs"):
        shutil.copytree(ROOT / folder, work / folder)
    (work / "docs").mkdir()
    (tmp_path / "bindweave.py").write_text(FAKE_BINDWEAVE)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", FAKE_LOG=str(tmp_path / "calls.jsonl"),
               BINDWEAVE=f"{sys.executable} {tmp_path / 'bindweave.py'}", DATA=str(tmp_path / "data"), TEST="3",
               STEPS="5", BUDGET="00:00:07:30", VARIANTS="full noref", GUIDANCE="1", RECIPE="reader")
    done = subprocess.run(["bash", "scripts/sprites.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [c["argv"][c["argv"].index("--split") + 1] for c in calls if c["argv"][:2] == ["data", "sprites"]] == ["test"]
    fits = [c["argv"] for c in calls if c["argv"][0] == "fit"]
    assert len(fits) == 2 and all(a[a.index("-c") + 1] == "configs/sprites-reader.yaml" for a in fits)
    assert not any("--data.init_args.urls" in a for a in fits)
    exports = [c["argv"] for c in calls if c["argv"][:2] == ["weights", "export"]]
    assert exports == [["weights", "export", "outputs/sprites-reader/checkpoints/last.ckpt", "outputs/sprites-model", "--int8"]]
    assert {str(p.relative_to(work).parent.parent) for p in work.glob("outputs/*/checkpoints/last.ckpt")} == {
        "outputs/sprites-reader", "outputs/sprites-reader-noref"}
    overlay = yaml.safe_load((work / "outputs/sprites-reader-noref/schedule.yaml").read_text())["trainer"]["callbacks"]
    recipe = yaml.safe_load((work / "configs/sprites-reader.yaml").read_text())["trainer"]["callbacks"]
    assert [c["class_path"] for c in overlay] == [c["class_path"] for c in recipe]  # the whole list, one value changed
    assert next(c for c in overlay if c["class_path"] == "callbacks.LRSchedule")["init_args"]["budget"] == "00:00:07:30"
    predicts = [c["argv"] for c in calls if c["argv"][0] == "predict"]
    requests = {a[a.index("--data.init_args.requests") + 1] for a in predicts}
    assert requests == {str(tmp_path / "data/test/requests.jsonl")}  # at the model's size, not the requests' own:
    assert all(a[a.index("--data.init_args.use_request_sizes") + 1] == "false" for a in predicts)
    results = (work / "outputs/sprites-results.md").read_text()
    assert not (work / "docs/results.md").exists()  # the hand-kept page is left alone
    assert "Recipe: `configs/sprites-reader.yaml`" in results and "budget 00:00:07:30" in results
