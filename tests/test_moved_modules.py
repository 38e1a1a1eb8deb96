"""Names in YAML, checkpoints and user code are forever (STYLE rule 13): every public name that
``bindweave/*.py`` held before the package tree (``fixtures/public-names-before-package-tree.json``,
read with ``ast`` at commit 1662b7b) still imports under its old dotted path, as the same object
it is under its new one; a config written with the old class paths still parses and builds."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bindweave.moved import MOVED_MODULES

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads((ROOT / "tests/fixtures/public-names-before-package-tree.json").read_text())["names"]


def resolve(dotted: str):
    """What jsonargparse does with a class_path: import the module part, get the attribute."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_old_public_name_still_resolves():
    missing = []
    for dotted in BEFORE:
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as error:
            missing.append(f"{dotted}: {error}")
    assert not missing, "\n".join(missing)
    assert len(BEFORE) > 300


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_name_is_the_new_module(old):
    targets = MOVED_MODULES[old]
    module = importlib.import_module(old)
    if isinstance(targets, str):
        assert module is importlib.import_module(targets)
    else:  # split: each attribute is the one of the module that holds it now
        for target in targets:
            new = importlib.import_module(target)
            for name in [n for n in vars(new) if not n.startswith("_") and getattr(vars(new)[n], "__module__", None) == target]:
                assert getattr(module, name) is getattr(new, name)


def test_an_old_name_is_no_copy():
    """Class identity survives the alias: isinstance and pickles see one class."""
    import bindweave.datamodule
    import bindweave.module
    from bindweave.data.datamodule import WebDataModule
    from bindweave.training.module import BindWeave

    assert bindweave.module.BindWeave is BindWeave and bindweave.datamodule.WebDataModule is WebDataModule
    assert BindWeave.__module__ == "bindweave.training.module"


def test_an_unknown_old_name_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bindweave.no_such_module")
    import bindweave.loading

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        bindweave.loading.no_such_name  # noqa: B018


def test_the_finder_is_installed_by_importing_the_package_alone():
    code = "import bindweave.attention, bindweave.model.attention as m, sys; print(sys.modules['bindweave.attention'] is m)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_a_config_with_the_old_class_paths_parses_and_builds(tmp_path):
    """configs/tiny.yaml as it was written before the move (old ``class_path``s) builds the same model."""
    old = subprocess.run(["git", "show", "1662b7b:configs/tiny.yaml"], cwd=ROOT, capture_output=True, text=True)
    text = old.stdout if old.returncode == 0 else None
    if text is None:  # a shallow clone without that commit: rewrite today's file back to the old paths
        text = (ROOT / "configs/tiny.yaml").read_text()
        for before, after in MOVED_MODULES.items():
            if isinstance(after, str):
                text = text.replace(after + ".", before + ".")
    assert "bindweave.synthetic.SyntheticDataModule" in text
    (tmp_path / "old.yaml").write_text(text)
    from bindweave.cli import run_cli

    cli = run_cli(["fit", "-c", str(tmp_path / "old.yaml"), "--trainer.max_steps", "1", "--trainer.logger", "false",
                   "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    from bindweave.data.synthetic import SyntheticDataModule

    assert isinstance(cli.datamodule, SyntheticDataModule) and cli.trainer.global_step == 1
