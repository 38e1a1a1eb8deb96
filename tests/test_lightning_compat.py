"""The private APIs the project relies on, checked against the installed libraries: an upgrade that
removes or renames one fails here, naming the adapter to fix, instead of breaking a run silently."""

from __future__ import annotations

import contextvars

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.core.mixins import hparams_mixin
from lightning.pytorch.plugins.precision import HalfPrecision

import encoders
from bindweave.cli.app import BindWeaveCLI
from bindweave.lightning_compat import CLI_CHECKPOINT_CONFIG_HOOK, build_as_lightning_cli, built_by_lightning_cli
from tests.tiny_parts import tiny

FIX = "Lightning changed a private API that bindweave/lightning_compat.py wraps: update that file"


def test_lightning_still_has_what_the_adapter_wraps():
    assert isinstance(getattr(hparams_mixin, "_given_hyperparameters", None), contextvars.ContextVar), FIX
    assert callable(getattr(hparams_mixin, "_given_hyperparameters_context", None)), FIX
    assert callable(getattr(LightningCLI, CLI_CHECKPOINT_CONFIG_HOOK, None)), FIX
    assert CLI_CHECKPOINT_CONFIG_HOOK in vars(BindWeaveCLI), "BindWeaveCLI no longer overrides the checkpoint-config hook"


def test_building_as_the_cli_is_seen_and_ends():
    assert not built_by_lightning_cli()
    with build_as_lightning_cli({"a": 1}):
        assert built_by_lightning_cli()
    assert not built_by_lightning_cli()


def test_a_frozen_encoder_keeps_its_dtype_whatever_casts_the_model():
    """``FrozenEncoder`` overrides ``nn.Module._apply`` (torch has no public hook for casts): every
    cast path of torch and Lightning's ``bf16-true`` precision must go through it."""
    encoder = tiny(encoders.T5TextEncoder)
    assert encoder.dtype == torch.float32
    wrapper = torch.nn.Sequential(encoder, torch.nn.Linear(2, 2))
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.double(),
                 lambda m: m.type(torch.float16), lambda m: HalfPrecision("bf16-true").convert_module(m)):
        cast(wrapper)
        assert {p.dtype for p in encoder.parameters()} == {torch.float32}
        wrapper[1].float()
