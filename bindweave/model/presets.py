"""Named architectures of the released Wan2.1 DiTs, as :class:`~bindweave.model.dit.WanDiT` arguments."""

from __future__ import annotations

from bindweave.model.dit import CrossAttentionBranch, WanDiT

_TEXT = CrossAttentionBranch("text", 4096, "mlp")
_IMAGE = CrossAttentionBranch("image", 1280, "norm_mlp")

PRESETS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(in_channels=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, branches=[_TEXT]),
    "wan2.1-t2v-14b": dict(in_channels=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, branches=[_TEXT]),
    "wan2.1-i2v-1.3b": dict(in_channels=36, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, branches=[_TEXT, _IMAGE]),
    "wan2.1-i2v-14b": dict(in_channels=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, branches=[_TEXT, _IMAGE]),
}
"""Architectures of the released Wan2.1 models (the 1.3B I2V is BindWeave's small setup: the 1.3B
T2V weights expanded to 36 input channels and an image branch, zero-initialised)."""


def wan_dit_preset(name: str, **overrides) -> WanDiT:
    """Build a :class:`WanDiT` from a named preset (``PRESETS``), optionally overriding arguments."""
    if name not in PRESETS:
        raise ValueError(f"Unknown DiT preset {name!r}; choose one of {sorted(PRESETS)}.")
    return WanDiT(**{**PRESETS[name], **overrides})
