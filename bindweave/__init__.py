"""BindWeave: subject-consistent video generation on PyTorch Lightning."""

from bindweave.dit import PRESETS, CrossAttentionBranch, WanDiT, wan_dit_preset

__all__ = ["PRESETS", "CrossAttentionBranch", "WanDiT", "wan_dit_preset"]
