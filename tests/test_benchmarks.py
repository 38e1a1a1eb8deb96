"""The end-to-end sampling benchmark runs (tiny parts, CPU) and accounts for all its time."""

import importlib.util
from pathlib import Path

import pytest


def test_sampling_benchmark_smoke():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"
    spec = importlib.util.spec_from_file_location("sampling_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(smoke=True)
    run = result["runs"]["resident"]
    seconds = run["seconds"]
    assert result["video_shape"] == [1, 5, 32, 32, 3]
    assert min(seconds["encoders"], seconds["dit"], seconds["vae_decode"]) > 0
    assert seconds["other"] >= -1e-3
    assert sum(run["share"].values()) == pytest.approx(1.0, abs=1e-3)
