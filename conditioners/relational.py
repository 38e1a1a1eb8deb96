"""BindWeave's relational condition: MLLM hidden states through a connector, joined to T5 tokens."""

from __future__ import annotations

from typing import Callable

from torch import nn

from conditioners.base import Conditioner, ConditionerSpec, Conditioning, concat_tokens
from conditioners.references import apply_drop, reference_mask
from encoders.base import Tokens
from encoders.mllm import MLLMEncoder
from encoders.text import T5TextEncoder


class RelationalConditioner(Conditioner):
    """Prompt + references read jointly by an MLLM, plus the prompt's T5 tokens, for one branch.

    The MLLM reads one interleaved sequence (the prompt followed by an image placeholder per
    reference); its last hidden states go through a trainable 2-layer MLP + GELU *connector* to the
    T5 width and are concatenated before the T5 tokens: ``[connector(mllm); t5]`` (B, L_m + L_t, C_t).
    With ``mllm`` left out this is the paper's T5-only ablation.

    The connector's output layer is zero-initialised: at step 0 the MLLM tokens are all equal
    constants, so they carry no information yet (they still take part in the attention softmax, so
    a concatenated branch is not bit-identical to T5 alone; feed the MLLM to a separate,
    zero-initialised branch via ``branch`` if exact step-0 equality matters).

    Args:
        text_encoder: factory of the T5/UMT5 encoder.
        mllm: factory of the MLLM encoder; None switches the MLLM path off.
        branch: DiT cross-attention branch fed.
        null_prompt: prompt used for the null (unconditional / dropped) condition; its MLLM input has no images.
        dropout: see :class:`Conditioner`.
        guided: see :class:`Conditioner`.
    """

    def __init__(
        self,
        text_encoder: Callable[[], T5TextEncoder],
        mllm: Callable[[], MLLMEncoder] | None = None,
        branch: str = "text",
        null_prompt: str = "",
        dropout: float = 0.1,
        guided: bool = True,
    ) -> None:
        super().__init__(dropout=dropout, guided=guided)
        self.text_encoder_factory = text_encoder
        self.mllm_factory = mllm
        self.branch = branch
        self.null_prompt = null_prompt
        self.text_encoder: T5TextEncoder | None = None
        self.mllm: MLLMEncoder | None = None
        self.connector: nn.Sequential | None = None

    def build(self, vae: nn.Module) -> None:
        self.text_encoder = self.text_encoder_factory()
        if self.mllm_factory is not None:
            self.mllm = self.mllm_factory()
            width = self.text_encoder.hidden_size
            self.connector = nn.Sequential(
                nn.Linear(self.mllm.hidden_size, width), nn.GELU(approximate="tanh"), nn.Linear(width, width)
            )
            nn.init.zeros_(self.connector[2].weight)
            nn.init.zeros_(self.connector[2].bias)

    def spec(self) -> ConditionerSpec:
        return ConditionerSpec(branches={self.branch: self.text_encoder.hidden_size})

    def forward(self, batch: dict, drop: list[bool] | None = None) -> Conditioning:
        prompts = list(batch["prompt"])
        if drop is not None:
            prompts = [self.null_prompt if d else p for p, d in zip(prompts, drop)]
        t5 = self.text_encoder(prompts)  # (B, L_t, C_t)
        if self.mllm is None:
            return Conditioning(context={self.branch: t5})
        images = batch["references"]  # (B, N, 3, H, W)
        image_mask = apply_drop(reference_mask(batch), drop)  # (B, N)
        hidden = self.mllm(prompts, images, image_mask)  # (B, L_m, C_m)
        weight = self.connector[0].weight
        projected = self.connector(hidden.tokens.to(weight.dtype))  # (B, L_m, C_t)
        mllm_tokens = Tokens(projected.to(t5.tokens.dtype), hidden.mask)
        return Conditioning(context={self.branch: concat_tokens([mllm_tokens, t5])})

    @classmethod
    def tiny(cls) -> "RelationalConditioner":
        return cls(text_encoder=T5TextEncoder.tiny, mllm=MLLMEncoder.tiny)
