"""Helpers shared by the conditioners that read the batch's reference images."""

from __future__ import annotations

import torch

from bindweave.host_copy import count_mask, host_values


def reference_mask(batch: dict) -> torch.Tensor:
    """(B, N) bool mask of real references from ``batch["num_references"]`` (a host-side list),
    built on the references' device with no device sync (:func:`~bindweave.host_copy.count_mask`)."""
    references = batch["references"]  # (B, N, 3, H, W)
    return count_mask(batch["num_references"], references.shape[1], references.device)  # (B, N)


def apply_drop(mask: torch.Tensor, drop: list[bool] | None) -> torch.Tensor:
    """Clear the rows of a (B, ...) bool mask for dropped samples."""
    if drop is None or not any(drop):
        return mask
    dropped = host_values(list(drop), mask.device, torch.bool)  # (B,)
    return mask & ~dropped.view(-1, *[1] * (mask.ndim - 1))
