"""The ``bindweave`` command: ``fit``/``predict`` through LightningCLI (``app``) and the ``data``,
``weights`` and ``eval`` tools."""

from bindweave.cli import app as _app
from bindweave.cli.app import BindWeaveArgumentParser, BindWeaveCLI, main, run_cli, run_command

__all__ = ["BindWeaveArgumentParser", "BindWeaveCLI", "main", "run_cli", "run_command"]


def __getattr__(name: str):  # ``bindweave.cli`` was the module ``bindweave.cli.app`` is now
    try:
        return getattr(_app, name)
    except AttributeError:
        raise AttributeError(f"module 'bindweave.cli' has no attribute {name!r}") from None
