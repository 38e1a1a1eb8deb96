"""Export a trained BindWeave as a folder of safetensors + ``config.yaml``, and load it back.

Layout of an export folder::

    config.yaml                          the model's config: ``model:`` = BindWeave's init args, as in a
                                         LightningCLI config; the DiT entry is the plain architecture;
                                         ``training:`` steps, epochs, data of the checkpoint it came from
    README.md                            the model card (:mod:`bindweave.weights.model_card`)
    model.safetensors                    the trainable weights (DiT + connector), BindWeave state-dict keys,
      or model-0000i-of-0000N.safetensors  sharded above ``max_shard_bytes``,
         + model.safetensors.index.json    with the Hugging Face index

Frozen encoders (VAE, T5, CLIP, MLLM) are not copied: ``config.yaml`` names their files, as the
training config did. Weights are only ever written as safetensors; a Lightning ``.ckpt`` is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch
import yaml

from encoders.base import frozen_prefixes, resolve_dtype, trained_prefixes

from bindweave.atomic import AtomicPath, write_atomic
from bindweave.progress import progress
from bindweave.model.dit import WanDiT
from bindweave.weights.loading import Checkpoint, WeightsError, save_sharded
from bindweave.weights.lora_formats import lora_trainable_keys
from bindweave.weights.model_card import model_card, stored_shapes

CONFIG_NAME = "config.yaml"
CARD_NAME = "README.md"
WEIGHTS_NAME = "model"
FORMAT = "bindweave-export/1"
_HEAVY = ("dit", "vae")
# WanDiT arguments; anything else in a DiT entry (pretrained_path, dtype, ...) is about loading.
_DIT_ARCHITECTURE = tuple(inspect.signature(WanDiT).parameters)
"""Every argument of :class:`WanDiT` is architecture (a hand-kept list once lost a new option)."""


def _plain_dit_entry(entry: dict) -> dict:
    """The DiT config entry as a plain ``bindweave.model.dit.WanDiT`` architecture (no pretrained loading:
    the export holds the trained weights)."""
    init_args = entry.get("init_args", {}) if isinstance(entry, dict) else {}
    return {"class_path": "bindweave.model.dit.WanDiT",
            "init_args": {k: v for k, v in init_args.items() if k in _DIT_ARCHITECTURE}}


def export_config(hparams: dict) -> dict:
    """The ``config.yaml`` content for a model whose hyperparameters are ``hparams`` (the dict config
    LightningCLI stores: ``class_path``/``init_args`` entries for the parts)."""
    config = {k: copy.deepcopy(v) for k, v in dict(hparams).items() if not k.startswith("_")}
    missing = [k for k in _HEAVY if not isinstance(config.get(k), dict) or "class_path" not in config[k]]
    if missing:
        raise ValueError(
            f"The model's hyperparameters have no config for {missing}: it was built in Python, not from a "
            f"config. Pass config= (the `model:` section of a BindWeave config) to save_pretrained."
        )
    if config.get("lora"):  # adapters only: the base DiT still comes from where the config says
        config.pop("feature_cache", None)
        return {"format": FORMAT, "model": config}
    config.pop("lora", None)
    config["dit"] = _plain_dit_entry(config["dit"])
    config.pop("init_weights", None)  # the export holds the weights
    config.pop("feature_cache", None)  # an export samples: it builds its encoders
    return {"format": FORMAT, "model": config}


MODEL_PREFIX = "model."
"""Where the LightningModule holds its :class:`~bindweave.model.bindweave_model.BindWeaveModel`: Lightning
checkpoints' keys start with it (``model.dit.x``), exports' do not (``dit.x``). Both directions live here."""


def model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LightningModule state dict with the keys of its model (``model.dit.x`` -> ``dit.x``), the keys
    exports use; checkpoints written before the model object existed already have them."""
    return {k.removeprefix(MODEL_PREFIX): v for k, v in state.items()}


