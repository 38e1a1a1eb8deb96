"""LoRA files of every layout people share for Wan2.1, read into one form keyed by our module names.

=================================================================  ===========================================
layout (example key)                                               read by
=================================================================  ===========================================
ours: ``dit.blocks.0.self_attn.to_q.lora_A.weight`` + ``….alpha``   :func:`read_lora` directly
(:func:`bindweave.training.lora.save_lora`, export folders)
diffusers: ``transformer.blocks.0.attn1.to_q.lora_A.weight``       renamed by :mod:`~bindweave.weights.diffusers_format`
kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down``  diffusers' ``WanLoraLoaderMixin.lora_state_dict``
``.weight`` + ``….alpha``                                          (its Wan converters), then as diffusers
ComfyUI / official names: ``diffusion_model.blocks.0.self_attn.q``  likewise
``.lora_A.weight`` (``lora_down``/``lora_up``, ``.alpha``)
=================================================================  ===========================================

A LoRA of module ``m`` (a ``Linear`` of ``in`` → ``out`` features) adds ``scale · alpha / r · B @ A``
to its weight, with ``A`` (r, in) and ``B`` (out, r). diffusers' converters fold ``alpha / r`` into
``A`` and ``B`` (their alpha is then ``r``); ours keep it. Nothing here knows PEFT:
:mod:`bindweave.training.lora` puts the weights into the model.

Also here, because exports and checkpoints need it below the training layer: which of a model's
weights a LoRA fine-tune trains (:func:`lora_trainable_keys`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from bindweave.errors import UserError

TRAINABLE_MARK = "_bindweave_lora_trainable"
"""Attribute that :func:`bindweave.training.lora.apply_lora` sets on the model: the state-dict keys
it trains (adapters and ``also_train`` modules). Checkpoints and exports hold only these."""

_ADAPTER = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.(?:(?P<name>[^.]+)\.)?(?P<param>weight|bias)$")


def lora_trainable_keys(model: nn.Module) -> frozenset[str] | None:
    """The state-dict keys (relative to ``model``, a BindWeaveModel) a LoRA fine-tune trains, or
    None when no LoRA was applied for training (then every non-frozen weight is trained)."""
    return getattr(model, TRAINABLE_MARK, None)


@dataclass
class LoraWeights:
    """One module's LoRA.

    Attributes:
        down: ``A`` (r, in).
        up: ``B`` (out, r).
        alpha: the file's alpha (the delta is ``alpha / r · B @ A``).
        bias: an added output bias (out,) (diffusers' ``lora_B.bias``, kohya's ``diff_b``), or None.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Tensors of a LoRA file (safetensors, or a ``.pt``/``.pth``/``.bin`` read with weights_only),
    or of an export folder (its weights and the ``lora`` block of its config)."""
    from safetensors.torch import load_file

    alphas: dict[str, float] = {}
    if path.is_dir():  # an adapter-only export: adapters in PEFT's own names, alpha in config.yaml
        config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else None
        lora = ((config or {}).get("model") or {}).get("lora")
        files = sorted(path.glob("model*.safetensors"))
        if not lora or not files:
            raise UserError(f"{path}: not a LoRA export (no `lora` block in config.yaml or no model*.safetensors); "
                            f"give a LoRA .safetensors file or the folder `bindweave weights export` wrote for a LoRA run.")
        state = {k: v for f in files for k, v in load_file(f).items()}
        alphas["*"] = float(lora.get("alpha") or lora.get("rank", 16))
        return state, alphas
    if not path.is_file():
        raise UserError(f"{path}: no such LoRA file.")
    try:
        if path.suffix == ".safetensors":
            return load_file(path), alphas
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{path}: cannot be read as a LoRA file ({type(error).__name__}: {error}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a LoRA state dict (a flat dict of tensors expected).")
    return state, alphas


def detect_layout(keys: list[str]) -> str:
    """``bindweave``, ``diffusers``, ``kohya`` or ``comfyui`` for a LoRA file's keys."""
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "comfyui"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    if any(k.startswith(("dit.", "conditioners.")) for k in keys):
        return "bindweave"
    raise UserError(f"LoRA keys in no known layout (e.g. {sorted(keys)[:3]}): expected ours (dit.…), diffusers "
                    f"(transformer.…), kohya/musubi (lora_unet_…) or ComfyUI (diffusion_model.…).")


