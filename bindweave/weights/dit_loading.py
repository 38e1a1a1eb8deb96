"""The DiT's weights from every released layout into :class:`~bindweave.model.dit.WanDiT`.

Reads this project's keys, diffusers' ``WanTransformer3DModel`` keys, the official Wan2.1 keys and
the released BindWeave checkpoint through :mod:`bindweave.weights.loading` (strict, onto a model
built on the meta device); :class:`PretrainedWanDiT` makes it a YAML-usable DiT factory whose
state-dict keys are :class:`~bindweave.model.dit.WanDiT`'s. Branches the checkpoint lacks are
initialised by :meth:`WanDiT.initialize_new_branch` (zero value projections).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Literal

import torch

from bindweave.dtypes import resolve_dtype
from bindweave.model.dit import CrossAttentionBranch, WanDiT
from bindweave.weights.loading import Checkpoint, LoadReport, WeightsError, assert_materialized, format_shape, load_into

# ----------------------------------------------------------------------------------------------
# The DiT: every released layout into WanDiT
# ----------------------------------------------------------------------------------------------

DiTFormat = Literal["auto", "bindweave", "diffusers", "wan", "bindweave_release"]
DIT_FORMATS = ("bindweave", "diffusers", "wan", "bindweave_release")
"""Layouts :func:`load_dit` reads: this project's :class:`WanDiT` keys; diffusers'
``WanTransformer3DModel`` (``transformer/``); the official Wan2.1 ``WanModel`` (also with ComfyUI's
``model.diffusion_model.`` prefix); ByteDance's released BindWeave DiT (diffusers keys plus the
``condition_embedder.text_projector`` connector, which belongs to the relational conditioner and is
not part of the DiT)."""

# Checkpoint keys that are known and carry nothing the DiT uses.
_UNUSED_DIT_KEYS = (
    re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.weight$"),  # diffusers I2V: defined, never used in forward
    re.compile(r"^condition_embedder\.text_projector\."),  # BindWeave release: the connector (see bindweave_official)
)


def detect_dit_format(keys: Iterable[str]) -> str:
    """Which of :data:`DIT_FORMATS` a DiT checkpoint's keys are in (by their module names)."""
    keys = set(keys)
    if any(k.startswith("condition_embedder.text_projector.") for k in keys):
        return "bindweave_release"
    if any(k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    stripped = {k.removeprefix("model.diffusion_model.") for k in keys}
    if "blocks.0.self_attn.q.weight" in stripped or "text_embedding.0.weight" in stripped:
        return "wan"
    if "blocks.0.self_attn.to_q.weight" in keys or any(k.startswith("context_embedders.") for k in keys):
        return "bindweave"
    raise WeightsError(
        f"Cannot tell which DiT layout these keys are (e.g. {sorted(keys)[:4]}); expected one of {DIT_FORMATS}. "
        f"Set checkpoint_format explicitly if it is one of them."
    )


def _diffusers_key(key: str, text_branch: str, image_branch: str) -> str | None:
    from bindweave.weights.diffusers_format import diffusers_to_bindweave

    try:
        return next(iter(diffusers_to_bindweave({key: None}, text_branch, image_branch)))
    except ValueError:
        return None


def dit_key_map(
    keys: Iterable[str], checkpoint_format: str, text_branch: str = "text", image_branch: str = "image"
) -> tuple[dict[str, str], list[str]]:
    """({our WanDiT key: checkpoint key}, [known checkpoint keys the DiT does not use]).

    Keys with no counterpart are left out, so the strict load reports them as unexpected.
    """
    from bindweave.weights.wan_official import UNSUPPORTED_DIT_KEYS, wan_to_bindweave_key

    sources, ignored = {}, []
    for key in keys:
        for marker, why in UNSUPPORTED_DIT_KEYS.items():
            if key.removeprefix("model.diffusion_model.").startswith(marker):
                raise WeightsError(f"Checkpoint key {key!r}: {why}; BindWeave builds on Wan2.1 T2V/I2V.")
        if any(p.match(key) for p in _UNUSED_DIT_KEYS):
            ignored.append(key)
            continue
        if checkpoint_format == "bindweave":
            target = key
        elif checkpoint_format == "wan":
            target = wan_to_bindweave_key(key, text_branch, image_branch)
        elif checkpoint_format in ("diffusers", "bindweave_release"):
            target = _diffusers_key(key, text_branch, image_branch)
        else:
            raise ValueError(
                f"Unknown DiT checkpoint_format {checkpoint_format!r}; use one of {DIT_FORMATS} or 'auto'.")
        if target is not None:
            sources[target] = key
    return sources, ignored


def load_dit(
    dit: WanDiT,
    path: str | Path | Checkpoint,
    checkpoint_format: DiTFormat = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_new_conditions: bool = False,
    text_branch: str = "text",
    image_branch: str = "image",
) -> LoadReport:
    """Load DiT weights of any :data:`DIT_FORMATS` layout into ``dit`` (typically built on meta).

    With ``allow_new_conditions``, a checkpoint with fewer input channels (T2V: 16) and/or without
    some branches (T2V: no ``image``) loads into a wider DiT: the new patch-embedding channels and
    the new branches' value projections are zero, so the loaded model's output is exactly the
    checkpoint's until training moves them. Without it, such a checkpoint is an error.

    Raises:
        WeightsError: missing/unexpected keys or wrong shapes (file, key, expected shape), missing
            shards, corrupt files. Nothing is loaded then.
    """
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    fmt = detect_dit_format(checkpoint.keys()) if checkpoint_format == "auto" else checkpoint_format
    sources, ignored = dit_key_map(checkpoint.keys(), fmt, text_branch, image_branch)
    new_branches = [b for b in dit.branches if not any(k.startswith(f"context_embedders.{b}.") for k in sources)]
    new_prefixes = tuple(f"context_embedders.{b}." for b in new_branches) + tuple(
        f".cross_attn.branches.{b}." for b in new_branches)
    adapt = {}
    patch = sources.get("patch_embedding.weight")
    target = dit.patch_embedding.weight
    if patch in checkpoint:
        have = checkpoint.shape(patch)
        if have[1] < target.shape[1] and (have[0], *have[2:]) == (target.shape[0], *target.shape[2:]):
            adapt["patch_embedding.weight"] = lambda value, target: torch.cat(
                [value, value.new_zeros(value.shape[0], target.shape[1] - value.shape[1], *value.shape[2:])], dim=1)
    if (new_branches or adapt) and not allow_new_conditions:
        details = []
        if adapt:
            details.append(f"{checkpoint.file_of(patch)}: {patch} has shape {format_shape(checkpoint.shape(patch))}, "
                           f"expected {format_shape(target.shape)} ({checkpoint.shape(patch)[1]} input channels instead of "
                           f"{target.shape[1]})")
        for b in new_branches:
            key = f"blocks.0.cross_attn.branches.{b}.to_k.weight"
            details.append(f"{checkpoint.source}: no weights for the {b!r} branch (e.g. {key} "
                           f"{format_shape(dit.state_dict()[key].shape)})")
        raise WeightsError(
            "This DiT checkpoint has fewer conditions than the DiT it is loaded into (a text-to-video DiT where "
            "an image-to-video one is expected?):\n  " + "\n  ".join(details) + "\nUse a checkpoint of the same kind "
            "(e.g. Wan2.1-I2V for in_channels 36 + image branch), or set allow_new_conditions: true to add the new "
            "input channels and branches zero-initialised (the loaded DiT then reproduces the checkpoint's output)."
        )
    want = dtype or target.dtype
    report = load_into(
        dit, checkpoint, sources, dtype=want, device=device,
        allow_missing=lambda name: name.startswith(new_prefixes) or any(p in name for p in new_prefixes),
        ignored=ignored, adapt=adapt,
        hint=f"Checkpoint layout: {fmt}. Check the DiT preset (1.3B: dim 1536, 30 layers; 14B: dim 5120, 40 layers; "
             f"T2V: in_channels 16, text branch; I2V: in_channels 36, text + image branches) against the checkpoint.",
    )
    for b in new_branches:
        parts = [dit.context_embedders[b]] + [block.cross_attn.branches[b] for block in dit.blocks]
        for part in parts:
            part.to_empty(device=device or "cpu")
        dit.initialize_new_branch(b)
        for part in parts:
            part.to(want)
    if adapt:
        report.fresh.append("patch_embedding.weight (new input channels)")
    assert_materialized(dit, f"DiT from {checkpoint.source}")
    return report


def dit_arguments_from_checkpoint(path: str | Path | Checkpoint) -> dict:
    """:class:`WanDiT` arguments of a DiT checkpoint, read from its tensor shapes.

    The head count is not in the shapes: it comes from the folder's ``config.json`` (official Wan
    ``num_heads`` or diffusers ``num_attention_heads``), else Wan's head size 128 is assumed.
    """
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    sources, _ = dit_key_map(checkpoint.keys(), detect_dit_format(checkpoint.keys()))
    shape = lambda key: checkpoint.shape(sources[key])  # noqa: E731
    dim, in_channels, *patch = shape("patch_embedding.weight")
    branches = [CrossAttentionBranch("text", shape("context_embedders.text.net.0.weight")[1], "mlp")]
    if "context_embedders.image.net.1.weight" in sources:
        branches.append(CrossAttentionBranch("image", shape("context_embedders.image.net.1.weight")[1], "norm_mlp"))
    layers = {int(m.group(1)) for k in sources if (m := re.match(r"blocks\.(\d+)\.", k))}
    num_heads, eps = max(dim // 128, 1), 1e-6
    source = Path(checkpoint.source)
    config_file = (source if source.is_dir() else source.parent) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        num_heads = config.get("num_heads", config.get("num_attention_heads", num_heads))
        eps = config.get("eps", eps)
    return dict(
        in_channels=in_channels, out_channels=shape("head.proj.weight")[0] // math.prod(patch), dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0], num_heads=num_heads, num_layers=len(layers),
        branches=branches, patch_size=tuple(patch), freq_dim=shape("time_embedding.0.weight")[1], eps=eps,
    )


class PretrainedWanDiT(WanDiT):
    """A :class:`WanDiT` whose weights are read from disk as it is built: the factory to name in YAML.

    The model is built on the meta device and every tensor is read straight into place (see
    :func:`load_dit`), onto the current default device (Lightning's ``configure_model`` sets it), in
    ``dtype``. Its state-dict keys are :class:`WanDiT`'s, so checkpoints and exports are unchanged.

    Args:
        pretrained_path: DiT weights: a file, a ``*.safetensors.index.json``, or a folder of shards
            (official Wan2.1 folder, diffusers ``transformer/``, ByteDance/BindWeave, or this project's).
        checkpoint_format: ``auto`` (by key names) or one of ``bindweave``, ``diffusers``, ``wan``,
            ``bindweave_release``.
        allow_new_conditions: load a checkpoint with fewer input channels / branches (T2V into an
            I2V-shaped DiT, BindWeave's 1.3B setup), zero-initialising what is new. Off: that is an error.
        dtype: dtype of the loaded weights (``float32``, ``bfloat16``, ``float16``).
        text_branch: our branch filled by the checkpoint's text key/value stream.
        image_branch: our branch filled by the checkpoint's image key/value stream.
        in_channels: see :class:`WanDiT`; all architecture arguments are checked against the checkpoint.
        out_channels: see :class:`WanDiT`.
        dim: see :class:`WanDiT`.
        ffn_dim: see :class:`WanDiT`.
        num_heads: see :class:`WanDiT` (not visible in the weights: take it from the model's config).
        num_layers: see :class:`WanDiT`.
        branches: see :class:`WanDiT`.
        patch_size: see :class:`WanDiT`.
        freq_dim: see :class:`WanDiT`.
        eps: see :class:`WanDiT`.
    """

    def __init__(
        self,
        pretrained_path: str,
        checkpoint_format: DiTFormat = "auto",
        allow_new_conditions: bool = False,
        dtype: str = "float32",
        text_branch: str = "text",
        image_branch: str = "image",
        in_channels: int = 36,
        out_channels: int = 16,
        dim: int = 1536,
        ffn_dim: int = 8960,
        num_heads: int = 12,
        num_layers: int = 30,
        branches: list[CrossAttentionBranch] | None = None,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        freq_dim: int = 256,
        eps: float = 1e-6,
    ) -> None:
        device = torch.get_default_device()
        with torch.device("meta"):
            super().__init__(in_channels, out_channels, dim, ffn_dim, num_heads, num_layers, branches, patch_size,
                             freq_dim, eps)
        self.load_report = load_dit(
            self, pretrained_path, checkpoint_format, resolve_dtype(dtype),
            None if device.type in ("cpu", "meta") else device, allow_new_conditions, text_branch, image_branch,
        )
