"""The CLIP image encoder of Wan I2V: penultimate-block tokens of an open_clip vision tower.

Wan2.1 I2V conditions on the 257 x 1280 tokens (class token + 16x16 patches) that the 31st of the
32 blocks of ``xlm-roberta-large-ViT-H-14``'s visual tower outputs. Only the visual tower is built
(no text tower, so no Hub access for the XLM-R config), and the blocks after ``layer`` are dropped.
"""

from __future__ import annotations

import copy

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.factory import load_state_dict
from open_clip.model import _build_vision_tower
from open_clip.transformer import VisionTransformer

from encoders.base import FrozenEncoder

# Tiny open_clip model config: a 2-block ViT of width 32 on 8x8 patches of 32x32 images (17 tokens).
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


class CLIPVisionEncoder(FrozenEncoder):
    """Token features of an open_clip ViT vision tower, taken after one of its transformer blocks.

    The output keeps the class token and includes the positional embedding and ``ln_pre``, as the
    tower computes them; it is the raw output of block ``layer`` (no ``ln_post``, no projection).

    Args:
        model_name: open_clip model config name (``open_clip.list_models()``) or
            ``"local-dir:/path"`` (a folder with ``open_clip_config.json``). Ignored with ``tiny_config``.
        pretrained_path: local open_clip checkpoint file (``.bin``/``.pt``/``.safetensors``) of the
            whole CLIP model or of the visual tower alone. Exclusive with ``tiny_config``.
        tiny_config: random weights from an open_clip model config dict instead (``embed_dim``,
            ``vision_cfg``, optional ``quick_gelu``; ``text_cfg`` is ignored). See ``TINY_CLIP_CONFIG``.
        layer: index of the transformer block whose output is returned; -2 = penultimate, as Wan.
        image_mean: per-channel mean of the CLIP normalisation (applied to images in [0, 1]).
        image_std: per-channel std of the CLIP normalisation.
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
        dtype: str = "bfloat16",
    ) -> None:
        super().__init__(dtype)
        if (pretrained_path is None) == (tiny_config is None):
            raise ValueError(
                "CLIPVisionEncoder needs exactly one of `pretrained_path` (a local open_clip "
                "checkpoint file) or `tiny_config` (random weights); got "
                f"pretrained_path={pretrained_path!r} and "
                f"tiny_config={'set' if tiny_config is not None else None}."
            )
        if tiny_config is not None:
            model_cfg = copy.deepcopy(tiny_config)
        else:
            model_cfg = open_clip.get_model_config(model_name)
            if model_cfg is None:
                raise ValueError(
                    f"Unknown open_clip model {model_name!r}: use a name from open_clip.list_models() "
                    "or 'local-dir:/path' to a folder with open_clip_config.json."
                )
        visual = _build_vision_tower(
            model_cfg["embed_dim"],
            model_cfg["vision_cfg"],
            quick_gelu=model_cfg.get("quick_gelu", False),
        )
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"{model_name!r} has a {type(visual).__name__} tower; only ViT towers are supported."
            )

        if pretrained_path is not None:
            state = load_state_dict(pretrained_path)
            if any(k.startswith("visual.") for k in state):
                state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
            visual.load_state_dict(state)

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

    @property
    def hidden_size(self) -> int:
        """Width D of the tokens."""
        return self.visual.transformer.width

    @property
    def num_tokens(self) -> int:
        """Number T of tokens per image: the class token plus one per patch."""
        return self.visual.positional_embedding.shape[0]

    @classmethod
    def tiny(cls) -> "CLIPVisionEncoder":
        return cls(tiny_config=copy.deepcopy(TINY_CLIP_CONFIG), dtype="float32")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            images: (M, 3, H, W) in [-1, 1], any size (resized bicubic to the tower's size).

        Returns:
            (M, num_tokens, hidden_size) tokens of block ``layer``, class token first.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (M, 3, H, W) in [-1, 1], got {tuple(images.shape)}.")
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