def lightning_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LightningModule state dict in today's layout: checkpoints written before the model object held
    the parts (``dit.*``, ``conditioners.*``) get the ``model.`` prefix; today's are returned as they are."""
    if any(k.startswith(MODEL_PREFIX) for k in state):
        return state
    return {f"{MODEL_PREFIX}{k}": v for k, v in state.items()}


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights an export holds: a :class:`~bindweave.model.bindweave_model.BindWeaveModel`'s state dict but the
    frozen encoders (DiT, connector, ...); of a LoRA fine-tune, its adapters (and ``also_train`` weights)."""
    prefixes = tuple(frozen_prefixes(model))
    lora = lora_trainable_keys(model)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes) and (lora is None or k in lora)}
    return _without_aliases(state)


def _without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the second name of a tied weight (a trained T5's ``shared`` and
    ``encoder.embed_tokens``): safetensors stores one tensor once, and loading the first name fills both."""
    seen, kept = set(), {}
    for key, tensor in state.items():
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype) \
            if tensor.device.type != "meta" and tensor.numel() else None
        if view is not None and view in seen:
            continue
        seen.add(view)
        kept[key] = tensor
    return kept


def save_pretrained(module, directory: str | Path, config: dict | None = None,
                    max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``module`` (a built :class:`~bindweave.training.module.BindWeave`) as an export folder.

    Args:
        module: the model, built (``configure_model`` ran).
        directory: output folder (created).
        config: the model's config (``model:`` section, class_path/init_args entries); default: the
            module's hyperparameters, which hold it when the model came from a config.
        max_shard_bytes: largest safetensors file written.
    """
    if module.dit is None:
        raise ValueError("save_pretrained needs a built model: call module.configure_model() first.")
    content = export_config(config if config is not None else module.hparams)
    return write_export(trainable_state_dict(module.model), content, directory, max_shard_bytes)


def write_export(state: dict[str, torch.Tensor], content: dict, directory: str | Path,
                 max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write an export folder (weights + ``config.yaml``) whole or not at all: into a temporary
    folder beside ``directory``, then swapped in (:class:`~bindweave.atomic.AtomicPath`). An existing
    ``directory`` is replaced only if it is an export (nothing but ``config.yaml``, ``README.md`` and
    ``model*.safetensors*``), so no other file is lost. The model card (``README.md``) is written from
    ``content`` and the weights' shapes."""
    directory = Path(directory)
    if directory.exists():
        foreign = sorted(p.name for p in directory.iterdir() if p.is_dir() or p.name not in (CONFIG_NAME, CARD_NAME)
                         and not (p.name.startswith(WEIGHTS_NAME) and ".safetensors" in p.name))
        if foreign:
            raise WeightsError(f"{directory} exists and holds files that are not an export's ({foreign[:5]}): "
                               f"choose an empty or new folder.")
    with AtomicPath(directory, folder=True) as tmp:
        save_sharded(state, tmp, WEIGHTS_NAME, max_shard_bytes, {"bindweave": FORMAT})
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(content, sort_keys=False))
        (tmp / CARD_NAME).write_text(model_card(directory, content["model"], training=content.get("training"),
                                                **stored_shapes(state)))
    return directory


def write_card(directory: str | Path, scores: str | None = None, name: str | None = None,
               description: str | None = None, training: dict | None = None) -> Path:
    """(Re)write an export folder's model card (``README.md``) from its ``config.yaml`` and weight
    headers, with ``scores`` (Markdown), a title, a description and ``training`` facts (default: the
    ``training:`` section of ``config.yaml``); nothing else in the folder changes."""
    directory = Path(directory)
    content = _read_content(directory)
    checkpoint = Checkpoint.open(directory, prefix=WEIGHTS_NAME)
    entries = [checkpoint.entries[k] for k in checkpoint.keys()]
    card = model_card(directory, content["model"], {k: tuple(checkpoint.shape(k)) for k in checkpoint.keys()},
                      training or content.get("training"), scores, name, description,
                      dtypes={str(e.dtype).removeprefix("torch.") for e in entries},
                      int8=any(e.scale is not None for e in entries))
    return write_atomic(directory / CARD_NAME, card.encode())


