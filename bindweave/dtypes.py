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
