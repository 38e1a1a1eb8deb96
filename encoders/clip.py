"""The CLIP image encoder of Wan I2V: penultimate-block tokens of an open_clip vision tower.

Wan2.1 I2V conditions on the 257 x 1280 tokens (class token + 16x16 patches) that the 31st of the
32 blocks of ``xlm-roberta-large-ViT-H-14``'s visual tower outputs. Only the visual tower is built
(no text tower, so no Hub access for the XLM-R config), and the blocks after ``layer`` are dropped.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import VisionTransformer

from encoders.base import FrozenEncoder

_TEXT_STAND_IN = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}
"""The text tower open_clip's ``CLIP`` must build beside the vision tower we keep (then dropped)."""

# Tiny open_clip model config: a 2-block ViT of width 32 on 8x8 patches of 32x32 images (17 tokens).
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


# ----------------------------------------------------------------------------------------------
# Checkpoint layouts of the same tower: open_clip, Wan's .pth, transformers' CLIPVisionModel
# ----------------------------------------------------------------------------------------------

_HF_BLOCK = [
    ("ln_1.", "layer_norm1."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
]
_HF_TOP = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
    "proj": "visual_projection.weight",  # CLIPVisionModelWithProjection only, transposed
}


def transformers_clip_source(key: str, prefix: str = "") -> str | tuple[str, ...] | None:
    """The transformers ``CLIPVisionModel`` key(s) of an open_clip ``VisionTransformer`` key.

    open_clip's fused ``attn.in_proj_weight`` is transformers' q, k and v projections concatenated.
    ``prefix`` is ``vision_model.`` for checkpoints written by transformers 4.x.
    """
    if key in _HF_TOP:
        return prefix + _HF_TOP[key] if key != "proj" else _HF_TOP[key]
    match = re.match(r"^transformer\.resblocks\.(\d+)\.(.*)$", key)
    if not match:
        return None
    layer, rest = f"{prefix}encoder.layers.{match.group(1)}.self_attn.", match.group(2)
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        return tuple(f"{layer}{p}_proj.{kind}" for p in "qkv")
    for oc, hf in _HF_BLOCK:
        if rest.startswith(oc):
            return f"{prefix}encoder.layers.{match.group(1)}.{hf}{rest[len(oc):]}"
    return None


def open_clip_config_from_transformers(config: dict) -> dict:
    """open_clip model config (``embed_dim``, ``vision_cfg``, ``quick_gelu``) equivalent to a
    transformers ``CLIPVisionConfig`` (or a ``CLIPConfig``'s ``vision_config``)."""
    config = config.get("vision_config", config)
    act = config.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu") or config.get("layer_norm_eps", 1e-5) != 1e-5:
        raise ValueError(
            f"This CLIP vision config (hidden_act={act!r}, layer_norm_eps={config.get('layer_norm_eps')}) has no "
            f"open_clip equivalent: open_clip towers use gelu or quick_gelu and LayerNorm eps 1e-5."
        )
    width, heads = config["hidden_size"], config["num_attention_heads"]
    return {
        "embed_dim": config.get("projection_dim", 512),
        "quick_gelu": act == "quick_gelu",
        "vision_cfg": {
            "image_size": config["image_size"],
            "patch_size": config["patch_size"],
            "width": width,
            "layers": config["num_hidden_layers"],
            "head_width": width // heads,
            "mlp_ratio": config["intermediate_size"] / width,
        },
    }


