"""The conditioner contract: given the batch, return contributions to the DiT's input.

A conditioner turns (part of) a batch into a :class:`Conditioning`:

* ``context``: tokens + mask for named cross-attention branches of the DiT (several conditioners may
  feed one branch: their tokens are concatenated in the order the conditioners are listed);
* ``slots``: channels of extra temporal slots appended after the video latent (BindWeave's reference
  latents + masks), with a per-sample ``slot_mask`` when samples have different numbers of slots
  (or placed before it, and with channels for the video frames too: the released BindWeave's layout).

It works in two halves: :meth:`Conditioner.encode` runs the encoders (its output is what a feature
cache stores, unless the model trains one of them: ``model.train_encoders``) and
:meth:`Conditioner.condition` turns those features into contributions (trainable projections, masks,
condition dropout).

Heavy parts (frozen encoders) are built in :meth:`Conditioner.build`, called from the
LightningModule's ``configure_model``, so constructing a conditioner from YAML is instant.
Add your own by subclassing and naming it with ``class_path`` in a config (see README).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from encoders.base import Tokens, pretrained_encoders


@dataclass
class Conditioning:
    """What the conditioners contribute for one batch.

    Attributes:
        context: {branch name: Tokens (B, L, C) + mask (B, L)} for the DiT's cross-attention.
        slots: (B, C_slot, N, h, w) channels of N temporal slots appended after the video latent.
        slot_mask: (B, N) bool, False for padding slots (samples with fewer references); None when
            every slot of every sample is real.
        slot_placement: ``after`` the video frames on the time axis (the paper) or ``before`` them
            (the released BindWeave: RoPE time positions 0..N-1 for the slots, N.. for the video).
        video_slots: (B, C_slot, T, h, w) slot channels of the video frames themselves; None: zeros.
    """

    context: dict[str, Tokens] = field(default_factory=dict)
    slots: torch.Tensor | None = None
    slot_mask: torch.Tensor | None = None
    slot_placement: Literal["after", "before"] = "after"
    video_slots: torch.Tensor | None = None


@dataclass
class ConditionerSpec:
    """What a built conditioner produces, checked against the DiT before training.

    Attributes:
        branches: {branch name: token feature size} it feeds.
        slot_channels: channels of the temporal slots it adds (0 for none).
        min_references: fewest reference images a request must give (0: it reads none, or can do
            without); the sampler refuses requests with fewer, naming the conditioner.
        max_references: most reference images it takes (None: no limit of its own).
    """

    branches: dict[str, int] = field(default_factory=dict)
    slot_channels: int = 0
    min_references: int = 0
    max_references: int | None = None


class Conditioner(nn.Module):
    """Base class of all conditioners.

    Args:
        dropout: probability, during training, of replacing a sample's condition by its null
            condition (classifier-free guidance training).
        guided: whether classifier-free guidance contrasts this condition, i.e. the unconditional
            pass uses its null condition. False keeps it in both passes (as BindWeave does for the
            reference images).
    """

    def __init__(self, dropout: float = 0.0, guided: bool = True) -> None:
        super().__init__()
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1], got {dropout}.")
        self.dropout = dropout
        self.guided = guided

    def build(self, vae: nn.Module) -> None:
        """Build heavy parts (encoders). ``vae`` is the model's shared VAE, for conditioners that
        need latents. Called once from ``configure_model``."""

    def spec(self) -> ConditionerSpec:
        """Branches and slot channels this (built) conditioner produces."""
        raise NotImplementedError

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """Run the encoders: per-sample features, batched on dim 0 (what a feature cache stores, so
        training from the cache never loads the encoders). Default: none. Run it under
        :meth:`encoding`."""
        return {}

    #: Batch keys :meth:`encode` reads. A feature cache keeps the prompts but no pixels, so a
    #: conditioner whose encoder trains can run from cached shards only if it reads no more than those.
    encode_inputs: frozenset[str] = frozenset({"prompt", "references"})

    @property
    def trains_encoder(self) -> bool:
        """Whether one of its (built) encoders trains (``model.train_encoders``): its features are then
        computed in every step, with gradients, and never cached."""
        return any(encoder.trainable for encoder in pretrained_encoders(self))

    def encoding(self) -> AbstractContextManager:
        """The context :meth:`encode` runs in: no gradients, unless one of its encoders trains."""
        return nullcontext() if self.trains_encoder else torch.no_grad()

    def cached_state(self) -> dict[str, torch.Tensor]:
        """What a feature cache records, besides per-sample features, to build this (built)
        conditioner again without its encoders: encoder widths, null-condition features.
        Default: nothing."""
        return {}

    def build_cached(self, vae: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Build for training from cached features: the trainable parts only, from the
        :meth:`cached_state` a feature cache recorded; ``vae`` stands in for the VAE (its sizes).
        Default: :meth:`build` (right for conditioners whose build loads no encoder)."""
        self.build(vae)

    def condition(
        self, batch: dict, features: dict[str, torch.Tensor], drop: list[bool] | None = None
    ) -> Conditioning:
        """Turn features into DiT contributions (trainable projections, masks, slots).
        ``drop[i]`` replaces sample i's condition by the null condition."""
        raise NotImplementedError

    def forward(self, batch: dict, drop: list[bool] | None = None) -> Conditioning:
        """Encode the batch and condition on it."""
        return self.condition(batch, self.encode(batch), drop)


def pad_tokens(parts: list[Tokens]) -> Tokens:
    """Stack Tokens along the batch, right-padding each to the longest sequence (mask False)."""
    length = max(p.tokens.shape[1] for p in parts)
    tokens, masks = [], []
    for p in parts:
        pad = length - p.tokens.shape[1]
        tokens.append(nn.functional.pad(p.tokens, (0, 0, 0, pad)))  # (B, L, C)
        masks.append(nn.functional.pad(p.mask, (0, pad), value=False))  # (B, L)
    return Tokens(torch.cat(tokens), torch.cat(masks))


def concat_tokens(parts: list[Tokens]) -> Tokens:
    """Concatenate Tokens of the same batch along the sequence."""
    return Tokens(torch.cat([p.tokens for p in parts], dim=1), torch.cat([p.mask for p in parts], dim=1))


def merge(conditionings: list[Conditioning]) -> Conditioning:
    """Merge the contributions of several conditioners for the same batch."""
    merged = Conditioning()
    per_branch: dict[str, list[Tokens]] = {}
    for c in conditionings:
        for name, tokens in c.context.items():
            per_branch.setdefault(name, []).append(tokens)
        if c.slots is not None:
            if merged.slots is not None:
                raise ValueError("Only one conditioner may add temporal slots to the DiT input.")
            merged.slots, merged.slot_mask = c.slots, c.slot_mask
            merged.slot_placement, merged.video_slots = c.slot_placement, c.video_slots
    merged.context = {name: concat_tokens(parts) for name, parts in per_branch.items()}
    return merged


def stack_batches(first: Conditioning, second: Conditioning) -> Conditioning:
    """Concatenate two conditionings of the same branches along the batch (for batched CFG)."""
    out = Conditioning(context={n: pad_tokens([first.context[n], second.context[n]]) for n in first.context},
                       slot_placement=first.slot_placement)
    if first.slots is not None:
        out.slots = torch.cat([first.slots, second.slots])
        if first.video_slots is not None:
            out.video_slots = torch.cat([first.video_slots, second.video_slots])
        if first.slot_mask is not None:
            out.slot_mask = torch.cat([first.slot_mask, second.slot_mask])
    return out
