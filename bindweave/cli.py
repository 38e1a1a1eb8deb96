"""``bindweave fit|validate|test|predict``: LightningCLI over :class:`bindweave.module.BindWeave`.

Any LightningDataModule can be named with ``data.class_path``; conditioners, encoders, the DiT and
callbacks are chosen the same way (``class_path`` + ``init_args``), which is the plug-in registry.

Tools that are not training loops have their own subcommand modules (``TOOLS``), each with a
``main(argv: list[str]) -> None``: ``bindweave data pack ...``, ``bindweave weights check ...``.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import signal
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

import callbacks  # noqa: F401  (registers short names for trainer.callbacks)
import conditioners  # noqa: F401  (registers short names for model.conditioners)
import encoders  # noqa: F401
from bindweave.module import BindWeave
from bindweave.synthetic import SyntheticDataModule  # noqa: F401


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

    def _parse_ckpt_path(self) -> None:
        before = self.config
        super()._parse_ckpt_path()
        if self.config is not before:  # the checkpoint's config was applied: the command line wins
            args = self._command_line if self._command_line is not None else sys.argv[1:]
            if isinstance(args, dict):
                self.config = self.parser.parse_object(args, self.config)
            else:
                self.config = self.parser.parse_args(list(args), namespace=self.config)


def run_cli(args: list[str] | None = None) -> BindWeaveCLI:
    """Parse ``args`` (default: sys.argv) and run the subcommand; returns the CLI (for tests)."""
    return BindWeaveCLI(
        BindWeave,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


TOOLS = {
    "data": "bindweave.data_cli",
    "eval": "bindweave.eval_cli",
    "weights": "bindweave.weights_cli",
}
"""Subcommands outside LightningCLI: name -> module with ``main(argv)``."""


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
    if len(sys.argv) > 1 and sys.argv[1] in TOOLS:
        importlib.import_module(TOOLS[sys.argv[1]]).main(sys.argv[2:])
        return
    run_cli()


if __name__ == "__main__":
    main()