def training_record(checkpoint: dict) -> dict:
    """What a Lightning checkpoint says about its training: steps, epochs, the datamodule's class and
    arguments, Lightning's version (plain YAML values)."""
    record: dict = {"steps": checkpoint.get("global_step"), "epochs": checkpoint.get("epoch")}
    data = checkpoint.get("datamodule_hyper_parameters")
    if isinstance(data, dict) and data:
        plain = json.loads(json.dumps({k: v for k, v in data.items() if not k.startswith("_")}, default=str))
        record["data"] = {"class": str(data.get("_class_path", "?")), **plain}
    if checkpoint.get("pytorch-lightning_version"):
        record["lightning"] = str(checkpoint["pytorch-lightning_version"])
    return {k: v for k, v in record.items() if v is not None}


def export_checkpoint(checkpoint_path: str | Path, directory: str | Path,
                      max_shard_bytes: int = 5 * 1024**3, dtype: str | None = None, int8: bool = False) -> Path:
    """Turn a Lightning ``.ckpt`` written by ``bindweave fit`` (or an export folder) into an export folder.

    A sharded checkpoint folder (FSDP2 / ``ModelParallelStrategy``) is consolidated first
    (:func:`read_sharded_checkpoint`), whatever world size wrote it. An export folder is re-exported
    (another dtype, int8 storage; ``directory`` may be the same folder: it is replaced whole).

    The checkpoint is read with ``torch.load(weights_only=True)`` (no pickle code runs); its
    hyperparameters are the config and its ``state_dict`` the trainable weights (frozen encoders are
    never in BindWeave checkpoints). ``dtype`` ("bfloat16", "float16", "float32") casts the
    floating-point weights (default: as trained). ``int8`` stores the large matrices as int8 with
    per-output-channel scales in that dtype (:mod:`bindweave.weights.quantize`: half of bfloat16's bytes;
    loading dequantizes).
    """
    path = Path(checkpoint_path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():  # an export folder
        existing = _read_content(path)
        content = {"format": FORMAT, "model": existing["model"],
                   **({"training": existing["training"]} if existing.get("training") else {})}
        source = Checkpoint.open(path, prefix=WEIGHTS_NAME)
        state = {k: source.read(k) for k in source.keys()}  # all in memory: the folder may be replaced
        return _write_converted(state, content, directory, max_shard_bytes, dtype, int8)
    try:
        if path.is_dir():
            checkpoint = read_sharded_checkpoint(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot be read as a Lightning checkpoint with weights_only=True ({e}).") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise WeightsError(f"{path}: not a Lightning checkpoint of a BindWeave model (no state_dict/hyper_parameters).")
    content = export_config(checkpoint["hyper_parameters"])
    content["training"] = training_record(checkpoint)
    state = model_keys(checkpoint["state_dict"])
    if not any(k.startswith("dit.") for k in state):
        raise WeightsError(f"{path}: the checkpoint holds no DiT weights (dit.*).")
    return _write_converted(state, content, directory, max_shard_bytes, dtype, int8)


def _write_converted(state: dict[str, torch.Tensor], content: dict, directory: str | Path, max_shard_bytes: int,
                     dtype: str | None, int8: bool) -> Path:
    """Cast (``dtype``), quantize (``int8``) and write an export folder."""
    from bindweave.weights.quantize import quantize_state_dict

    cast = resolve_dtype(dtype) if dtype is not None else None
    state = _without_aliases(state)  # before casting: a cast makes two tensors of a tied weight
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in progress(state.items(), len(state), f"export {Path(directory).name}", "tensor"):
        if cast is not None and tensor.is_floating_point():
            tensor = tensor.to(cast)
        converted.update(quantize_state_dict({key: tensor}) if int8 else {key: tensor})
    return write_export(converted, content, directory, max_shard_bytes)


def read_sharded_checkpoint(directory: str | Path) -> dict:
    """Consolidate a sharded (``torch.distributed.checkpoint``) Lightning checkpoint folder into one
    dict with ``state_dict`` (trainable weights only) and ``hyper_parameters``, on the CPU, in one
    process. The frozen encoders' shards, kept in sharded checkpoints, are dropped."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = Path(directory)
    meta_file = directory / "meta.pt"
    if not meta_file.is_file():
        raise WeightsError(f"{directory}: not a sharded Lightning checkpoint (no meta.pt).")
    meta = torch.load(meta_file, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        consolidated = Path(tmp) / "consolidated.pt"
        dcp_to_torch_save(directory, consolidated)
        state = torch.load(consolidated, map_location="cpu", weights_only=True)["state_dict"]
    frozen = tuple(meta.get("frozen_prefixes", ()))
    meta["state_dict"] = model_keys({k: v for k, v in state.items() if not k.startswith(frozen)} if frozen else state)
    return meta


def read_config(directory: str | Path) -> dict:
    """The ``model:`` section of an export folder's ``config.yaml``."""
    return _read_content(directory)["model"]


def _read_content(directory: str | Path) -> dict:
    """An export folder's whole ``config.yaml`` (``format``, ``model``, maybe ``training``)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise WeightsError(f"{directory}: not a BindWeave export (no {CONFIG_NAME}).")
    content = yaml.safe_load(path.read_text())
    if not isinstance(content, dict) or content.get("format") != FORMAT or "model" not in content:
        raise WeightsError(f"{path}: not a BindWeave export config (expected format: {FORMAT} and a model: section).")
    return content


def check_export_matches(checkpoint: Checkpoint, state: dict[str, torch.Tensor], directory: str | Path,
                         prefix: str = "", optional: tuple[str, ...] = ()) -> None:
    """Raise :class:`WeightsError` (one line: the folder, what differs, the fix) unless an export's
    weights are exactly the keys of ``state`` (a model's trainable weights), each with its shape.
    Reads the headers only.

    Args:
        checkpoint: the export's weights (:meth:`Checkpoint.open` of the folder).
        state: the model's trainable weights (:func:`trainable_state_dict`); meta tensors will do.
        directory: the export folder, for the message.
        prefix: compare only the weights whose keys start with it (a part built before the rest,
            e.g. ``dit.``).
        optional: key prefixes whose weights the export may lack (encoders this model trains and the
            export's model kept frozen: they start from their pretrained weights).
    """
    directory = Path(directory)
    fix = f"build the model from the config the export was made with ({directory / CONFIG_NAME}) or export it again"
    stored = {k for k in checkpoint.keys() if k.startswith(prefix)}
    missing = sorted(k for k in set(state) - stored if not k.startswith(optional))
    unexpected = sorted(stored - set(state))
    if missing or unexpected:
        raise WeightsError(f"{directory}: these weights do not belong to this model config (missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}): {fix}.")
    wrong = [f"{checkpoint.file_of(k).name}: {k} has shape {tuple(checkpoint.shape(k))}, expected {tuple(v.shape)}"
             for k, v in state.items() if k in stored and checkpoint.shape(k) != tuple(v.shape)]
    if wrong:
        raise WeightsError(f"{directory}: {len(wrong)} weight(s) with other shapes than this model config's (e.g. "
                           f"{wrong[0]}): {fix}.")


def load_trainable_weights(module, directory: str | Path) -> None:
    """Copy an export's weights into a built model's trainable weights (DiT, connector, ...), strict:
    every trainable weight must be in the export with its shape, and nothing else may be (what
    ``BindWeave(init_weights=...)`` runs in ``configure_model``). An encoder the model trains
    (``train_encoders``) and the export's model kept frozen keeps its pretrained weights."""
    checkpoint = Checkpoint.open(directory, prefix=WEIGHTS_NAME)
    state = trainable_state_dict(module.model)
    check_export_matches(checkpoint, state, directory, optional=tuple(trained_prefixes(module.model)))
    stored = set(checkpoint.keys())
    with torch.no_grad():
        for key, tensor in state.items():
            if key in stored:
                tensor.copy_(checkpoint.read(key, tensor.dtype))
