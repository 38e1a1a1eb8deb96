"""ByteDance's released BindWeave checkpoint (huggingface.co/ByteDance/BindWeave) mapped to ours.

What the official repository (github.com/bytedance/BindWeave at 5d9f749) says about the release:

* ``convert_ckpt.py`` converts the downloaded ``transformer`` weights ("HF" layout) to MindSpeed-MM.
  Its HF side is diffusers' ``WanTransformer3DModel`` naming (``condition_embedder.*``,
  ``blocks.N.attn1/attn2.*``, ``ffn.net.*``, ``scale_shift_table``, ``proj_out``; the unused
  ``attn2.norm_added_q`` is skipped) plus ``condition_embedder.text_projector.linear_{1,2}.{weight,bias}``,
  and it splits the result by a ``diffusion_pytorch_model.safetensors.index.json``.
* ``s2v/models/predictor/wan_dit_mllm.py``: ``text_projector = TextProjection(3584, text_dim=4096,
  GELU(tanh))`` (Linear 3584->4096, GELU-tanh, Linear 4096->4096), applied to the Qwen2.5-VL hidden
  states, then ``prompt = cat([projected MLLM states, T5 states])``; the DiT is Wan2.1-I2V-14B
  (``configs/inference/inference_model_s2v.json``: in_dim 36, hidden 5120, 40 layers, 40 heads,
  ffn 13824, text_dim 4096, img_dim 1280).

So the weights map exactly onto :class:`~bindweave.model.dit.WanDiT` (diffusers keys, see
``bindweave.weights.diffusers_format``) and the relational conditioner's connector (``connector.0`` = ``linear_1``,
``connector.2`` = ``linear_2``, same GELU-tanh in between). The release's inference layout (CLIP
routing, slots before the video, letterbox masks, negative prompt, ...) is configuration:
``configs/layout/release.yaml``, checked against the official code in ``tests/test_release_parity.py``
(``docs/weights.md``, "BindWeave's released weights").
"""

from __future__ import annotations

from pathlib import Path

import torch

from bindweave.weights.loading import Checkpoint, LoadReport, WeightsError, load_into

from bindweave.weights.dit_loading import load_dit

TEXT_PROJECTOR = "condition_embedder.text_projector."
CONNECTOR_KEYS = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
                  "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}
"""Our connector's keys (``nn.Sequential(Linear, GELU(tanh), Linear)``) -> the release's text_projector keys."""


def is_release(keys) -> bool:
    """Whether checkpoint keys are the released BindWeave DiT (diffusers keys + the text projector)."""
    return any(k.startswith(TEXT_PROJECTOR) for k in keys)


def connector_sources(prefix: str = "") -> dict[str, str]:
    """{our connector key, prefixed: release key} for the relational connector."""
    return {prefix + ours: TEXT_PROJECTOR + theirs for ours, theirs in CONNECTOR_KEYS.items()}


def load_release_connector(connector: torch.nn.Module, path: str | Path | Checkpoint,
                           dtype: torch.dtype | None = None) -> LoadReport:
    """Load the release's ``text_projector`` into a relational conditioner's ``connector`` (strict)."""
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    if not is_release(checkpoint.keys()):
        raise WeightsError(f"{checkpoint.source}: no {TEXT_PROJECTOR}* keys; not the released BindWeave DiT.")
    ignored = [k for k in checkpoint.keys() if not k.startswith(TEXT_PROJECTOR)]
    return load_into(connector, checkpoint, connector_sources(), dtype=dtype, ignored=ignored,
                     hint="The connector must be Linear(3584 -> 4096), GELU, Linear(4096 -> 4096): Qwen2.5-VL-7B "
                          "hidden states to umt5-xxl width, as in the release.")


def load_release(module, path: str | Path, dtype: torch.dtype | None = None) -> tuple[LoadReport, LoadReport]:
    """Load the released BindWeave DiT and text projector into a built
    :class:`~bindweave.training.module.BindWeave` (its ``dit`` and ``conditioners.relational.connector``).

    Returns the DiT's and the connector's load reports. Loading sets no layout: build the model from
    ``configs/layout/release.yaml`` to run the release as its own inference does.
    """
    checkpoint = Checkpoint.open(path)
    relational = module.conditioners["relational"] if "relational" in module.conditioners else None
    if relational is None or getattr(relational, "connector", None) is None:
        raise ValueError("The released BindWeave needs a relational conditioner with an MLLM (its connector).")
    dit_dtype = dtype or module.dit.patch_embedding.weight.dtype
    with torch.no_grad():
        dit_report = load_dit(module.dit, checkpoint, "bindweave_release", dtype=dit_dtype,
                              device=module.dit.patch_embedding.weight.device)
        connector_report = load_release_connector(relational.connector, checkpoint,
                                                  dtype or relational.connector[0].weight.dtype)
    return dit_report, connector_report
