"""Model cards: the ``README.md`` beside an export's weights.

Every export (:func:`bindweave.weights.export.write_export`) writes one from what it holds: what the
model is, its config in a few lines, how it was trained (steps, epochs, data: the ``training:``
section of ``config.yaml``, taken from the Lightning checkpoint it was exported from), measured
scores where someone recorded them, and how to load it. ``bindweave weights card FOLDER`` writes it
again for an existing export (e.g. with ``--scores`` from ``bindweave eval``), touching nothing else.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bindweave.weights.quantize import SCALE_SUFFIX

TITLE = "BindWeave"


def _entry_name(entry: object) -> str:
    """``encoders.T5TextEncoder`` -> ``T5TextEncoder``; None -> ``none``."""
    if not isinstance(entry, dict):
        return "none"
    return str(entry.get("class_path", "?")).rpartition(".")[2]


def _encoder_source(entry: object) -> str:
    """Where a frozen encoder's weights come from: its file, or random weights from a tiny config."""
    if not isinstance(entry, dict):
        return ""
    args = entry.get("init_args", {}) or {}
    if args.get("pretrained_path"):
        return f"`{args['pretrained_path']}`"
    if args.get("tiny_config"):
        return "random weights built from its config (no file)"
    return ""


def _size(num: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if num >= scale:
            return f"{num / scale:.1f}{unit}"
    return str(num)


def _reader_summary(conditioner: dict) -> str | None:
    """A ``ReaderConditioner``'s trainable reader in words (what it reads, its size, its branch); None for others."""
    args = conditioner.get("init_args", {}) or {}
    reader = args.get("reader")
    if not isinstance(reader, dict):
        return None
    r = reader.get("init_args", {}) or {}
    reads = " + ".join(part for part, on in (("prompt words", r.get("read_prompt", True)),
                                             ("references cropped to their subject" if r.get("crop") else "references",
                                              r.get("read_references", True))) if on)
    return (f"trained `{_entry_name(reader)}` ({reads}; width {r.get('dim')}, {r.get('num_layers')} layers) → branch "
            f"`{args.get('branch', 'text')}`")


def config_rows(model: dict, shapes: dict[str, tuple[int, ...]] | None = None) -> list[tuple[str, str]]:
    """(part, summary) rows of a ``model:`` config (and the stored weights' shapes, if given)."""
    rows = []
    dit = (model.get("dit") or {}).get("init_args", {}) or {}
    branches = ", ".join(f"{b.get('name')} ({b.get('context_dim')})" for b in dit.get("branches", []) or [])
    params = ""
    if shapes:
        count = sum(math.prod(s) for k, s in shapes.items() if k.startswith("dit."))
        params = f"; {_size(count)} parameters"
    rows.append(("DiT", f"`{_entry_name(model.get('dit'))}`: dim {dit.get('dim')}, {dit.get('num_layers')} layers, "
                        f"{dit.get('num_heads')} heads, FFN {dit.get('ffn_dim')}, patch {dit.get('patch_size')}, "
                        f"{dit.get('in_channels')} → {dit.get('out_channels')} channels; cross-attention "
                        f"branches: {branches or 'none'}{params}"))
    vae = model.get("vae")
    rows.append(("VAE", f"`{_entry_name(vae)}` {_encoder_source(vae)}".strip()))
    relational = model.get("relational")
    if isinstance(relational, dict) and (reader := _reader_summary(relational)):
        rows.append(("relational", reader))
    elif isinstance(relational, dict):
        args = relational.get("init_args", {}) or {}
        text, mllm = args.get("text_encoder"), args.get("mllm")
        rows.append(("relational", f"T5 `{_entry_name(text)}` {_encoder_source(text)}; MLLM `{_entry_name(mllm)}` "
                                   f"{_encoder_source(mllm)} → trained connector → branch `{args.get('branch', 'text')}`"))
    identity = model.get("identity")
    if isinstance(identity, dict) and (reader := _reader_summary(identity)):
        rows.append(("identity", reader))
    elif isinstance(identity, dict):
        args = identity.get("init_args", {}) or {}
        image = args.get("image_encoder")
        rows.append(("identity", f"CLIP `{_entry_name(image)}` {_encoder_source(image)} → branch "
                                 f"`{args.get('branch', 'image')}`"))
    multi = model.get("multi_reference")
    if isinstance(multi, dict):
        rows.append(("references", f"up to {(multi.get('init_args') or {}).get('max_references', 4)} reference "
                                   f"images as VAE latents in extra temporal slots"))
    extra = model.get("extra_conditioners") or []
    if extra:
        rows.append(("extra conditioners", ", ".join(_reader_summary(e) or f"`{_entry_name(e)}`" for e in extra)))
    s = model.get("sampling") or {}
    if s:
        rows.append(("sampling defaults", f"{s.get('num_frames')} frames of {s.get('width')}×{s.get('height')}, "
                                          f"{s.get('num_steps')} `{s.get('sampler')}` steps, guidance "
                                          f"{s.get('guidance_scale')}, shift {s.get('shift')}"))
    rows.append(("objective", f"rectified flow, `{model.get('prediction', 'velocity')}` prediction, flow shift "
                              f"{model.get('flow_shift')}, `{model.get('timestep_sampling')}` timesteps"))
    return rows


def training_lines(training: dict | None) -> list[str]:
    """Bullets of a ``training:`` section (steps, epochs, data, ...)."""
    if not training:
        return ["Not recorded: this export was not made from a Lightning checkpoint of `bindweave fit` "
                "(or was made before exports recorded it)."]
    lines = []
    for key, label in (("steps", "optimizer steps"), ("epochs", "epochs")):
        if training.get(key) is not None:
            lines.append(f"{label}: {training[key]:,}" if isinstance(training[key], int) else f"{label}: {training[key]}")
    data = training.get("data")
    if isinstance(data, dict) and data:
        shown = ", ".join(f"{k}: `{v}`" for k, v in data.items() if k != "class" and v not in (None, [], {}))
        lines.append(f"data: `{data.get('class', '?')}`" + (f" ({shown})" if shown else ""))
    elif data:
        lines.append(f"data: {data}")
    for key, value in training.items():
        if key not in ("steps", "epochs", "data") and value not in (None, "", [], {}):
            lines.append(f"{key.replace('_', ' ')}: {value}")
    return lines


def model_card(folder: str | Path, model: dict, shapes: dict[str, tuple[int, ...]] | None = None,
               training: dict | None = None, scores: str | None = None, name: str | None = None,
               description: str | None = None, dtypes: set[str] | None = None, int8: bool = False) -> str:
    """The Markdown of a model card.

    Args:
        folder: the export folder (named in the loading examples).
        model: the ``model:`` section of its ``config.yaml``.
        shapes: the weights' shapes (for the parameter count).
        training: the ``training:`` section (steps, epochs, data, ...), None if unknown.
        scores: Markdown with measured scores (a table and where it comes from), None if none.
        name: the card's title (default: the folder's name).
        description: a paragraph on what this particular model is.
        dtypes: the stored dtypes.
        int8: whether large matrices are stored int8 (:mod:`bindweave.weights.quantize`).
    """
    folder = Path(folder)
    name = name or folder.name
    if folder.is_absolute() and folder.is_relative_to(Path.cwd()):
        folder = folder.relative_to(Path.cwd())  # the examples name it as a user in this folder would
    storage = ", ".join(sorted(dtypes)) if dtypes else "safetensors"
    frozen = any(isinstance(((model.get(part) or {}).get("init_args") or {}).get(key), dict)  # a T5 / MLLM / CLIP tower
                 for part in ("relational", "identity") for key in ("text_encoder", "mllm", "image_encoder"))
    trained = model.get("train_encoders") or []  # their weights are in the folder too
    lines = [
        f"# {name}",
        "",
        f"A {TITLE} model for subject-consistent video generation: a prompt and 1–4 reference images in, a "
        f"video in which those subjects act out the prompt. Exported by `bindweave weights export`: "
        f"`config.yaml` (the model's config) and `model*.safetensors` (the trained "
        f"{'DiT and connector' if frozen else 'DiT and conditioners'}"
        f"{', and the encoders it trained: ' + ', '.join(trained) if trained else ''}"
        f"{', large matrices stored int8 with per-channel scales' if int8 else ''}; {storage}). "
        + ("Frozen encoders are not in the folder: `config.yaml` names their files or builds them from a config."
           if frozen else "The model has no frozen encoder: every trained part is in the folder."),
    ]
    if description:
        lines += ["", description.strip()]
    lines += ["", "## Config", "", "| part | |", "| --- | --- |"]
    lines += [f"| {part} | {text} |" for part, text in config_rows(model, shapes)]
    lines += ["", "## Training", ""] + [f"* {line}" for line in training_lines(training)]
    lines += ["", "## Scores", ""]
    lines += [scores.strip()] if scores else [
        "No measured scores were recorded with this export. For the sprites task, `bindweave eval` scores a "
        "folder of generated videos against the ground truth; `bindweave weights card` writes them in here."]
    lines += [
        "", "## Use", "",
        "```python",
        "from bindweave import BindWeavePipeline",
        "",
        f'pipe = BindWeavePipeline.from_pretrained("{folder}")',
        'video = pipe("a prompt naming the subjects", references=["subject.png"], seed=0)',
        'video.save("video.mp4"); video.save_contact_sheet("video.png")',
        "```",
        "",
        "In the browser, and over a JSONL file of requests (with the training config the model was made from):",
        "",
        "```bash",
        f"bindweave demo --pretrained {folder}",
        f"bindweave predict -c <training config> -c configs/predict.yaml --model.init_weights {folder} "
        f"--data.requests my_requests.jsonl",
        "```",
        "",
    ]
    return "\n".join(lines)


def stored_shapes(state: dict[str, torch.Tensor]) -> dict:
    """``shapes``, ``dtypes`` and ``int8`` of a state dict as stored (for :func:`model_card`)."""
    return {"shapes": {k: tuple(v.shape) for k, v in state.items() if not k.endswith(SCALE_SUFFIX)},
            "dtypes": {str(v.dtype).removeprefix("torch.") for v in state.values()},
            "int8": any(k.endswith(SCALE_SUFFIX) for k in state)}
