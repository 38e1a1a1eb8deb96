"""Pretrained backbones (frozen unless a model trains them): relational MLLM, T5 text encoder, CLIP image encoder,
Wan VAE (or a fixed patch VAE);
and a small trainable prompt + reference reader (``PromptReferenceReader``)."""

from encoders.base import FrozenEncoder, Tokens, resolve_dtype
from encoders.clip import CLIPVisionEncoder
from encoders.mllm import MLLMEncoder
from encoders.patch_vae import PatchVAE
from encoders.reader import PromptReferenceReader, WordTokenizer
from encoders.text import T5TextEncoder
from encoders.tokenizer import byte_level_tokenizer, qwen2_tokenizer
from encoders.vae import WanVAE

__all__ = [
    "CLIPVisionEncoder",
    "FrozenEncoder",
    "MLLMEncoder",
    "PatchVAE",
    "PromptReferenceReader",
    "T5TextEncoder",
    "Tokens",
    "WanVAE",
    "WordTokenizer",
    "byte_level_tokenizer",
    "qwen2_tokenizer",
    "resolve_dtype",
]
