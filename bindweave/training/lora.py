"""LoRA through PEFT, applied to a built :class:`~bindweave.model.bindweave_model.BindWeaveModel` from outside.

Training (``model.lora`` in YAML, :class:`LoraConfig`): ``BindWeave.configure_model`` calls
:func:`apply_lora` after the weights are loaded and before activation checkpointing, compile and
FSDP, so those wrap the adapted blocks. Adapters go into the ``Linear`` layers that ``target_modules``
names inside each of ``parts``; everything else is frozen, except ``also_train`` modules. Module
classes stay (PEFT replaces only the adapted ``Linear`` layers), so AC, compile and FSDP by block
work as before; the adapted layers' base weights move to ``<layer>.base_layer.weight``.

Inference (:func:`load_lora`, also ``BindWeavePipeline.load_lora``): LoRA files of any layout
(:mod:`bindweave.weights.lora_formats`) as named adapters, several active at once, each with its
scale (:func:`set_lora_scale`), removed again by :func:`unload_lora`. :func:`merge_lora` folds every
adapter into its base weight and restores plain ``Linear`` layers (what ``--merge_lora`` exports).
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bindweave.errors import UserError
from bindweave.weights.lora_formats import (TRAINABLE_MARK, LoraWeights, check_lora_fits, read_full_weights, read_lora)
from encoders.base import FrozenEncoder

TRAINING_ADAPTER = "default"
"""Adapter name of the LoRA a fine-tune trains (PEFT's default; in checkpoint keys ``lora_A.default``)."""

DIT_TARGETS = [
    "dit.blocks.*.self_attn.to_[qkv]", "dit.blocks.*.self_attn.to_out",  # self-attention q, k, v, o
    "dit.blocks.*.cross_attn.to_q", "dit.blocks.*.cross_attn.to_out",  # cross-attention q, o
    "dit.blocks.*.cross_attn.branches.*.to_[kv]",  # cross-attention k, v of every branch (text, image, ...)
    "dit.blocks.*.ffn.[02]",  # feed-forward
]
"""The DiT layers adapted by default: attention q/k/v/o (self and cross, every branch) and the FFN,
the layers diffusers', musubi-tuner's and DiffSynth's Wan LoRAs adapt."""


@dataclass
class LoraConfig:
    """LoRA fine-tuning (``model.lora``): adapters on the chosen layers, the rest frozen.

    Args:
        rank: rank r of every adapter.
        alpha: LoRA alpha; the adapter's output is scaled by alpha / r (None: alpha = r, scale 1).
        target_modules: glob patterns over module names in the model (``dit.blocks.*.ffn.0``,
            ``conditioners.relational.connector.*``) choosing the ``Linear`` layers adapted; default
            the DiT's attention q/k/v/o (self and cross) and FFN layers. A part of ``parts`` that no
            pattern reaches gets adapters on all its ``Linear`` layers.
        dropout: dropout on the adapter's input.
        parts: the model's submodules that get adapters, their own weights frozen: ``dit``, the
            connector (``conditioners.relational.connector``), a trainable encoder's path.
        also_train: submodules trained whole beside the adapters (e.g. the connector); every
            other weight is frozen. Checkpoints and exports hold the adapters and these.
    """

    rank: int = 16
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: list(DIT_TARGETS))
    dropout: float = 0.0
    parts: list[str] = field(default_factory=lambda: ["dit"])
    also_train: list[str] = field(default_factory=list)


# -- which layers ----------------------------------------------------------------------------


def _submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise UserError(f"model.lora.{what}: the model has no submodule {path!r} (top level: {names}); use a path "
                        f"such as 'dit' or 'conditioners.relational.connector'.") from None
    if isinstance(module, FrozenEncoder):
        raise UserError(f"model.lora.{what}: {path!r} is a frozen encoder ({type(module).__name__}); LoRA adapts the "
                        f"DiT, the connector or a trainable encoder.")
    return module


def lora_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[str]]:
    """{part path: names (relative to the part) of the ``Linear`` layers that get adapters}."""
    targets = {}
    for path in config.parts:
        part = _submodule(model, path, "parts")
        reaching = [p for p in config.target_modules if _reaches(p, path)]
        names = [name for name, module in part.named_modules() if isinstance(module, nn.Linear)
                 and not any(isinstance(m, FrozenEncoder) for m in _ancestors(part, name))
                 and (not reaching or any(fnmatch.fnmatchcase(f"{path}.{name}", p) for p in reaching))]
        if not names:
            raise UserError(f"model.lora.target_modules {config.target_modules} match no Linear layer of {path!r}; "
                            f"give patterns over its module names (e.g. '{path}.*').")
        targets[path] = names
    return targets


