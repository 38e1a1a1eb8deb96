"""What this project needs from Lightning that has no public API, in one place.

1. Whether LightningCLI is building the LightningModule: then ``save_hyperparameters`` stores the
   CLI's config (``class_path``/``init_args`` dicts, loadable with ``weights_only=True``) instead of
   the built objects, so a checkpoint can rebuild its model. Lightning keeps that config in the
   context variable ``hparams_mixin._given_hyperparameters``.
2. Building a module from such a config outside LightningCLI (an export's ``config.yaml``) so that it
   behaves as if LightningCLI built it: ``hparams_mixin._given_hyperparameters_context``.
3. ``LightningCLI._parse_ckpt_path``: where LightningCLI replaces the config by a checkpoint's;
   ``bindweave.cli.app.BindWeaveCLI`` overrides it to apply the command line again on top.

``tests/test_lightning_compat.py`` checks all three against the installed Lightning and fails with
a message naming this file when an upgrade removes or renames one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from lightning.pytorch.core.mixins import hparams_mixin

CLI_CHECKPOINT_CONFIG_HOOK = "_parse_ckpt_path"
"""The ``LightningCLI`` method that replaces the parsed config by the one stored in ``--ckpt_path``."""


def built_by_lightning_cli() -> bool:
    """True inside a LightningModule's ``__init__`` when LightningCLI (or :func:`build_as_lightning_cli`) builds it."""
    return hparams_mixin._given_hyperparameters.get() is not None


@contextmanager
def build_as_lightning_cli(config: dict) -> Iterator[None]:
    """Build a LightningModule from ``config`` (its ``init_args`` as LightningCLI parses them) so that
    its hyperparameters are that config, as under LightningCLI."""
    with hparams_mixin._given_hyperparameters_context(hparams=config,
                                                      instantiator="lightning.pytorch.cli.instantiate_module"):
        yield
