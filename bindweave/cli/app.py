"""``bindweave fit|validate|test|predict``: LightningCLI over :class:`bindweave.training.module.BindWeave`.

Any LightningDataModule can be named with ``data.class_path``; conditioners, encoders, the DiT and
callbacks are chosen the same way (``class_path`` + ``init_args``), which is the plug-in registry.

The console command itself (:mod:`bindweave.cli.command`) imports this module only for these
subcommands; the tools that are not training loops (``bindweave data ...``, ``weights``, ``eval``,
``demo``) start without it.
"""

from __future__ import annotations

import difflib
import importlib
import re
import sys
from typing import NoReturn

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import callbacks  # noqa: F401  (registers short names for trainer.callbacks)
import conditioners  # noqa: F401  (registers short names for model.conditioners)
import encoders  # noqa: F401
from bindweave.errors import EXIT_USAGE, one_line, report
from bindweave.weights.loading import check_lightning_checkpoint
from bindweave.training.module import BindWeave
from bindweave.data.synthetic import SyntheticDataModule  # noqa: F401


# ----------------------------------------------------------------------------------------------
# Config errors: the one line that matters, not an 80-line usage dump
# ----------------------------------------------------------------------------------------------

_UNKNOWN_OPTION = re.compile(r"does not accept option '([^']+)'|unrecognized arguments: (--?[^\s=]+)")
_BAD_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)")
_MISSING_CONFIG = re.compile(r"Parser key \"config\":\s*File does not exist: '([^']+)'")
_BAD_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)', re.S)


def _known_keys(parser) -> list[str]:
    """Every option key a (sub)command parser accepts, e.g. ``trainer.max_steps``."""
    return sorted(set(re.findall(r"--([\w.]+)", parser.format_help())))


def _close_class(class_path: str) -> str | None:
    """The class of the same module whose name is closest to a misspelt ``class_path``."""
    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    names = [n for n, v in vars(module).items() if isinstance(v, type)]
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"{module_name}.{match[0]}" if match else None


def condense_parser_error(message: str, parser) -> str:
    """jsonargparse's multi-line message as one line, with a "did you mean" where a close name exists."""
    unknown = _UNKNOWN_OPTION.search(message)
    if unknown:
        key = (unknown.group(1) or unknown.group(2)).lstrip("-")
        close = difflib.get_close_matches(key, _known_keys(parser), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown option {key!r}{hint}"
    missing = _MISSING_CONFIG.search(message)
    if missing:
        return f"-c {missing.group(1)}: no such config file; check the path (configs live in configs/)"
    bad_class = _BAD_CLASS_PATH.search(message)
    if bad_class:
        key = _BAD_KEY.match(message)
        where = f"{key.group(1)}: " if key else ""
        close = _close_class(bad_class.group(1))
        hint = f"; did you mean {close!r}?" if close else ""
        return f"{where}class_path {bad_class.group(1)!r} cannot be used ({bad_class.group(2).strip()}){hint}"
    return one_line(message)


class BindWeaveArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors are one line (the key, the problem, a close valid name),
    exit status 2; ``--help`` still prints every option."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        words = parser.prog.replace(" [options]", "").split()
        command = words[-1] if len(words) > 1 else ""  # "bindweave fit" -> "fit"
        line = condense_parser_error(message, parser)
        raise report(command, f"{line} (`bindweave {command + ' ' if command else ''}--help` lists every option)", EXIT_USAGE) from None


class BindWeaveCLI(LightningCLI):
    """LightningCLI with BindWeave's model and any datamodule given by class_path.

    With ``--ckpt_path``, Lightning replaces the model config by the one stored in the checkpoint,
    so ``predict --ckpt_path X --model.sampling.num_steps 30`` (or ``configs/predict.yaml``'s
    sampler) would be silently ignored. Here the checkpoint's config only fills in the model: the
    config files and flags of this command line are applied again on top of it.
    """

    def parse_arguments(self, parser, args) -> None:
        self._command_line = args
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            check_lightning_checkpoint(ckpt_path)  # one clear line before Lightning reads it

    def _parse_ckpt_path(self) -> None:
        before = self.config
        super()._parse_ckpt_path()
        if self.config is not before:  # the checkpoint's config was applied: the command line wins
            stored = _take_dataclasses(self.config)
            args = self._command_line if self._command_line is not None else sys.argv[1:]
            if isinstance(args, dict):
                self.config = self.parser.parse_object(args, self.config)
            else:
                self.config = self.parser.parse_args(list(args), namespace=self.config)
            for key, value in stored.items():  # the checkpoint's, where the command line does not set it
                if self.config.get(key) is None:
                    self.config[key] = value


OPTIONAL_DATACLASSES = ("model.sampling.reference_canvas",)
"""Options typed ``SomeDataclass | None``. Once set from a checkpoint, a config file that sets one
again fails to validate (jsonargparse mixes the file's fields into the stored value:
``predict -c configs/layout/release.yaml --ckpt_path ...``); set on None, it parses."""


def _take_dataclasses(config: Namespace) -> dict[str, object]:
    """Set the :data:`OPTIONAL_DATACLASSES` of the subcommand's config to None; return their values."""
    taken = {}
    for option in OPTIONAL_DATACLASSES:
        key = f"{config.subcommand}.{option}"
        if config.get(key) is not None:
            taken[key] = config[key]
            config[key] = None
    return taken


def run_cli(args: list[str] | None = None) -> BindWeaveCLI:
    """Parse ``args`` (default: sys.argv) and run the subcommand; returns the CLI (for tests)."""
    return BindWeaveCLI(
        BindWeave,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_class=BindWeaveArgumentParser,
        args=args,
    )


def run_lightning(argv: list[str] | None, command: str) -> None:
    """``bindweave fit|validate|test|predict ...``: :func:`run_cli`, with Lightning's refusal of a
    combination of trainer settings reported as one line (exit status 2)."""
    try:
        run_cli(argv)
    except MisconfigurationException as error:
        raise report(command, f"{one_line(error)} (Lightning's check of the trainer settings: change one of "
                              "them in the config or on the command line)", EXIT_USAGE) from None


def main() -> None:
    """The console script's entry point as installs made before :mod:`bindweave.cli.command` wrote it
    (``bindweave.cli.app:main``): the same command. Imported by name: that module imports this one."""
    importlib.import_module("bindweave.cli.command").main()
