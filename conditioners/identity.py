"""Identity condition: CLIP tokens of every reference image, for the DiT's image branch."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from conditioners.base import Conditioner, ConditionerSpec, Conditioning
from conditioners.references import apply_drop, reference_mask
from encoders.base import Tokens
from encoders.clip import CLIPVisionEncoder


class IdentityConditioner(Conditioner):
    """CLIP vision tokens of each reference, concatenated over references: (B, N·T, D).

    The DiT's ``norm_mlp`` embedder of the fed branch projects them (Wan2.1-I2V's image projection);
    padded and dropped references are masked out of the attention.

    With ``fixed_references`` (the released BindWeave: 4) the tokens of absent, padded or dropped
    references are zero features and the sequence is always ``fixed_references`` x T long, every
    token attended (the DiT embeds the zeros to a nonzero constant, as the release does). The
    release's DiT then keeps the first reference's tokens in its image branch and attends the rest
    through the text branch (:class:`bindweave.model.dit.CrossAttentionBranch` ``keep_tokens`` /
    ``overflow_to``).

    Args:
        image_encoder: factory of the CLIP vision tower.
        branch: DiT cross-attention branch fed.
        fixed_references: pad to this many references with zero features, all attended (release:
            4); None: the batch's largest count, padding masked (paper).
        dropout: see :class:`Conditioner`.
        guided: see :class:`Conditioner` (BindWeave keeps the references in both CFG passes).
    """

    def __init__(
        self,
        image_encoder: Callable[[], CLIPVisionEncoder],
        branch: str = "image",
        fixed_references: int | None = None,
        dropout: float = 0.0,
        guided: bool = False,
    ) -> None:
        super().__init__(dropout=dropout, guided=guided)
        if fixed_references is not None and fixed_references < 1:
            raise ValueError(f"IdentityConditioner: fixed_references must be >= 1 or null, got {fixed_references}.")
        self.fixed_references = fixed_references
        self.image_encoder_factory = image_encoder
        self.branch = branch
        self.image_encoder: CLIPVisionEncoder | None = None
        self.width: int | None = None

    def build(self, vae: nn.Module) -> None:
        self.image_encoder = self.image_encoder_factory()
        self.width = self.image_encoder.hidden_size

    def cached_state(self) -> dict[str, torch.Tensor]:
        return {"width": torch.tensor(self.width)}

    def build_cached(self, vae: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.width = int(state["width"])

    def spec(self) -> ConditionerSpec:
        return ConditionerSpec(branches={self.branch: self.width}, min_references=1)

    encode_inputs = frozenset({"references"})

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        references = batch["references"]  # (B, N, 3, H, W)
        with self.encoding():
            tokens = self.image_encoder(references.flatten(0, 1))  # (B·N, T, D)
        return {"tokens": tokens.unflatten(0, references.shape[:2])}  # (B, N, T, D)

    def condition(self, batch: dict, features: dict[str, torch.Tensor], drop: list[bool] | None = None) -> Conditioning:
        tokens = features["tokens"]  # (B, N, T, D)
        b, n, t = tokens.shape[:3]
        mask = apply_drop(reference_mask(batch), drop)  # (B, N)
        if self.fixed_references is not None:  # absent references: zero features, attended (the release)
            if n > self.fixed_references:
                raise ValueError(f"{n} references but fixed_references is {self.fixed_references}; pass fewer.")
            tokens = tokens * mask[:, :, None, None].to(tokens.dtype)  # (B, N, T, D)
            tokens = nn.functional.pad(tokens, (0, 0, 0, 0, 0, self.fixed_references - n))  # (B, fixed, T, D)
            n, mask = self.fixed_references, mask.new_ones(b, self.fixed_references)
        token_mask = mask.repeat_interleave(t, dim=1)  # (B, N·T)
        return Conditioning(context={self.branch: Tokens(tokens.reshape(b, n * t, -1), token_mask)})

