"""Precomputed MLLM states for ``bindweave predict``: a request's ``mllm_states`` / ``negative_mllm_states``.

The released BindWeave never runs its MLLM at inference: its feature-extraction branch writes the
Qwen2.5-VL-7B last hidden states of (prompt + references) and of (negative prompt + references) to
``.pt`` files (one tensor each, (1, L, 3584) bfloat16), and the inference reads them
(``s2v/OpenS2V-Eval/test_case_with_features.json`` of the ``infer`` branch). A request names such
files and the relational conditioner uses them instead of its MLLM (or, with ``mllm_width``, loads
no MLLM at all). Three sources are read, each giving (L, C) float32:

* ``states.pt``: a tensor (1, L, C) or (L, C), read with ``torch.load(weights_only=True)`` (no
  pickle code runs);
* ``sample.safetensors``: one sample's features as this project's feature cache stores them
  (``relational.mllm_tokens`` + ``relational.mllm_mask``, or the ``negative_`` pair; the
  ``relational.`` prefix may be absent), padding removed by the mask;
* ``shard.tar#key``: the same, read straight from a feature-cache shard (``bindweave data cache``).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors

from bindweave.data.shards import FEATURES

KEYS = ("mllm_states", "negative_mllm_states")
"""Request keys naming precomputed states (the positive and the negative prompt's)."""


def resolve_source(source: str, root: Path) -> str:
    """``source`` with its file part made absolute against ``root`` (the requests file's folder)."""
    path, sep, member = source.partition("#")
    path = str((root / path).resolve()) if not Path(path).is_absolute() else path
    return path + sep + member


def read_mllm_states(source: str, negative: bool = False) -> torch.Tensor:
    """The (L, C) float32 MLLM states a request names (see the module docstring); ``negative`` picks
    the negative prompt's features in a feature-cache sample. ValueError naming the file and the fix."""
    path, _, member = source.partition("#")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"MLLM states {source!r} do not exist; fix the path (relative to the requests file).")
    if file.stat().st_size == 0:
        raise ValueError(f"MLLM states {source!r} are an empty file (an incomplete download or a Git LFS file "
                         f"not fetched); download it again.")
    try:
        if member:
            tensors = load_tensors(_shard_member(file, member))
        elif file.suffix == ".safetensors":
            tensors = load_tensors(file.read_bytes())
        else:
            states = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(states, torch.Tensor):
                raise ValueError(f"holds a {type(states).__name__}, not a tensor")
            return _as_sequence(states, source)
    except ValueError as error:
        raise ValueError(f"MLLM states {source!r}: {error}; give a .pt tensor (1, L, C), a feature-cache sample "
                         f"(.safetensors) or shard.tar#key.") from None
    except Exception as error:  # noqa: BLE001 (a damaged file: pickle, zip or safetensors errors)
        raise ValueError(f"MLLM states {source!r} cannot be read ({type(error).__name__}: {error}); download or "
                         f"write it again.") from None
    return _from_features(tensors, "negative_mllm" if negative else "mllm", source)


def _shard_member(file: Path, key: str) -> bytes:
    """The features of sample ``key`` in a feature-cache shard."""
    with tarfile.open(file) as tar:
        try:
            member = tar.getmember(f"{key}.{FEATURES}")
        except KeyError:
            raise ValueError(f"the shard has no sample {key!r} (no {key}.{FEATURES})") from None
        return tar.extractfile(member).read()


def _from_features(tensors: dict[str, torch.Tensor], name: str, source: str) -> torch.Tensor:
    for prefix in ("relational.", ""):
        if f"{prefix}{name}_tokens" in tensors:
            tokens = _as_sequence(tensors[f"{prefix}{name}_tokens"], source)
            mask = tensors.get(f"{prefix}{name}_mask")
            return tokens[mask.reshape(-1).bool()] if mask is not None else tokens
    raise ValueError(f"no {name}_tokens among its tensors ({sorted(tensors)[:6]})")


def _as_sequence(states: torch.Tensor, source: str) -> torch.Tensor:
    if states.ndim == 3 and states.shape[0] == 1:
        states = states[0]
    if states.ndim != 2 or not states.is_floating_point() or not states.shape[0]:
        raise ValueError(f"a tensor of shape {tuple(states.shape)} ({states.dtype}), expected (1, L, C) or (L, C) "
                         f"floating point with L > 0")
    return states.float()