def _from_diffusers(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """diffusers' ``transformer.*`` LoRA keys renamed to ours (``dit.*``)."""
    from bindweave.weights.diffusers_format import diffusers_to_bindweave

    stripped = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    others = sorted(set(state) - {f"transformer.{k}" for k in stripped})
    if others:
        raise UserError(f"{source}: key {others[0]!r} is not a Wan transformer LoRA key (this loads the DiT's LoRA only).")
    try:
        renamed = diffusers_to_bindweave(stripped)
    except ValueError as error:
        raise UserError(f"{source}: {str(error).splitlines()[0]} A LoRA of another model?") from None
    return {f"dit.{k}": v for k, v in renamed.items()}


def _to_diffusers(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """kohya/musubi and ComfyUI keys to diffusers' through diffusers' own Wan converters (public
    entry point: ``WanLoraLoaderMixin.lora_state_dict``)."""
    from diffusers.loaders import WanLoraLoaderMixin

    state = {k.removeprefix("model."): v for k, v in state.items()}  # model.diffusion_model.* (ComfyUI saves)
    try:
        return WanLoraLoaderMixin.lora_state_dict(dict(state))
    except KeyError as error:  # the musubi converter pops every module of every block
        raise UserError(f"{source}: the LoRA lacks key {error.args[0]!r} that its layout (kohya/musubi Wan) "
                        f"requires in every block; the file is incomplete or of another model.") from None
    except (ValueError, IndexError) as error:
        raise UserError(f"{source}: diffusers' Wan LoRA converter refused it ({str(error)[:200]}).") from None


def read_lora(path: str | Path) -> dict[str, LoraWeights]:
    """A LoRA file (or adapter-only export folder) of any layout above, as ``{module path in a
    BindWeaveModel (``dit.blocks.0.self_attn.to_q``): LoraWeights}``.

    Full weights a file also carries for modules it trained whole (ours: ``also_train``) are
    returned under their own key with ``down``/``up`` None-free: see :func:`read_full_weights`."""
    path = Path(path)
    state, alphas = _load_file(path)
    return parse_lora(state, str(path), default_alpha=alphas.get("*"))


def parse_lora(state: dict[str, torch.Tensor], source: str = "LoRA", default_alpha: float | None = None
               ) -> dict[str, LoraWeights]:
    """:func:`read_lora` on tensors already loaded (``source`` names them in errors)."""
    if not state:
        raise UserError(f"{source}: the LoRA file holds no tensors.")
    layout = detect_layout(list(state))
    if layout in ("kohya", "comfyui"):
        state = _from_diffusers(_to_diffusers(state, source), source)
    elif layout == "diffusers":
        state = _from_diffusers(state, source)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _ADAPTER.match(key)
        if match:
            modules.setdefault(match["module"], {})[f"{match['side']}.{match['param']}"] = tensor
        elif key.endswith(".alpha"):
            modules.setdefault(key.removesuffix(".alpha"), {})["alpha"] = tensor
        elif key.endswith((".diff", ".diff_b")) or "dora_scale" in key:
            raise UserError(f"{source}: key {key!r} is a full weight difference or DoRA scale, which this loader does "
                            f"not apply; only LoRA (lora_A/lora_B, lora_down/lora_up) files are supported.")
    out = {}
    for module, parts in modules.items():
        if "A.weight" not in parts or "B.weight" not in parts:
            if set(parts) <= {"alpha"}:
                continue  # an alpha of a module that is not adapted (never in practice)
            missing = "lora_A" if "A.weight" not in parts else "lora_B"
            raise UserError(f"{source}: {module} has no {missing} weight; the LoRA file is incomplete.")
        down, up = parts["A.weight"], parts["B.weight"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise UserError(f"{source}: {module}.lora_B.weight {tuple(up.shape)} does not match "
                            f"{module}.lora_A.weight {tuple(down.shape)} (rank {down.shape[0]}): a damaged file.")
        alpha = float(parts["alpha"]) if "alpha" in parts else float(default_alpha or down.shape[0])
        out[module] = LoraWeights(down, up, alpha, parts.get("B.bias"))
    if not out:
        raise UserError(f"{source}: no LoRA weights (lora_A/lora_B) found.")
    return out


def read_full_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full (non-LoRA) weights our own LoRA files carry for ``also_train`` modules."""
    path = Path(path)
    state, _ = _load_file(path)
    if detect_layout(list(state)) != "bindweave":
        return {}
    return {k: v for k, v in state.items() if not _ADAPTER.match(k) and not k.endswith(".alpha")}


def check_lora_fits(lora: dict[str, LoraWeights], model: nn.Module, source: str) -> None:
    """Raise a one-line :class:`UserError` naming the key when a LoRA does not fit ``model``: a
    module it does not have (another base: other layer count, branches, names) or other shapes
    (another width, or a damaged rank)."""
    for module_path, weights in lora.items():
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            module = None
        base = getattr(module, "base_layer", module)  # a module that already carries adapters
        if not isinstance(base, nn.Linear):
            blocks = len(getattr(getattr(model, "dit", None), "blocks", ()))
            raise UserError(f"{source}: key {module_path}.lora_A.weight targets {module_path}, which this model does not "
                            f"have as a Linear layer (its DiT has {blocks} blocks and branches "
                            f"{sorted(getattr(model.dit, 'branches', {}))}): a LoRA of another base model.")
        if weights.down.shape[1] != base.in_features or weights.up.shape[0] != base.out_features:
            raise UserError(
                f"{source}: key {module_path}.lora_A.weight has shape {tuple(weights.down.shape)} and lora_B "
                f"{tuple(weights.up.shape)}, but {module_path} maps {base.in_features} -> {base.out_features} features "
                f"(expected (r, {base.in_features}) and ({base.out_features}, r)): a LoRA of another base model.")
        if weights.bias is not None and weights.bias.shape != (base.out_features,):
            raise UserError(f"{source}: key {module_path}.lora_B.bias has shape {tuple(weights.bias.shape)}, "
                            f"expected ({base.out_features},).")
