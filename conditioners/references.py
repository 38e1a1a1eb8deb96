"""Helpers shared by the conditioners that read the batch's reference images."""

from __future__ import annotations

import torch


def reference_mask(batch: dict) -> torch.Tensor:
    """(B, N) bool mask of real references from ``batch["num_references"]`` (a host-side list)."""
    references = batch["references"]  # (B, N, 3, H, W)
    counts = torch.as_tensor(batch["num_references"], device=references.device)  # (B,)
    slots = torch.arange(references.shape[1], device=references.device)  # (N,)
    return slots[None] < counts[:, None]  # (B, N)


def apply_drop(mask: torch.Tensor, drop: list[bool] | None) -> torch.Tensor:
    """Clear the rows of a (B, ...) bool mask for dropped samples."""
    if drop is None or not any(drop):
        return mask
    keep = torch.tensor([not d for d in drop], device=mask.device)  # (B,)
    return mask & keep.view(-1, *([1] * (mask.ndim - 1)))