def _reaches(pattern: str, path: str) -> bool:
    """Whether ``pattern`` can match inside part ``path`` (its literal start does not lead elsewhere)."""
    start = re.split(r"[*?\[]", pattern)[0]
    return start.startswith(path + ".") or (path + ".").startswith(start)


def _ancestors(root: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")
    return [root.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def _peft_config(ranks: dict[str, int], alphas: dict[str, float], dropout: float = 0.0, bias: bool = False):
    """A PEFT ``LoraConfig`` adapting exactly the named modules (names escaped: PEFT reads patterns as regexes)."""
    from peft import LoraConfig as PeftLoraConfig

    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    return PeftLoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(ranks), lora_bias=bias,
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha},
    )


def _inject(part: nn.Module, config, adapter: str) -> None:
    """PEFT's ``inject_adapter_in_model``, leaving every existing weight's ``requires_grad`` as it was."""
    from peft import inject_adapter_in_model

    flags = {name: p.requires_grad for name, p in part.named_parameters()}
    with warnings.catch_warnings():  # several adapters in one model are what load_lora is for
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, part, adapter_name=adapter)
    for name, parameter in part.named_parameters():
        base = name.replace(".base_layer.", ".")
        if name in flags or base in flags:
            parameter.requires_grad_(flags.get(name, flags.get(base)))


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


# -- training --------------------------------------------------------------------------------


def apply_lora(model: nn.Module, config: LoraConfig) -> dict[str, list[str]]:
    """Add a fresh adapter (``B = 0``: the model's outputs do not change) to the targeted layers of
    ``model`` (a built BindWeaveModel) and make only the adapters and ``also_train`` trainable.
    Returns the adapted layers per part."""
    if config.rank < 1:
        raise UserError(f"model.lora.rank must be >= 1, got {config.rank}.")
    targets = lora_targets(model, config)
    alpha = float(config.alpha if config.alpha is not None else config.rank)
    for path, names in targets.items():
        part = model.get_submodule(path)
        _inject(part, _peft_config({n: config.rank for n in names}, {n: alpha for n in names}, config.dropout),
                TRAINING_ADAPTER)
    extra = [_submodule(model, path, "also_train") for path in config.also_train]
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            parameter.requires_grad_(True)
    for module in extra:
        module.requires_grad_(True)
    trainable = frozenset(name for name, p in model.named_parameters() if p.requires_grad)
    setattr(model, TRAINABLE_MARK, trainable)
    return targets


# -- loading LoRA files ------------------------------------------------------------------------


def _adapter_name(path: str | Path, name: str | None) -> str:
    name = name or Path(path).stem
    return re.sub(r"[^0-9A-Za-z_]", "_", name) or "lora"


def loaded_loras(model: nn.Module) -> list[str]:
    """Names of the adapters loaded into ``model`` (the training adapter included)."""
    names: list[str] = []
    for _, layer in _lora_layers(model):
        names += [n for n in layer.lora_A if n not in names]
    return names


