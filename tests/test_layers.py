"""The arrows only point down: every project module belongs to a layer, imports only its own or
lower layers, and no two modules import each other, not even through a function-local import
(a local import that dodges a cycle is still a cycle). Read with ``ast``: nothing is imported.

And importing a module changes no global state (STYLE rule 21): checked in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bindweave", "encoders", "conditioners", "callbacks")

LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"bindweave.errors", "bindweave.progress", "bindweave.dtypes", "bindweave.atomic", "bindweave.moved", "bindweave.lightning_compat", "bindweave.model.attention",
              "bindweave.model.fp8_attention",
              "bindweave.model.flow", "bindweave.host_copy", "bindweave.weights.quantize", "bindweave.data.video_decode",
              "bindweave.data.curriculum", "bindweave.data.resume", "bindweave.data.reference_crop", "encoders.base", "encoders.tokenizer",
              "conditioners.references",
              # subpackages whose __init__ only documents them
              "bindweave.weights", "bindweave.data", "bindweave.training", "bindweave.inference", "bindweave.tasks",
              "bindweave.tasks.sprites"}),
    ("network and formats", {"bindweave.model.dit", "bindweave.model.presets", "bindweave.data.video_io", "bindweave.model.batch",
                             "bindweave.data.shards"}),
    ("weights and infra (applied from outside the model)", {
        "bindweave.weights.diffusers_format", "bindweave.weights.wan_official", "bindweave.weights.loading",
        "bindweave.weights.dit_loading", "bindweave.weights.bindweave_release", "bindweave.weights.export", "bindweave.weights.layouts",
        "bindweave.weights.model_card",
        "bindweave.weights.lora_formats",
        "bindweave.parallel", "bindweave.parallel.per_block", "bindweave.parallel.fsdp", "bindweave.parallel.sequence"}),
    ("encoders", {"encoders", "encoders.clip", "encoders.text", "encoders.vae", "encoders.mllm", "encoders.patch_vae", "encoders.reader"}),
    ("conditioners", {"conditioners", "conditioners.base", "conditioners.identity", "conditioners.multi_reference",
                      "conditioners.relational", "conditioners.reader"}),
    ("model", {"bindweave.model", "bindweave.model.bindweave_model"}),
    ("data and sampling", {"bindweave.data.samples", "bindweave.data.streams", "bindweave.data.datamodule",
                           "bindweave.data.feature_cache", "bindweave.data.memory", "bindweave.data.synthetic",
                           "bindweave.inference.requests", "bindweave.inference.mllm_states", "bindweave.inference.sampler", "bindweave.inference.outputs",
                           "bindweave.inference.step_cache", "bindweave.inference.dit_offload", "bindweave.inference.fp8",
                           "bindweave.tasks.sprites.scenes", "bindweave.data.reference_canvas",
                           "bindweave.tasks.sprites.online"}),
    ("training (LightningModule)", {"bindweave.training.module", "bindweave.training.lora"}),
    ("trained models", {"bindweave.inference.pretrained", "bindweave.inference.pipeline"}),
    ("callbacks", {"callbacks", "callbacks.checkpoint", "callbacks.denoise_probe", "callbacks.metrics",
                   "callbacks.predict_progress", "callbacks.resume", "callbacks.sampling", "callbacks.video_writer",
                   "callbacks.schedule", "callbacks.ema", "callbacks.loss_progress", "callbacks.throughput"}),
    ("command line and tasks", {"bindweave.cli", "bindweave.cli.__main__", "bindweave.cli.app", "bindweave.cli.command", "bindweave.cli.data", "bindweave.cli.demo", "bindweave.cli.weights",
                                "bindweave.tasks.sprites.cli", "bindweave.tasks.sprites.generate_cli",
                                "bindweave.tasks.sprites.evaluate"}),
    ("the package's front (``from bindweave import ...``)", {"bindweave"}),
]
"""Lowest first. A new module must be given a layer here (the test names it)."""


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its file (top level or inside functions)."""
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def layer_of() -> dict[str, int]:
    return {module: i for i, (_, members) in enumerate(LAYERS) for module in members}


def test_every_module_has_a_layer():
    unplaced = sorted(set(project_modules()) - set(layer_of()))
    assert not unplaced, f"give these modules a layer in tests/test_layers.py: {unplaced}"


def test_imports_point_down():
    layers = layer_of()
    graph = import_graph(project_modules())
    upward = [f"{m} ({LAYERS[layers[m]][0]}) imports {t} ({LAYERS[layers[t]][0]})"
              for m, targets in graph.items() for t in sorted(targets) if layers.get(t, -1) > layers.get(m, -1)]
    assert not upward, "\n".join(upward)


def modules_on_cycles(graph: dict[str, set[str]]) -> list[str]:
    """The modules from whose imports a path leads back to them."""
    on_cycles = []
    for start in graph:
        seen, frontier = set(), list(graph[start])
        while frontier:
            node = frontier.pop()
            if node == start:
                on_cycles.append(start)
                break
            if node not in seen:
                seen.add(node)
                frontier.extend(graph.get(node, ()))
    return sorted(on_cycles)


def test_no_import_cycles():
    cycles = modules_on_cycles(import_graph(project_modules()))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_a_function_local_import_cycle_is_found(tmp_path):
    """What hid the old cycles (module <-> export, datamodule <-> feature_cache): imports inside functions."""
    (tmp_path / "low.py").write_text("import os\n\ndef f():\n    from high import thing\n    return thing\n")
    (tmp_path / "high.py").write_text("from low import f\nthing = 1\n")
    graph = import_graph({"low": tmp_path / "low.py", "high": tmp_path / "high.py"})
    assert graph == {"low": {"high"}, "high": {"low"}}
    assert modules_on_cycles(graph) == ["high", "low"]


NO_IMPORT_SIDE_EFFECTS = ["bindweave.training.module", "bindweave.inference.pretrained", "bindweave.inference.pipeline",
                          "bindweave.data.datamodule", "bindweave.data.memory", "bindweave.cli.app", "bindweave.cli.command"]
"""Modules whose import must leave the warning filters as they were."""

_IMPORT_TWICE = """
import importlib, sys, warnings
modules = sys.argv[1:]
for module in modules:  # the libraries' own filters, set when they are first imported
    importlib.import_module(module)
for name in [m for m in sys.modules if m.split(".")[0] in {packages!r}]:
    del sys.modules[name]
warnings.resetwarnings()
for module in modules:  # the project's modules again, the libraries already loaded
    importlib.import_module(module)
print(warnings.filters)
"""


def test_importing_the_model_leaves_warning_filters_alone():
    result = subprocess.run([sys.executable, "-c", _IMPORT_TWICE.format(packages=PACKAGES), *NO_IMPORT_SIDE_EFFECTS],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"importing {NO_IMPORT_SIDE_EFFECTS} added warning filters: {result.stdout}"


def test_every_script_and_benchmark_parses():
    """scripts/ and benchmarks/ are run by hand, never imported by the suite: a syntax error there
    (as scripts/demo_screenshot.py once had) would otherwise wait for the next person to run it."""
    broken = []
    for path in sorted([*(ROOT / "scripts").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        try:
            compile(path.read_text(), str(path), "exec")
        except SyntaxError as error:
            broken.append(f"{path.relative_to(ROOT)}:{error.lineno}: {error.msg}")
    assert not broken, broken
