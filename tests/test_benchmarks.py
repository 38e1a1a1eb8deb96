"""The end-to-end sampling benchmark runs (tiny parts, CPU) and accounts for all its time."""

import importlib.util
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # end-to-end runs of benchmarks/*.py: `pytest -m slow`


def test_sampling_benchmark_smoke():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"
    spec = importlib.util.spec_from_file_location("sampling_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(smoke=True, runs=["resident", "low_memory"])
    run = result["runs"]["resident"]
    assert result["runs"]["low_memory"]["max_abs_diff_vs_first_run"] == 0  # offloads and tiles (frames under a tile) change no pixel
    seconds = run["seconds"]
    assert result["video_shape"] == [1, 5, 32, 32, 3]
    assert min(seconds["encoders"], seconds["dit"], seconds["vae_decode"]) > 0
    assert seconds["other"] >= -1e-3
    assert sum(run["share"].values()) == pytest.approx(1.0, abs=1e-3)


def test_train_step_benchmark_smoke():
    """The training-step benchmark runs end to end on the CPU: real sprites data and cache, both
    variants, eager + profiled + Lightning steps."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(smoke=True)
    full, noref = result["variants"]["full"], result["variants"]["noref"]
    assert full["tokens"] > noref["tokens"] and set(full["context"]) == {"text", "image"} and set(noref["context"]) == {"text"}
    for variant in (full, noref):
        assert variant["eager"]["ms_per_step"] > 0 and variant["lightning"]["steps_per_s"] > 0
        assert variant["profile"]["top"] and variant["train_flops_per_step"] > 0


def run_speed_smoke(tmp_path, monkeypatch, part: str) -> dict:
    """``benchmarks/speed.py --smoke --only <part>`` in this process; its results JSON."""
    import json
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location("speed_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["speed.py", "--smoke", "--only", part, "--out", str(out)])
    bench.main()
    return json.loads(out.read_text())


def test_speed_benchmark_whole_dit_smoke(tmp_path, monkeypatch):
    """The whole-DiT part of benchmarks/speed.py on the CPU: weights drawn block by block, resident
    and offloaded calls give the same output (the offload only moves weights)."""
    rows = run_speed_smoke(tmp_path, monkeypatch, "whole_dit")["whole_dit"]
    assert rows["batch"] == 2 and rows["blocks"] == 2
    assert rows["resident eager"]["ms"] > 0 and rows["offloaded eager"]["rel_err_vs_resident"] == 0.0


def test_speed_benchmark_whole_dit_compiled_smoke(tmp_path, monkeypatch):
    """The compiled whole-DiT part of benchmarks/speed.py on the CPU: the per-block compiled DiT (traced
    with aot_eager) gives the eager output, and the FP8 options say why they fall back here."""
    rows = run_speed_smoke(tmp_path, monkeypatch, "whole_dit_compiled")["whole_dit_compiled"]
    assert rows["batch"] == 2 and rows["blocks"] == 2
    assert rows["compiled bf16"]["ms"] > 0 and rows["compiled bf16"]["rel_err_vs_eager_bf16"] == 0.0
    assert "CUDA" in rows["fp8_unsupported"] and "CUDA" in rows["fp8_attention_unsupported"]
    assert rows["compiled fp8 linears + fp8 attention"]["rel_err_vs_eager_bf16"] == 0.0  # the fallback is exact bf16
