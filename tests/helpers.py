"""Tiny BindWeave components shared by the tests."""

from __future__ import annotations

from functools import partial

from bindweave.dit import CrossAttentionBranch, WanDiT
from bindweave.module import BindWeave, SamplingConfig
from bindweave.synthetic import SyntheticSubjects
from bindweave.batch import collate
from conditioners import IdentityConditioner, MultiReferenceConditioner, RelationalConditioner
from encoders import WanVAE

TINY_DIT = dict(
    in_channels=12, out_channels=4, dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32,
    branches=[CrossAttentionBranch("text", 32), CrossAttentionBranch("image", 32, "norm_mlp")],
)


def tiny_module(num_steps: int = 2, guidance_scale: float = 5.0, **overrides) -> BindWeave:
    """The full BindWeave composition with tiny random parts, built."""
    args = dict(
        dit=partial(WanDiT, **TINY_DIT),
        vae=WanVAE.tiny,
        relational=RelationalConditioner.tiny(),
        identity=IdentityConditioner.tiny(),
        multi_reference=MultiReferenceConditioner.tiny(),
        sampling=SamplingConfig(num_steps=num_steps, guidance_scale=guidance_scale, num_frames=5, height=32, width=32),
    )
    module = BindWeave(**{**args, **overrides})
    module.configure_model()
    return module


def synthetic_batch(size: int = 2, seed: int = 0, with_video: bool = True, max_references: int = 2, start: int = 0) -> dict:
    dataset = SyntheticSubjects(64, num_frames=5, height=32, width=32, max_references=max_references, seed=seed,
                                with_video=with_video)
    return collate([dataset[i] for i in range(start, start + size)])
