"""The one attention entry point of the project, over ``F.scaled_dot_product_attention``.

It runs everywhere SDPA runs (CPU included); on a GPU, PyTorch picks the fastest backend that
supports the inputs (flash / cuDNN / memory-efficient). Keep every attention call going through here
so backend choices, masking rules and sequence parallelism have one home.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head attention with an optional key padding mask.

    Args:
        q: queries (B, Lq, H, Dh).
        k: keys (B, Lk, H, Dh).
        v: values (B, Lk, H, Dh).
        key_mask: (B, Lk) bool, True where a key is a real token; None attends to every key.

    Returns:
        (B, Lq, H, Dh). A sample whose keys are all masked gets zeros (that stream contributes
        nothing) instead of the NaNs a fully masked softmax would give.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
    if key_mask is None:
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Lq, Dh)
        return out.transpose(1, 2)
    has_any = key_mask.any(dim=-1)  # (B,)
    # A fully masked row would be NaN: let it attend everywhere, then zero it below.
    safe_mask = key_mask | ~has_any[:, None]  # (B, Lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :])
    out = out * has_any[:, None, None, None].to(out.dtype)  # (B, H, Lq, Dh)
    return out.transpose(1, 2)  # (B, Lq, H, Dh)
