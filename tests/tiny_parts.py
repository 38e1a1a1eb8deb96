"""Small random-weight instances of every encoder, conditioner and metric model, for the tests only
(STYLE rule 21: test factories stay in tests, as diffusers keeps its dummy components in its test
files). The shared contract tests build each plug-in class through :func:`tiny`; a new encoder or
conditioner needs an entry in :data:`TINY_FACTORIES`, and the contract tests say so by name."""

from __future__ import annotations

import copy
from functools import partial
from typing import Callable

from callbacks.metrics import CLIPTextImageModel
from conditioners import IdentityConditioner, MultiReferenceConditioner, ReaderConditioner, RelationalConditioner
from encoders import CLIPVisionEncoder, MLLMEncoder, PatchVAE, PromptReferenceReader, T5TextEncoder, WanVAE
from encoders.clip import TINY_CLIP_CONFIG
from encoders.mllm import TINY_MLLM_CONFIG
from encoders.text import TINY_T5_CONFIG
from encoders.vae import TINY_VAE_CONFIG


def tiny(cls: type):
    """A small random-weight instance of ``cls`` (same weights on every call: a fixed seed per encoder)."""
    if cls not in TINY_FACTORIES:
        raise LookupError(f"{cls.__qualname__} has no tiny instance for the tests: add one to TINY_FACTORIES "
                          f"in tests/tiny_parts.py")
    return TINY_FACTORIES[cls]()


def tiny_factory(cls: type) -> Callable[[], object]:
    """``tiny(cls)`` as a zero-argument factory (what the module's ``dit``/``vae``/encoder slots take)."""
    return partial(tiny, cls)


TINY_FACTORIES: dict[type, Callable[[], object]] = {
    T5TextEncoder: lambda: T5TextEncoder(tiny_config=copy.deepcopy(TINY_T5_CONFIG), max_length=32, dtype="float32"),
    MLLMEncoder: lambda: MLLMEncoder(tiny_config=copy.deepcopy(TINY_MLLM_CONFIG), image_size=56, dtype="float32"),
    CLIPVisionEncoder: lambda: CLIPVisionEncoder(tiny_config=copy.deepcopy(TINY_CLIP_CONFIG), dtype="float32"),
    WanVAE: lambda: WanVAE(tiny_config=copy.deepcopy(TINY_VAE_CONFIG), dtype="float32"),
    PatchVAE: lambda: PatchVAE(spatial=2, temporal=4),
    RelationalConditioner: lambda: RelationalConditioner(text_encoder=tiny_factory(T5TextEncoder),
                                                         mllm=tiny_factory(MLLMEncoder)),
    IdentityConditioner: lambda: IdentityConditioner(image_encoder=tiny_factory(CLIPVisionEncoder)),
    MultiReferenceConditioner: lambda: MultiReferenceConditioner(max_references=4),
    PromptReferenceReader: lambda: PromptReferenceReader(  # trainable: 1 layer of width 32, a few words
        vocabulary=["the", "first", "second", "subject", "on", "a", "background", ","], dim=32, num_layers=1,
        num_heads=2, crop_size=8, patch_size=4),
    ReaderConditioner: lambda: ReaderConditioner(reader=tiny_factory(PromptReferenceReader), reference_dropout=0.5),
    CLIPTextImageModel: lambda: CLIPTextImageModel(tiny_config={
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }),
}