def _reshaped(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Wan's (1, 1, D) / (1, T, D) embeddings as open_clip's (D,) / (T, D); anything else is an error."""
    if value.numel() != target.numel() or value.shape[-1] != target.shape[-1]:
        from bindweave.weights.loading import WeightsError

        raise WeightsError(f"CLIP embedding of shape {tuple(value.shape)} cannot fill {tuple(target.shape)}.")
    return value.reshape(target.shape)


def load_clip_tower(visual: VisionTransformer, path: str, checkpoint_format: str, dtype: torch.dtype) -> str:
    """Read a CLIP vision tower's weights into ``visual`` (built on meta), strictly; returns the format.

    ``open_clip``: a whole-model or visual-only open_clip checkpoint file; ``wan``: Wan's
    ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (its XLM-R text tower is skipped);
    ``transformers``: a ``CLIPVisionModel`` folder such as diffusers' ``image_encoder/`` (its
    ``proj`` is absent unless the model has a projection; Wan's tokens never use it).
    """
    from bindweave.weights.loading import Checkpoint, assert_materialized, load_into
    from bindweave.weights.wan_official import is_wan_clip, open_clip_to_wan_clip_key

    checkpoint = Checkpoint.open(path)
    keys = set(checkpoint.keys())
    targets = list(visual.state_dict())
    if checkpoint_format == "auto":
        checkpoint_format = "transformers" if Path(path).is_dir() else "wan" if is_wan_clip(keys) else "open_clip"
    adapt, allow_missing = {}, (lambda name: False)
    if checkpoint_format == "wan":
        sources = {t: open_clip_to_wan_clip_key(t) for t in targets}
        adapt = {"class_embedding": _reshaped, "positional_embedding": _reshaped}
        ignored = [k for k in keys if not k.startswith("visual.")]
    elif checkpoint_format == "transformers":
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
        sources = {t: transformers_clip_source(t, prefix) for t in targets}
        if "visual_projection.weight" in keys:
            adapt = {"proj": lambda value, target: value.t()}
        else:
            allow_missing = lambda name: name == "proj"  # noqa: E731
        ignored = [k for k in keys if not k.startswith(prefix) or k.endswith("position_ids")]
        ignored = [k for k in ignored if k != "visual_projection.weight"]
    elif checkpoint_format == "open_clip":
        prefix = "visual." if any(k.startswith("visual.") for k in keys) else ""
        stripped = "module." if all(k.startswith("module.") for k in keys) else ""
        sources = {t: stripped + prefix + t for t in targets}
        ignored = [k for k in keys if prefix and not k.startswith(stripped + prefix)]
    else:
        raise ValueError(
            f"Unknown CLIP checkpoint_format {checkpoint_format!r}: use auto, open_clip, wan or transformers.")
    load_into(visual, checkpoint, sources, dtype=dtype, allow_missing=allow_missing, ignored=ignored, adapt=adapt,
              hint="Check model_name (the tower's architecture) against the checkpoint.")
    if visual.proj is not None and visual.proj.is_meta:
        visual.proj = None  # only the projection is allowed to be absent; the tokens never use it
    assert_materialized(visual, f"CLIP tower from {path}")
    return checkpoint_format


class CLIPVisionEncoder(FrozenEncoder):
    """Token features of an open_clip ViT vision tower, taken after one of its transformer blocks.

    The output keeps the class token and includes the positional embedding and ``ln_pre``, as the
    tower computes them; it is the raw output of block ``layer`` (no ``ln_post``, no projection).

    Args:
        model_name: open_clip model config name (``open_clip.list_models()``) or
            ``"local-dir:/path"`` (a folder with ``open_clip_config.json``). Ignored with ``tiny_config``
            and with a transformers folder (its ``config.json`` describes the tower).
        pretrained_path: local weights of the tower: an open_clip checkpoint file (``.bin``/``.pt``/
            ``.safetensors``, whole CLIP model or visual tower), Wan's
            ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, or a transformers
            ``CLIPVisionModel`` folder (diffusers ``image_encoder/``). All give the same tokens.
            Exclusive with ``tiny_config``.
        checkpoint_format: ``auto`` (a folder is transformers; a file with Wan's keys is ``wan``; else
            ``open_clip``), or one of ``open_clip``, ``wan``, ``transformers``.
        tiny_config: random weights from an open_clip model config dict instead (``embed_dim``,
            ``vision_cfg``, optional ``quick_gelu``; ``text_cfg`` is ignored). See ``TINY_CLIP_CONFIG``.
        layer: index of the transformer block whose output is returned; -2 = penultimate, as Wan.
        image_mean: per-channel mean of the CLIP normalisation (applied to images in [0, 1]).
        image_std: per-channel std of the CLIP normalisation.
        resize: how images are resized to the tower's size: ``bicubic`` (paper) or
            ``bilinear_antialias`` (torchvision's ``Resize`` on tensors, what the released
            BindWeave's inference applies to its 1280x720 reference canvas).
        dtype: dtype of the weights and of the computation.
    """

    def __init__(
        self,
        model_name: str = "xlm-roberta-large-ViT-H-14",
        pretrained_path: str | None = None,
        tiny_config: dict | None = None,
        layer: int = -2,
        image_mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
        image_std: tuple[float, float, float] = OPENAI_DATASET_STD,
        checkpoint_format: Literal["auto", "open_clip", "wan", "transformers"] = "auto",
        resize: Literal["bicubic", "bilinear_antialias"] = "bicubic",
        dtype: str = "bfloat16",
    ) -> None:
        super().__init__(dtype)
        if resize not in ("bicubic", "bilinear_antialias"):
            raise ValueError(f"CLIPVisionEncoder: resize must be 'bicubic' or 'bilinear_antialias', got {resize!r}.")
        self.resize = resize
        self.check_source(pretrained_path, tiny_config, "a local open_clip checkpoint file")
        from_transformers = pretrained_path is not None and (
            checkpoint_format == "transformers" or (checkpoint_format == "auto" and Path(pretrained_path).is_dir()))
        if tiny_config is not None:
            model_cfg = copy.deepcopy(tiny_config)
        elif from_transformers:
            config_file = Path(pretrained_path) / "config.json"
            if not config_file.is_file():
                raise ValueError(f"{pretrained_path}: a transformers CLIP folder needs its config.json.")
            model_cfg = open_clip_config_from_transformers(json.loads(config_file.read_text()))
        else:
            model_cfg = open_clip.get_model_config(model_name)
            if model_cfg is None:
                raise ValueError(
                    f"Unknown open_clip model {model_name!r}: use a name from open_clip.list_models() "
                    "or 'local-dir:/path' to a folder with open_clip_config.json."
                )
        with torch.device("meta") if pretrained_path is not None else self.random_init():
            # open_clip's public CLIP builds the vision tower first (same random draws as building it
            # alone); the text tower, given a one-layer stand-in config, is dropped at once.
            visual = open_clip.model.CLIP(
                model_cfg["embed_dim"], model_cfg["vision_cfg"], _TEXT_STAND_IN, quick_gelu=model_cfg.get("quick_gelu", False)
            ).visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"{model_name!r} has a {type(visual).__name__} tower; only ViT towers are supported."
            )
        if pretrained_path is not None:
            self.checkpoint_format = load_clip_tower(visual, pretrained_path, checkpoint_format, self.dtype)

        num_blocks = len(visual.transformer.resblocks)
        if not -num_blocks <= layer < num_blocks:
            raise ValueError(f"layer={layer} is out of range for a tower of {num_blocks} blocks.")
        self.block = layer % num_blocks
        visual.prune_intermediate_layers([self.block], prune_norm=True, prune_head=True)  # drop later blocks
        self.visual = visual
        self.image_size = tuple(visual.image_size)
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def checkpoint_activations(self) -> None:
        """open_clip's per-block activation checkpointing of the tower (non-reentrant)."""
        self.visual.set_grad_checkpointing(True)

    @property
    def hidden_size(self) -> int:
        """Width D of the tokens."""
        return self.visual.transformer.width

    @property
    def num_tokens(self) -> int:
        """Number T of tokens per image: the class token plus one per patch."""
        return self.visual.positional_embedding.shape[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            images: (M, 3, H, W) in [-1, 1], any size (resized to the tower's size as ``resize`` says).

        Returns:
            (M, num_tokens, hidden_size) tokens of block ``layer``, class token first.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (M, 3, H, W) in [-1, 1], got {tuple(images.shape)}.")
        if self.resize == "bilinear_antialias":
            x = F.interpolate(images.float(), size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        else:
            x = F.interpolate(images.float(), size=self.image_size, mode="bicubic", align_corners=False)
        x = ((x + 1) / 2 - self.mean.float()) / self.std.float()  # (M, 3, S, S) CLIP-normalised
        out = self.visual.forward_intermediates(
            x.to(self.dtype),
            indices=[self.block],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        cls_token = out["image_intermediates_prefix"][0]  # (M, 1, D)
        patches = out["image_intermediates"][0]  # (M, T - 1, D)
        return torch.cat([cls_token, patches], dim=1)  # (M, T, D)
