"""A trained BindWeave, loaded: from an export folder (:func:`load_pretrained`) or a Lightning
checkpoint (:func:`load_checkpoint`), built as its stored config says.

Above both the LightningModule (whose constructor is the config's schema) and the export format
(:mod:`bindweave.weights.export`), so neither has to import the other.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import yaml
from lightning.pytorch.cli import instantiate_module

from bindweave.weights.export import CONFIG_NAME, WEIGHTS_NAME, check_export_matches, read_config, trainable_state_dict
from bindweave.dtypes import resolve_dtype
from bindweave.lightning_compat import build_as_lightning_cli
from bindweave.weights.loading import Checkpoint, load_into
from bindweave.training.module import BindWeave
from encoders.base import frozen_prefixes


def load_pretrained(directory: str | Path, dtype: str | None = None, model_overrides: dict | None = None):
    """Rebuild a :class:`~bindweave.training.module.BindWeave` from an export folder, weights loaded and checked.

    The DiT is built on the meta device and read straight into place from the safetensors; the
    frozen encoders load from the files ``config.yaml`` names; every trainable weight must be in the
    export and every exported weight must belong to the model (strict).

    Args:
        directory: the export folder.
        dtype: dtype of the DiT weights (``float32``, ``bfloat16``, ``float16``); default: as stored.
        model_overrides: entries replacing those of ``config.yaml``'s ``model:`` section (e.g. other
            encoder paths on this machine, or ``sampling``); ``parallelism`` (compile, FSDP, ...)
            only from here: the one the export was trained with is not applied.

    Returns:
        The built model, in eval mode.
    """
    directory = Path(directory)
    config = read_config(directory)
    # How it was trained to run (compile, FSDP, checkpointing) is not part of the model: a loaded
    # model runs eager on one device unless the caller asks (a CPU would otherwise compile every block).
    config.pop("parallelism", None)
    config.update(copy.deepcopy(model_overrides or {}))
    checkpoint = Checkpoint.open(directory, prefix=WEIGHTS_NAME)
    with build_as_lightning_cli(config):
        module = instantiate_module(BindWeave, config)
    build_dit = module.dit_factory
    dit_sources = {k.removeprefix("dit."): k for k in checkpoint.keys() if k.startswith("dit.")}

    stored = {checkpoint.dtype(k) for k in dit_sources.values() if checkpoint.dtype(k).is_floating_point}
    dit_dtype = resolve_dtype(dtype) if dtype else (stored.pop() if len(stored) == 1 else None)

    def load_dit():
        with torch.device("meta"):
            dit = build_dit()
        check_export_matches(checkpoint, {f"dit.{k}": v for k, v in dit.state_dict().items()}, directory, "dit.")
        load_into(dit, checkpoint, dit_sources, dtype=dit_dtype,
                  ignored=[k for k in checkpoint.keys() if not k.startswith("dit.")],
                  hint=f"The DiT entry of {directory / CONFIG_NAME} does not describe these weights.")
        return dit

    if module.lora is None:
        module.dit_factory = load_dit
    module.configure_model()  # a LoRA export holds adapters only: the base DiT loads as its config says
    module.dit_factory = build_dit
    # Every trainable weight in the export with its shape and nothing else (the DiT's were checked
    # before it loaded); then the rest (connector, ...) are copied in.
    state = trainable_state_dict(module.model)
    check_export_matches(checkpoint, state, directory)
    with torch.no_grad():
        for key in [k for k in state if module.lora is not None or not k.startswith("dit.")]:
            state[key].copy_(checkpoint.read(key, state[key].dtype))
    return module.eval()


def load_checkpoint(path: str | Path, config: str | Path | dict | None = None):
    """A built :class:`~bindweave.training.module.BindWeave` with a Lightning checkpoint's weights, from the
    checkpoint's stored config or ``config`` (a YAML file with a ``model:`` section, or that section)."""
    path = Path(path)
    if config is None:
        try:
            with warnings.catch_warnings():  # frozen encoders are never in checkpoints, by design
                warnings.filterwarnings("ignore", message="Found keys that are in the model state dict")
                # A model trained from a feature cache samples with its encoders.
                return BindWeave.load_from_checkpoint(path, map_location="cpu", feature_cache=None)
        except TypeError as error:
            raise ValueError(
                f"{path} holds no model config ({error}): it was saved from a model built in Python. Pass "
                f"config= (the YAML it was trained with, e.g. configs/tiny.yaml)."
            ) from None
    source = config if isinstance(config, dict) else yaml.safe_load(Path(config).read_text())
    model_config = source.get("model", source) if isinstance(source, dict) else None
    if not isinstance(model_config, dict):
        raise ValueError(f"Config {config!r} has no `model:` section.")
    module = instantiate_module(BindWeave, {**model_config, "feature_cache": None})
    module.configure_model()
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    hint = (f"Checkpoint {str(path)!r} does not match the config {str(config) if not isinstance(config, dict) else 'given'}: "
            f"{{}}. Use the config it was trained with, or leave config out to use the one stored in the checkpoint.")
    try:
        upgraded = {"state_dict": state}
        module.on_load_checkpoint(upgraded)  # checks, and upgrades an older key layout
        state = upgraded["state_dict"]
        frozen = tuple(frozen_prefixes(module))
        result = module.load_state_dict(state, strict=False)
    except (ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()
        raise ValueError(hint.format(" ".join(line.strip() for line in first[:3]))) from None
    unexpected = [k for k in result.unexpected_keys if not k.startswith(frozen)]
    if unexpected:
        raise ValueError(hint.format(f"the model has no weights {unexpected[:5]}"))
    return module
