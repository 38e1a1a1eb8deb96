"""Module paths that YAML files, saved checkpoints and user code name from before the package tree.

``bindweave/`` was flat until December 2026 (``bindweave.module``, ``bindweave.dit``, ...). Names
in YAML and checkpoints are forever: a config's ``class_path: bindweave.datamodule.WebDataModule``
or a checkpoint whose pickled state names ``bindweave.synthetic`` must load as it did. Rather than
thirty one-line shim files in the package, one import finder maps each old module name to the module
that now holds its code: ``import bindweave.module`` returns ``bindweave.training.module`` itself
(the same module object, so classes compare equal and pickles resolve). It answers only for the
names below and is added to ``sys.meta_path`` once, when ``bindweave`` is first imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

MOVED_MODULES: dict[str, str | tuple[str, ...]] = {
    "bindweave.attention": "bindweave.model.attention",
    "bindweave.dit": ("bindweave.model.dit", "bindweave.model.presets"),
    "bindweave.flow": "bindweave.model.flow",
    "bindweave.batch": "bindweave.model.batch",
    "bindweave.quantize": "bindweave.weights.quantize",
    "bindweave.convert": "bindweave.weights.diffusers_format",
    "bindweave.wan_official": "bindweave.weights.wan_official",
    "bindweave.bindweave_official": "bindweave.weights.bindweave_release",
    "bindweave.loading": ("bindweave.weights.loading", "bindweave.weights.dit_loading"),
    "bindweave.export": "bindweave.weights.export",
    "bindweave.sharding": "bindweave.parallel.fsdp",
    "bindweave.sequence_parallel": "bindweave.parallel.sequence",
    "bindweave.curriculum": "bindweave.data.curriculum",
    "bindweave.resume": "bindweave.data.resume",
    "bindweave.video_decode": "bindweave.data.video_decode",
    "bindweave.video_io": "bindweave.data.video_io",
    "bindweave.shards": "bindweave.data.shards",
    "bindweave.feature_cache": "bindweave.data.feature_cache",
    "bindweave.memory_data": "bindweave.data.memory",
    "bindweave.synthetic": "bindweave.data.synthetic",
    "bindweave.datamodule": ("bindweave.data.datamodule", "bindweave.data.samples", "bindweave.data.streams"),
    "bindweave.module": "bindweave.training.module",
    "bindweave.sampling": "bindweave.inference.sampler",
    "bindweave.outputs": "bindweave.inference.outputs",
    "bindweave.requests": "bindweave.inference.requests",
    "bindweave.pipeline": "bindweave.inference.pipeline",
    "bindweave.pretrained": "bindweave.inference.pretrained",
    "bindweave.data_cli": "bindweave.cli.data",
    "bindweave.weights_cli": "bindweave.cli.weights",
    "bindweave.eval_cli": "bindweave.tasks.sprites.cli",
    "bindweave.evaluate": "bindweave.tasks.sprites.evaluate",
    "bindweave.sprites": ("bindweave.tasks.sprites.scenes", "bindweave.tasks.sprites.generate_cli"),
}
"""Old module name -> the module that holds its code now (or the modules it was split into: the old
name is then a module that looks each attribute up in them, in order). ``bindweave.model``, ``bindweave.cli`` and
``bindweave.parallel`` became packages of the same name; each re-exports what the old module held."""


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the module it moved to (the same object, under both names)."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        target = MOVED_MODULES[spec.name]
        if isinstance(target, str):
            return importlib.import_module(target)
        parts = [importlib.import_module(name) for name in target]
        module = ModuleType(spec.name, f"Moved: see {', '.join(target)}.")

        def lookup(attribute: str):
            for part in parts:
                if hasattr(part, attribute):
                    return getattr(part, attribute)
            raise AttributeError(f"module {spec.name!r} (now {', '.join(target)}) has no attribute {attribute!r}")

        module.__getattr__ = lookup
        return module

    def exec_module(self, module: ModuleType) -> None:  # already executed under its new name
        pass


def install() -> None:
    """Add the finder to ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
