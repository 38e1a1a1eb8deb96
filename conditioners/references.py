"""Helpers shared by the conditioners that read the batch's reference images."""

from __future__ import annotations

import torch


def reference_mask(batch: dict) -> torch.Tensor:
    """(B, N) bool mask of real references from ``batch["num_references"]`` (a host-side list).

    Filled on the device row by row: no host→device copy of pageable memory, which would wait
    for the GPU queue to drain."""
    references = batch["references"]  # (B, N, 3, H, W)
    n = references.shape[1]
    mask = torch.zeros(references.shape[0], n, dtype=torch.bool, device=references.device)
    for i, count in enumerate(batch["num_references"]):
        mask[i, : int(count)] = True
    return mask


def apply_drop(mask: torch.Tensor, drop: list[bool] | None) -> torch.Tensor:
    """Clear the rows of a (B, ...) bool mask for dropped samples."""
    if drop is None or not any(drop):
        return mask
    mask = mask.clone()
    for i, dropped in enumerate(drop):
        if dropped:
            mask[i] = False
    return mask
