"""A conditioner around a *trainable* encoder: the prompt and the references read by a small
transformer that trains with the DiT (:class:`encoders.reader.PromptReferenceReader`)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from conditioners.base import Conditioner, ConditionerSpec, Conditioning
from bindweave.host_copy import host_values
from conditioners.references import apply_drop, reference_mask
from encoders.base import Tokens
from encoders.reader import BOS, PAD, PromptReferenceReader


class ReaderConditioner(Conditioner):
    """Tokens of a trainable prompt + reference reader, for one DiT branch.

    :meth:`encode` runs the reader's weight-free half (tokenize; crop the references to their
    subject and resize them): that is what a feature cache stores. :meth:`condition` runs its
    trainable half with gradients, so the reader's weights are in the optimizer, in checkpoints and
    in exports (it is no :class:`~encoders.base.FrozenEncoder`).

    The null condition (CFG's unconditional side, ``dropout``) is the prompt ``<s>`` alone with no
    reference. ``reference_dropout`` drops only the references of a training sample (the prompt
    stays), so the model also learns the prompt's layout on its own.

    Args:
        reader: factory of the trainable reader.
        branch: DiT cross-attention branch fed.
        dropout: see :class:`Conditioner` (prompt and references together).
        reference_dropout: probability, in training, of dropping a sample's references alone
            (decided on the host: no device sync).
        guided: see :class:`Conditioner`.
    """

    def __init__(
        self,
        reader: Callable[[], PromptReferenceReader],
        branch: str = "text",
        dropout: float = 0.1,
        reference_dropout: float = 0.0,
        guided: bool = True,
    ) -> None:
        super().__init__(dropout=dropout, guided=guided)
        if not 0.0 <= reference_dropout <= 1.0:
            raise ValueError(f"ReaderConditioner: reference_dropout must be in [0, 1], got {reference_dropout}.")
        self.reader_factory = reader
        self.branch = branch
        self.reference_dropout = reference_dropout
        self.reader: PromptReferenceReader | None = None

    def build(self, vae: nn.Module) -> None:
        self.reader = self.reader_factory()

    def spec(self) -> ConditionerSpec:
        return ConditionerSpec(branches={self.branch: self.reader.hidden_size},
                               max_references=self.reader.max_references if self.reader.read_references else None)

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        references = batch.get("references") if self.reader.read_references else None
        mask = reference_mask(batch) if references is not None else None
        return self.reader.prepare(list(batch["prompt"]), references, mask)

    def condition(self, batch: dict, features: dict[str, torch.Tensor], drop: list[bool] | None = None) -> Conditioning:
        features = dict(features)
        dropped = list(drop) if drop is not None else [False] * len(batch["prompt"])
        if self.reader.read_prompt and any(dropped):
            rows = host_values(dropped, features["ids"].device, torch.bool)[:, None]  # (B, 1), no device sync
            null = torch.full_like(features["ids"], PAD)
            null[:, 0] = BOS
            features["ids"] = torch.where(rows, null, features["ids"])  # (B, L)
            features["id_mask"] = torch.where(rows, null != PAD, features["id_mask"])
        if self.reader.read_references:
            refs_dropped = dropped
            if self.training and self.reference_dropout > 0:
                alone = (torch.rand(len(dropped)) < self.reference_dropout).tolist()
                refs_dropped = [a or b for a, b in zip(dropped, alone)]
            features["crop_mask"] = apply_drop(features["crop_mask"], refs_dropped)
        tokens = self.reader(features)  # (B, L', D)
        return Conditioning(context={self.branch: Tokens(tokens.tokens, tokens.mask)})

