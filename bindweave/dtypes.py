"""Dtype names as YAML writes them, in one place (torch only, so loading weights needs nothing else)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""YAML name -> torch dtype."""


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its YAML name (``float32``, ``bfloat16``, ``float16``); a ``torch.dtype`` passes through."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: use one of {sorted(DTYPES)}.")
    return DTYPES[name]


def fp8_device_unsupported(device: torch.device, what: str) -> str | None:
    """Why ``what`` (e.g. "FP8 linears") cannot run on ``device``: FP8 tensor cores need a CUDA GPU of
    compute capability 8.9+ (Ada, Hopper); None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{what} need a CUDA GPU, not {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return (f"{what} need compute capability 8.9+ (Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
    return None