def load_lora(model: nn.Module, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
    """Load a LoRA file (ours, diffusers, kohya/musubi, ComfyUI; :mod:`bindweave.weights.lora_formats`)
    into ``model`` (a built BindWeaveModel) as adapter ``name`` (default: the file's stem), active
    beside the adapters already loaded, at ``scale``. Returns the adapter's name.

    A LoRA of another base (layers this model lacks, other widths) stops with a one-line
    :class:`UserError` naming the key, before anything changes."""
    source = str(path)
    lora = read_lora(path)
    check_lora_fits(lora, model, source)
    adapter = _adapter_name(path, name)
    if adapter in loaded_loras(model):
        raise UserError(f"{source}: a LoRA named {adapter!r} is loaded already; pass another name= or unload_lora({adapter!r}).")
    full = read_full_weights(path)
    own = model.state_dict()
    for key, tensor in full.items():
        if key not in own or own[key].shape != tensor.shape:
            raise UserError(f"{source}: key {key!r} ({tuple(tensor.shape)}) is not a weight of this model with that shape.")
    device = next(model.parameters()).device
    by_part: dict[str, dict[str, LoraWeights]] = {}
    for module_path, weights in lora.items():
        part, _, rest = module_path.partition(".")
        by_part.setdefault(part, {})[rest] = weights
    for part_name, modules in by_part.items():
        part = model.get_submodule(part_name)
        bias = any(w.bias is not None for w in modules.values())
        _inject(part, _peft_config({n: w.rank for n, w in modules.items()}, {n: w.alpha for n, w in modules.items()},
                                   bias=bias), adapter)
        with torch.no_grad():
            for module_path, weights in modules.items():
                layer = part.get_submodule(module_path)
                dtype = layer.lora_A[adapter].weight.dtype
                layer.lora_A[adapter].weight.copy_(weights.down.to(device, dtype))
                layer.lora_B[adapter].weight.copy_(weights.up.to(device, dtype))
                if bias:
                    layer.lora_B[adapter].bias.copy_(weights.bias.to(device, dtype) if weights.bias is not None else 0)
    with torch.no_grad():
        for key, tensor in full.items():
            own[key].copy_(tensor)
    _activate_all(model)
    for _, layer in _lora_layers(model):
        if adapter in layer.lora_A:
            layer.lora_A[adapter].requires_grad_(False)
            layer.lora_B[adapter].requires_grad_(False)
    if scale != 1.0:
        set_lora_scale(model, adapter, scale)
    return adapter


def _activate_all(model: nn.Module) -> None:
    """Every loaded adapter active in every layer that has it (PEFT adds new ones inactive), each
    adapter's ``requires_grad`` unchanged."""
    names = loaded_loras(model)
    for _, layer in _lora_layers(model):
        flags = {n: p.requires_grad for n, p in layer.named_parameters()}
        layer.set_adapter([n for n in names if n in layer.lora_A])
        for n, p in layer.named_parameters():
            p.requires_grad_(flags[n])


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Scale adapter ``name``'s contribution (1.0: as trained; 0.0: off)."""
    layers = [layer for _, layer in _lora_layers(model) if name in layer.lora_A]
    if not layers:
        raise UserError(f"No LoRA named {name!r} is loaded (loaded: {loaded_loras(model)}).")
    for layer in layers:
        layer.set_scale(name, scale)


def unload_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove adapter ``name`` (None: every adapter loaded with :func:`load_lora`; a fine-tune's
    own adapter stays). Layers left without adapters become plain ``Linear`` layers again. Full
    weights a file replaced (``also_train``) are not restored."""
    loaded = loaded_loras(model)
    names = [name] if name is not None else [n for n in loaded if n != TRAINING_ADAPTER]
    for n in names:
        if n not in loaded:
            raise UserError(f"No LoRA named {n!r} is loaded (loaded: {loaded}).")
    for module_name, layer in _lora_layers(model):
        for n in names:
            if n in layer.lora_A:
                layer.delete_adapter(n)
        if not layer.lora_A:
            _replace(model, module_name, layer.get_base_layer())
    _activate_all(model)


def merge_lora(model: nn.Module) -> None:
    """Fold every active adapter (at its scale) into its base weight and restore plain ``Linear``
    layers: the model computes the same with no adapters left (``bindweave weights export --merge_lora``)."""
    for module_name, layer in _lora_layers(model):
        with torch.no_grad():
            layer.merge()
        _replace(model, module_name, layer.get_base_layer())
    if hasattr(model, TRAINABLE_MARK):
        delattr(model, TRAINABLE_MARK)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def save_lora(model: nn.Module, path: str | Path, name: str = TRAINING_ADAPTER) -> Path:
    """Write adapter ``name`` in our layout (``dit.blocks.0.self_attn.to_q.lora_A.weight``,
    ``….lora_B.weight``, ``….alpha``) and, for the training adapter, the ``also_train`` weights, as
    one safetensors file that :func:`load_lora` reads."""
    from safetensors.torch import save_file

    from bindweave.atomic import AtomicPath

    state: dict[str, torch.Tensor] = {}
    for module_name, layer in _lora_layers(model):
        if name not in layer.lora_A:
            continue
        state[f"{module_name}.lora_A.weight"] = layer.lora_A[name].weight.detach().cpu().contiguous()
        state[f"{module_name}.lora_B.weight"] = layer.lora_B[name].weight.detach().cpu().contiguous()
        state[f"{module_name}.alpha"] = torch.tensor(float(layer.lora_alpha[name]))
        if layer.lora_B[name].bias is not None:
            state[f"{module_name}.lora_B.bias"] = layer.lora_B[name].bias.detach().cpu().contiguous()
    if not state:
        raise UserError(f"No LoRA named {name!r} to save (loaded: {loaded_loras(model)}).")
    trained = getattr(model, TRAINABLE_MARK, frozenset()) if name == TRAINING_ADAPTER else frozenset()
    own = model.state_dict()
    for key in sorted(trained):
        if ".lora_A." not in key and ".lora_B." not in key:
            state[key] = own[key].detach().cpu().contiguous()
    with AtomicPath(Path(path)) as tmp:
        save_file(state, str(tmp), metadata={"format": "bindweave-lora/1"})
    return Path(path)
