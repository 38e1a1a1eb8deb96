"""Tiny BindWeave components shared by the tests."""

from __future__ import annotations

from functools import partial

import torch

from bindweave.model.dit import CrossAttentionBranch, WanDiT
from bindweave.training.module import BindWeave, SamplingConfig
from bindweave.data.synthetic import SyntheticSubjects
from bindweave.model.batch import collate
from conditioners import IdentityConditioner, MultiReferenceConditioner, RelationalConditioner
from conditioners.base import Conditioning
from encoders import WanVAE
from encoders.base import Tokens
from tests.tiny_parts import tiny, tiny_factory

TINY_DIT = dict(
    in_channels=12, out_channels=4, dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32,
    branches=[CrossAttentionBranch("text", 32), CrossAttentionBranch("image", 32, "norm_mlp")],
)


def tiny_module(num_steps: int = 2, guidance_scale: float = 5.0, **overrides) -> BindWeave:
    """The full BindWeave composition with tiny random parts, built."""
    args = dict(
        dit=partial(WanDiT, **TINY_DIT),
        vae=tiny_factory(WanVAE),
        relational=tiny(RelationalConditioner),
        identity=tiny(IdentityConditioner),
        multi_reference=tiny(MultiReferenceConditioner),
        sampling=SamplingConfig(num_steps=num_steps, guidance_scale=guidance_scale, num_frames=5, height=32, width=32),
    )
    module = BindWeave(**{**args, **overrides})
    module.configure_model()
    return module


def synthetic_batch(size: int = 2, seed: int = 0, with_video: bool = True, max_references: int = 2, start: int = 0) -> dict:
    dataset = SyntheticSubjects(64, num_frames=5, height=32, width=32, max_references=max_references, seed=seed,
                                with_video=with_video)
    return collate([dataset[i] for i in range(start, start + size)])


def hand_null_conditioning(module: BindWeave, batch: dict) -> Conditioning:
    """CFG's unconditional side of a :func:`tiny_module` composition, built by hand from the encoders
    as docs/architecture.md defines it, not through ``BindWeave._null_conditions`` nor a conditioner's
    drop path: the guided relational condition becomes the empty prompt read without images,
    ``[connector(MLLM("")) ; T5("")]`` on every row; the unguided identity tokens and reference slots
    stay as in the conditional pass. Unpadded: each side keeps its own token lengths."""
    relational, identity, references = (module.conditioners[n] for n in ("relational", "identity", "multi_reference"))
    assert relational.guided and not identity.guided and not references.guided
    b = len(batch["prompt"])
    with torch.no_grad():
        t5 = relational.text_encoder([""])  # (1, L_t, C)
        mllm = relational.mllm([""], None, None)  # (1, L_m, C_m)
        projected = relational.connector(mllm.tokens)  # (1, L_m, C)
        text = Tokens(torch.cat([projected, t5.tokens], 1).expand(b, -1, -1),  # (B, L_m + L_t, C)
                      torch.cat([mllm.mask, t5.mask], 1).expand(b, -1))  # (B, L_m + L_t)
        image = identity(batch).context[identity.branch]
        slots = references(batch)
    return Conditioning(context={relational.branch: text, identity.branch: image}, slots=slots.slots,
                        slot_mask=slots.slot_mask)


def valid_tokens(tokens: Tokens, row: int) -> torch.Tensor:
    """Row ``row``'s unmasked tokens (L_valid, C): what masked cross-attention sees, whatever the padding."""
    return tokens.tokens[row][tokens.mask[row]]
