"""``bindweave weights export --layout release|wan|diffusers``: a model trained here, in the key layout
another program loads.

=============  ==========================================================  ===========================
layout         files                                                       loaded by
=============  ==========================================================  ===========================
``release``    ``diffusion_pytorch_model.safetensors`` (or ``-0000i-of-``   the official BindWeave
               ``0000N`` shards + ``.safetensors.index.json``),             inference (its
               ``config.json``: diffusers ``WanTransformer3DModel`` DiT     ``convert_ckpt.py``
               keys + ``condition_embedder.text_projector.linear_{1,2}.*``  ``convert_to_mm``), this
               (the relational connector)                                   project's ``load_release``
``diffusers``  the same files, DiT keys only; ``config.json`` with          ``WanTransformer3DModel.``
               ``_class_name: WanTransformer3DModel``                       ``from_pretrained``
``wan``        the same files with the official Wan2.1 ``WanModel`` keys    Wan2.1's ``WanModel``,
               (``blocks.N.self_attn.q``, ``img_emb.proj.*``, ``head.*``),  ComfyUI and its Wan video
               ``config.json`` as Wan2.1's                                  wrapper's loaders
=============  ==========================================================  ===========================

Only the DiT (and, for ``release``, the connector) is written: the frozen encoders are the ones the
model was trained with. The DiT must have Wan's architecture (a ``text`` and optionally an ``image``
branch, no extra options); the release's inference layout (CLIP overflow routing, slots before the
video, ...) is not in the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bindweave.atomic import AtomicPath
from bindweave.model.dit import CrossAttentionBranch, WanDiT
from bindweave.weights.bindweave_release import TEXT_PROJECTOR, connector_sources
from bindweave.weights.diffusers_format import bindweave_to_diffusers, diffusers_config_for
from bindweave.weights.export import CONFIG_NAME, WEIGHTS_NAME, export_config, model_keys, read_config
from bindweave.weights.loading import Checkpoint, WeightsError, save_sharded
from bindweave.weights.wan_official import bindweave_to_wan, wan_config_for

LAYOUTS = ("bindweave", "release", "wan", "diffusers")
FILE_NAME = "diffusion_pytorch_model"
CONNECTOR = "conditioners.relational.connector."


def read_trained(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable weights (model keys: ``dit.*``, ``conditioners.*``) and the ``model:`` config of
    a Lightning ``.ckpt`` of ``bindweave fit`` or of an export folder."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        source = Checkpoint.open(path, prefix=WEIGHTS_NAME)
        return {k: source.read(k) for k in source.keys()}, read_config(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot be read as a Lightning checkpoint with weights_only=True ({e}).") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise WeightsError(f"{path}: not a Lightning checkpoint of a BindWeave model (no state_dict/hyper_parameters).")
    return model_keys(checkpoint["state_dict"]), export_config(checkpoint["hyper_parameters"])["model"]


RELEASE_ROUTING = {"keep_tokens": 257, "overflow_to": "text"}
"""The released BindWeave's CLIP routing on the ``image`` branch: its official inference does it, so a
DiT with it exports to the ``release`` layout (and to no other: Wan and diffusers do not route)."""


def dit_from_config(model_config: dict, release: bool = False) -> WanDiT:
    """The DiT architecture of a ``model:`` config, on the meta device (no weights); ``release``
    leaves out the release's CLIP routing (:data:`RELEASE_ROUTING`), which the official code does itself."""
    args = dict(model_config["dit"].get("init_args", {}))
    branches = [dict(b) if isinstance(b, dict) else vars(b).copy() for b in args.get("branches") or []]
    for branch in branches:
        if release and branch["name"] == "image" and all(branch.get(k) == v for k, v in RELEASE_ROUTING.items()):
            branch.update(keep_tokens=None, overflow_to=None)
    args["branches"] = [CrossAttentionBranch(**b) for b in branches] or None
    with torch.device("meta"):
        return WanDiT(**{k: v for k, v in args.items() if v is not None})


def layout_state_dict(state: dict[str, torch.Tensor], dit: WanDiT, layout: str) -> tuple[dict, dict]:
    """(weights, config.json content) of trained weights in ``layout`` (``release``/``wan``/``diffusers``)."""
    dit_state = {k[4:]: v for k, v in state.items() if k.startswith("dit.")}
    if not dit_state:
        raise WeightsError("the weights hold no DiT (dit.*).")
    try:
        if layout == "wan":
            return bindweave_to_wan(dit_state), wan_config_for(dit)
        weights, config = bindweave_to_diffusers(dit_state), diffusers_config_for(dit)
    except ValueError as e:
        raise WeightsError(f"this DiT has no {layout} layout: {e}") from None
    config = {"_class_name": "WanTransformer3DModel", **config}
    if layout == "release":
        sources = connector_sources(CONNECTOR)
        missing = [k for k in sources if k not in state]
        if missing:
            raise WeightsError(f"the release layout needs the relational conditioner's connector (an MLLM model); "
                               f"missing {missing[:2]}.")
        weights.update({release: state[ours] for ours, release in sources.items()})
        config["bindweave_text_projector"] = {"in_features": int(state[CONNECTOR + "0.weight"].shape[1]),
                                              "keys": f"{TEXT_PROJECTOR}linear_{{1,2}}.{{weight,bias}}"}
    return weights, config


def export_layout(path: str | Path, directory: str | Path, layout: str, max_shard_bytes: int = 5 * 1024**3,
                  dtype: torch.dtype | None = None) -> Path:
    """Write the model of a ``.ckpt`` or export folder in ``layout`` (see the module docstring) into
    ``directory`` (replaced whole if it holds only such files)."""
    if layout not in LAYOUTS[1:]:
        raise WeightsError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}.")
    state, model_config = read_trained(path)
    weights, config = layout_state_dict(state, dit_from_config(model_config, release=layout == "release"), layout)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    weights = {k: v.contiguous() for k, v in weights.items()}
    directory = Path(directory)
    if directory.exists():
        foreign = sorted(p.name for p in directory.iterdir() if p.name != "config.json" and not p.name.startswith(FILE_NAME))
        if foreign:
            raise WeightsError(f"{directory} exists and holds other files ({foreign[:5]}): choose an empty or new folder.")
    with AtomicPath(directory, folder=True) as tmp:
        save_sharded(weights, tmp, FILE_NAME, max_shard_bytes, {"format": "pt", "bindweave_layout": layout})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return directory
