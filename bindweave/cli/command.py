"""The ``bindweave`` console command: each tool (``data``, ``demo``, ``eval``, ``weights``) or a
LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``: :mod:`bindweave.cli.app`),
with a user's mistake reported as one line and an exit status (:mod:`bindweave.errors`).

This module imports neither Lightning nor the model stack, so a tool starts with only what it uses
(measured on 2 CPU cores: ``bindweave eval --help`` 3.8 s, ``weights --help`` 2.8 s, ``data --help``
2.6 s, ``demo --help`` 2.9 s, each ~9-10 s when the command imported Lightning first: Lightning imports torchmetrics, which
imports transformers and torchvision's models).
"""

from __future__ import annotations

import contextlib
import difflib
import faulthandler
import importlib
import importlib.util
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path

from bindweave.errors import EXIT_USAGE, UserError, report

OWN_PACKAGES = ("encoders", "conditioners", "callbacks")
"""Top-level packages BindWeave installs beside ``bindweave`` (YAML names them: ``encoders.WanVAE``,
``callbacks.VideoWriter``). PyPI has unrelated ``encoders`` and ``callbacks`` packages; installed in
the same environment, one of them could shadow ours."""


def check_own_packages() -> None:
    """Raise :class:`UserError` if the ``encoders``/``conditioners``/``callbacks`` that is imported (or
    that an import would find) is not the one installed beside ``bindweave`` (another distribution of
    that name shadows it)."""
    home = Path(sys.modules["bindweave"].__file__).resolve().parent.parent
    for name in OWN_PACKAGES:
        module = sys.modules.get(name)
        if module is not None:  # imported: where it came from
            origin = getattr(module, "__file__", None)
        else:  # where an import would find it, without running it (a tool imports none of the three)
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
        where = Path(origin or "").resolve()
        if where.parent.parent != home:
            raise UserError(
                f"the `{name}` package at {where} is not BindWeave's (expected {home / name}): another "
                f"package of that name shadows it; `pip uninstall {name}` or use a separate virtual environment."
            )


TOOLS = {
    "data": "bindweave.cli.data",
    "demo": "bindweave.cli.demo",
    "eval": "bindweave.tasks.sprites.cli",
    "weights": "bindweave.cli.weights",
}
"""Subcommands outside LightningCLI: name -> module with ``main(argv)``."""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
"""Subcommands of LightningCLI (:mod:`bindweave.cli.app`)."""

OVERVIEW = """usage: bindweave <command> [options]      (`bindweave <command> --help`: every option of one)

Subject-consistent video generation (BindWeave) on PyTorch Lightning.

Training and sampling, configured by YAML (-c configs/...; LightningCLI):
  fit        train or fine-tune a model (`bindweave fit -c configs/tiny.yaml`)
  validate   one pass over the validation set
  test       one pass over the test set
  predict    videos from a requests file (`-c <model config> -c configs/predict.yaml`)

Tools:
  data       build, inspect and feature-cache training shards; generate sprites scenes
  weights    check, convert, export model weights and write model cards
  eval       score generated videos against the sprites ground truth
  demo       try a model in the browser (Gradio)
"""
"""What ``bindweave`` and ``bindweave --help`` print: every command, Lightning's and the tools'."""


KNOWN_WARNINGS: dict[str, str] = {
    re.escape("Your `IterableDataset` has `__len__` defined"):
        "the project's streams split an epoch's batch positions between their workers: the length is exact",
    r"Found \d+ module\(s\) in eval mode": "frozen encoders are kept in eval mode on purpose",
    re.escape("`isinstance(treespec, LeafSpec)` is deprecated"): "raised inside Lightning under newer torch",
    re.escape("Mismatch dtype between input and weight"):
        "bf16 autocast hands the DiT's RMSNorms bf16 activations while their weights stay fp32; torch then "
        "takes its unfused kernel (the norm it computes is the one asked for)",
}
"""Library warnings that say nothing a user can act on in this project (message regex -> why).
The console script hides them for its own process; importing the package changes no filter."""


def main() -> None:
    """Entry point of the ``bindweave`` console script.

    For a job that seems stuck: ``kill -USR1 <pid>`` prints every thread's Python stack to stderr
    and lets the run go on; the environment variable ``BINDWEAVE_DUMP_STACKS_EVERY=<seconds>`` prints
    them periodically."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    every = os.environ.get("BINDWEAVE_DUMP_STACKS_EVERY")
    if every:
        faulthandler.dump_traceback_later(float(every), repeat=True)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertisement())
    hide_known_warnings()
    if names_deepspeed(sys.argv[1:]):
        import_deepspeed_logging_to_stderr()
    run_command()


def hide_known_warnings() -> None:
    """Filter out :data:`KNOWN_WARNINGS` for this process."""
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def names_deepspeed(words: list[str]) -> bool:
    """Whether the command line or a config file it names (``-c``/``--config``) mentions DeepSpeed."""
    texts = list(words)
    for flag, value in zip(words, words[1:]):
        if flag in ("-c", "--config") and Path(value).is_file():
            texts.append(Path(value).read_text(errors="replace"))
    return any("deepspeed" in text.lower() for text in texts)


def import_deepspeed_logging_to_stderr() -> None:
    """Import DeepSpeed (where installed) with stdout pointed at stderr.

    Its logger writes to the stdout of the moment it is imported, and it logs its accelerator on
    import, so ``bindweave fit -c ...deepspeed... --print_config > run.yaml`` wrote that line into
    the YAML. Imported here first, its log lines go to stderr for the whole run."""
    if importlib.util.find_spec("deepspeed") is None:
        return
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401


def run_command(argv: list[str] | None = None) -> None:
    """``bindweave <argv>`` (default: the command line): a tool of :data:`TOOLS` (imported alone) or a
    LightningCLI subcommand (:func:`bindweave.cli.app.run_lightning`); ``--help`` alone prints
    :data:`OVERVIEW`, no command or an unknown one is one line naming them all (exit status 2). A
    :class:`~bindweave.errors.UserError` ends it with one line on stderr and exit status 1."""
    words = sys.argv[1:] if argv is None else argv
    command = words[0] if words else ""
    if command in ("-h", "--help"):
        print(OVERVIEW, end="")
        return
    if not command or (not command.startswith("-") and command not in TOOLS and command not in LIGHTNING_COMMANDS):
        known = [*LIGHTNING_COMMANDS, *TOOLS]
        if not command:
            what = "no command"
        else:
            close = difflib.get_close_matches(command, known, n=1)
            what = f"unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        raise report("", f"{what}: name one of {', '.join(known)} (`bindweave --help` says what each does)", EXIT_USAGE)
    try:
        check_own_packages()
        if command in TOOLS:
            importlib.import_module(TOOLS[command]).main(words[1:])
            return
        from bindweave.cli.app import run_lightning  # Lightning and the model stack: only for its subcommands

        run_lightning(argv, command)
    except UserError as error:  # a mistake the user can fix: one line, no traceback
        raise report(command, error) from None
    except ValueError as error:  # jsonargparse wraps what a constructor raised while instantiating
        cause = _user_error_cause(error)
        if cause is None:
            raise
        raise report(command, cause) from None


def _user_error_cause(error: BaseException) -> UserError | None:
    """The :class:`UserError` that ``error`` was raised from (its ``__cause__``/``__context__`` chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            return error
        error = error.__cause__ or error.__context__
    return None


class _DropAdvertisement(logging.Filter):
    """Lightning's "Tip: try installing litlogger" line, printed by every ``Trainer()``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()
