"""The ``bindweave`` command (:mod:`bindweave.cli.command`): ``fit``/``predict`` through LightningCLI
(:mod:`bindweave.cli.app`) and the ``data``, ``weights``, ``eval`` and ``demo`` tools.

Names are imported on first use, so that ``bindweave.cli.command`` (and a tool) loads without
Lightning."""

import importlib

__all__ = ["BindWeaveArgumentParser", "BindWeaveCLI", "main", "run_cli", "run_command"]


def __getattr__(name: str):  # ``bindweave.cli`` was one module, now ``command`` (the light part) and ``app``
    for part in ("command", "app"):
        module = importlib.import_module(f"bindweave.cli.{part}")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'bindweave.cli' has no attribute {name!r}")
