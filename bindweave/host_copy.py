"""Small host-side values (counts, masks, token ids) onto the training device without a sync.

A copy from pageable host memory to a GPU first waits for the GPU's queue to drain; made every
training step (a batch's reference counts, its dropped samples, its token ids), it stops the host
from queueing the next step while the GPU runs this one. Pinned memory and a non-blocking copy
avoid the wait.
"""

from __future__ import annotations

import torch


def host_values(values, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A host-side list (or CPU tensor) on ``device`` without waiting for the GPU: on CUDA through
    pinned memory and a non-blocking copy (PyTorch's caching host allocator keeps the pinned block
    until the copy has run); a plain copy from pageable memory would first wait for the GPU's queue
    to drain, stalling the host every training step."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    host = host.to(dtype)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def count_mask(counts, size: int, device: torch.device) -> torch.Tensor:
    """(B, size) bool, True in row i's first ``counts[i]`` places (real references among padded
    slots, say): ``counts`` a host-side list, built on ``device`` without waiting for the GPU."""
    counts = host_values([int(c) for c in counts], device, torch.long)  # (B,)
    return torch.arange(size, device=device)[None, :] < counts[:, None]  # (B, size)
