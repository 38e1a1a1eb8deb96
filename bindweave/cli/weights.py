"""``bindweave weights check DIR`` and ``bindweave weights export CKPT OUT``.

``check`` looks at a folder (and the folders in it, two levels deep) without loading any weights:
it reads safetensors headers and ``config.json`` files, finds each component (DiT, VAE, T5 +
tokenizer, CLIP, MLLM, a BindWeave export or the released BindWeave DiT), says in which format it is
and what is wrong with it (missing shards, corrupt files, unexpected layouts). Every ``.safetensors``
file, safetensors index and ``config.json`` it passes is read, so a damaged download is named even
where no component is recognised. It then tells which config presets are ready; ``--verbose`` lists
what each other preset still needs, with the exact file names to download. The exit status is 1 if
anything is wrong (every problem is listed, the first is repeated as the error line), else 0.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bindweave.errors import UserError, report
from bindweave.weights.loading import Checkpoint, WeightsError
from bindweave.weights.dit_loading import detect_dit_format, dit_arguments_from_checkpoint

# ----------------------------------------------------------------------------------------------
# What each layout ships (file names as published on the Hugging Face Hub)
# ----------------------------------------------------------------------------------------------

OFFICIAL_FILES = {
    "dit": "config.json + diffusion_pytorch_model.safetensors (1.3B) or diffusion_pytorch_model.safetensors.index.json "
           "and the diffusion_pytorch_model-0000i-of-0000N.safetensors shards it lists (14B)",
    "vae": "Wan2.1_VAE.pth",
    "t5": "models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/ (tokenizer: spiece.model, tokenizer.json, "
          "tokenizer_config.json, special_tokens_map.json)",
    "clip": "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
}
DIFFUSERS_FILES = {
    "dit": "transformer/ (config.json + diffusion_pytorch_model*.safetensors [+ .index.json])",
    "vae": "vae/ (config.json + diffusion_pytorch_model.safetensors)",
    "t5": "text_encoder/ (config.json + model*.safetensors [+ .index.json]) + tokenizer/",
    "clip": "image_encoder/ (config.json + model.safetensors)",
}
MLLM_FILES = ("config.json + model*.safetensors [+ model.safetensors.index.json] + preprocessor_config.json "
              "(transformers 5: processor_config.json) + tokenizer.json + tokenizer_config.json (+ chat_template.json)")
DOWNLOADS = {
    "wan2.1-i2v-14b": "Wan-AI/Wan2.1-I2V-14B-480P (or -720P), or the same repo with -Diffusers",
    "wan2.1-t2v-14b": "Wan-AI/Wan2.1-T2V-14B (or -Diffusers)",
    "wan2.1-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B (or -Diffusers)",
    "wan2.1-i2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B (or -Diffusers), loaded with allow_new_conditions: true",
}
MLLM_PRESETS = {"qwen2.5-vl-7b": ("qwen2_5_vl", 3584, "Qwen/Qwen2.5-VL-7B-Instruct"),
                "qwen2.5-vl-3b": ("qwen2_5_vl", 2048, "Qwen/Qwen2.5-VL-3B-Instruct"),
                "qwen2-vl-7b": ("qwen2_vl", 3584, "Qwen/Qwen2-VL-7B-Instruct")}


@dataclass
class Component:
    """One component found in the folder."""

    kind: str  # dit | vae | t5 | clip | mllm | export | connector | file (an unreadable file of no component)
    format: str
    path: str
    details: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class FolderReport:
    root: str
    components: list[Component] = field(default_factory=list)
    presets: dict[str, list[str]] = field(default_factory=dict)  # preset -> what is missing ([] = ready)

    def usable(self, kind: str) -> list[Component]:
        return [c for c in self.components if c.kind == kind and not c.problems]

    @property
    def problems(self) -> list[str]:
        """Everything wrong, in the order found ([] = the folder is fine, whatever it lacks)."""
        return [p for c in self.components for p in c.problems]


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _open(path: Path, component: Component, prefix: str | None = None) -> Checkpoint | None:
    try:
        return Checkpoint.open(path, prefix=prefix)
    except WeightsError as e:
        component.problems.append(str(e))
        return None


def _dit(folder: Path, fmt_hint: str, files: str) -> Component | None:
    has_weights = any(folder.glob("diffusion_pytorch_model*.safetensors*"))
    config = _json(folder / "config.json")
    if not has_weights and config.get("_class_name") not in ("WanModel", "WanTransformer3DModel"):
        return None
    component = Component("dit", fmt_hint, str(folder), {"files": files})
    checkpoint = _open(folder, component, prefix="diffusion_pytorch_model")
    if checkpoint is None:
        return component
    try:
        component.format = detect_dit_format(checkpoint.keys())
        if component.format == "bindweave_release":
            component.details["connector"] = "text_projector (bindweave_official.load_release)"
        args = dit_arguments_from_checkpoint(checkpoint)
    except (WeightsError, KeyError) as e:
        component.problems.append(f"{folder}: not a Wan2.1 DiT ({e}).")
        return component
    component.details.update(
        in_channels=args["in_channels"], dim=args["dim"], num_layers=args["num_layers"],
        branches=[b.name for b in args["branches"]],
        dtype="/".join(sorted({str(checkpoint.dtype(k)).removeprefix("torch.") for k in checkpoint.keys()})),
        size_gb=round(checkpoint.nbytes / 1e9, 2), shards=len(checkpoint.files),
    )
    return component


def _legacy(path: Path, kind: str, check) -> Component:
    component = Component(kind, "wan", str(path))
    checkpoint = _open(path, component)
    if checkpoint is not None:
        try:
            component.details.update(check(checkpoint))
        except (KeyError, ValueError) as e:
            component.problems.append(f"{path}: unexpected contents ({e}).")
    return component


def _t5_details(checkpoint: Checkpoint) -> dict:
    from bindweave.weights.wan_official import umt5_config_from_wan

    config = umt5_config_from_wan({k: checkpoint.shape(k) for k in checkpoint.keys()})
    return {"d_model": config["d_model"], "num_layers": config["num_layers"]}


def _clip_details(checkpoint: Checkpoint) -> dict:
    width = checkpoint.shape("visual.patch_embedding.weight")[0]
    layers = len({k.split(".")[2] for k in checkpoint.keys() if k.startswith("visual.transformer.")})
    return {"width": width, "layers": layers}


def _vae_details(checkpoint: Checkpoint) -> dict:
    from bindweave.weights.wan_official import vae_config_from_wan

    config = vae_config_from_wan({k: checkpoint.shape(k) for k in checkpoint.keys()})
    return {"z_dim": config["z_dim"], "base_dim": config["base_dim"]}


def _tokenizer_ok(folder: Path) -> bool:
    return folder.is_dir() and any((folder / n).is_file() for n in ("tokenizer.json", "spiece.model"))


def _scan(folder: Path, report: FolderReport) -> None:
    """Find the components stored directly in ``folder``."""
    found = report.components
    config = _json(folder / "config.json")
    export_config = folder / "config.yaml"
    if export_config.is_file() and any(folder.glob("model*.safetensors*")):
        from bindweave.weights.export import read_config

        component = Component("export", "bindweave", str(folder))
        try:
            dit = read_config(folder)["dit"]["init_args"]
            component.details.update(in_channels=dit.get("in_channels"), dim=dit.get("dim"),
                                     num_layers=dit.get("num_layers"),
                                     branches=[b["name"] for b in dit.get("branches", [])])
            checkpoint = _open(folder, component, prefix="model")
            if checkpoint is not None:
                component.details["size_gb"] = round(checkpoint.nbytes / 1e9, 2)
        except (WeightsError, KeyError, TypeError) as e:
            component.problems.append(str(e))
        found.append(component)
        return
    # The official Wan2.1 layout: everything in one folder.
    if (dit := _dit(folder, "wan", OFFICIAL_FILES["dit"])) is not None:
        found.append(dit)
    if (folder / "Wan2.1_VAE.pth").is_file():
        found.append(_legacy(folder / "Wan2.1_VAE.pth", "vae", _vae_details))
    t5_file = folder / "models_t5_umt5-xxl-enc-bf16.pth"
    if t5_file.is_file():
        component = _legacy(t5_file, "t5", _t5_details)
        component.details["tokenizer"] = str(folder / "google" / "umt5-xxl")
        if not _tokenizer_ok(folder / "google" / "umt5-xxl"):
            component.problems.append(f"{folder / 'google' / 'umt5-xxl'}: tokenizer folder missing (spiece.model, "
                                      f"tokenizer.json, tokenizer_config.json, special_tokens_map.json).")
        found.append(component)
    clip_file = folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    if clip_file.is_file():
        found.append(_legacy(clip_file, "clip", _clip_details))
    for name in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        if (folder / name).is_file():
            component = Component("clip", "open_clip", str(folder / name))
            _open(folder / name, component)
            found.append(component)
    # A transformers VLM (the relational MLLM): a config with a vision and a text part.
    model_type = config.get("model_type", "")
    if "vision_config" in config and ("text_config" in config or "hidden_size" in config):
        component = Component("mllm", "transformers", str(folder), {"model_type": model_type})
        text = config.get("text_config", config)
        component.details["hidden_size"] = text.get("hidden_size", config.get("hidden_size"))
        _open(folder, component, prefix="model")
        missing = [" or ".join(names) for names in (("preprocessor_config.json", "processor_config.json"),
                                                     ("tokenizer_config.json",))
                   if not any((folder / n).is_file() for n in names)]
        if missing:
            component.problems.append(f"{folder}: processor files missing: {', '.join(missing)}.")
        found.append(component)
    # The diffusers layout: one folder per component.
    if (folder / "transformer").is_dir():
        if (dit := _dit(folder / "transformer", "diffusers", DIFFUSERS_FILES["dit"])) is not None:
            found.append(dit)
    if _json(folder / "vae" / "config.json").get("_class_name") == "AutoencoderKLWan":
        component = Component("vae", "diffusers", str(folder / "vae"))
        _open(folder / "vae", component, prefix="diffusion_pytorch_model")
        found.append(component)
    if _json(folder / "text_encoder" / "config.json").get("model_type") in ("umt5", "t5"):
        component = Component("t5", "transformers", str(folder / "text_encoder"),
                              {"tokenizer": str(folder / "tokenizer")})
        _open(folder / "text_encoder", component, prefix="model")
        if not _tokenizer_ok(folder / "tokenizer"):
            component.problems.append(f"{folder / 'tokenizer'}: tokenizer folder missing.")
        found.append(component)
    if _json(folder / "image_encoder" / "config.json").get("model_type") in ("clip_vision_model", "clip"):
        component = Component("clip", "transformers", str(folder / "image_encoder"))
        _open(folder / "image_encoder", component, prefix="model")
        found.append(component)


# ----------------------------------------------------------------------------------------------
# Unreadable files, whether or not a component was recognised around them
# ----------------------------------------------------------------------------------------------

_FIX = "download it again, or delete it if nothing needs it"


def _unreadable(path: Path) -> str | None:
    """Why ``path`` (a ``.safetensors`` file or a JSON file) cannot be read, or None. Reads the
    safetensors header and checks that its tensors cover the file; reads no weights."""
    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):
                return None
        if not isinstance(json.loads(path.read_text()), dict):
            return "not a JSON object"
        return None
    except SafetensorError as e:
        return f"not a readable safetensors file ({e})"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"not valid JSON ({e})"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


def _check_files(folders: list[Path], report: FolderReport) -> None:
    """Add a ``file`` component for each unreadable ``*.safetensors``, ``*.safetensors.index.json`` or
    ``config.json`` in ``folders`` that no component's problem names already."""
    named = "\n".join(report.problems)
    for folder in folders:
        paths = {*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json"), folder / "config.json"}
        for path in sorted(p for p in paths if p.is_file() and str(p) not in named):
            why = _unreadable(path)
            if why is not None:
                kind = "safetensors" if path.suffix == ".safetensors" else "json"
                report.components.append(Component("file", kind, str(path), problems=[f"{path}: {why}; {_FIX}."]))


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


def _dit_fits(component: Component, preset: str) -> str | None:
    """None if the DiT serves the preset, else why not."""
    from bindweave.model.presets import PRESETS

    want = PRESETS[preset]
    d = component.details
    if d.get("dim") != want["dim"] or d.get("num_layers") != want["num_layers"]:
        return (f"dim {d.get('dim')}, {d.get('num_layers')} layers "
                f"(needs dim {want['dim']}, {want['num_layers']} layers)")
    image = "image" in d.get("branches", [])
    if want["in_channels"] == 36 and not image and d.get("in_channels") == 16:
        return "a T2V DiT: loads only with allow_new_conditions: true (new channels and image branch zero-initialised)"
    if want["in_channels"] == 16 and image:
        return "an I2V DiT (36 channels, image branch) where T2V is expected"
    return None


def evaluate_presets(report: FolderReport) -> None:
    """For each DiT preset (with the paper's relational MLLM) say what is still missing."""
    from bindweave.model.presets import PRESETS

    for preset in PRESETS:
        needs = []
        dits = report.usable("dit") + report.usable("export")
        fitting = [c for c in dits if _dit_fits(c, preset) is None]
        if not fitting:
            reasons = "; ".join(f"{c.path}: {_dit_fits(c, preset)}" for c in dits)
            needs.append(f"DiT ({DOWNLOADS[preset]}): official {OFFICIAL_FILES['dit']}, or diffusers "
                         f"{DIFFUSERS_FILES['dit']}" + (f" [found: {reasons}]" if reasons else ""))
        for kind in ("vae", "t5"):
            if not report.usable(kind):
                needs.append(f"{kind.upper()}: official {OFFICIAL_FILES[kind]}, or diffusers {DIFFUSERS_FILES[kind]}")
        if any(b.name == "image" for b in PRESETS[preset]["branches"]) and not report.usable("clip"):
            needs.append(f"CLIP: official {OFFICIAL_FILES['clip']}, or diffusers {DIFFUSERS_FILES['clip']}, or "
                         f"open_clip's CLIP-ViT-H-14-frozen-xlm-roberta-large-laion5B-s13B-b90k/"
                         f"open_clip_pytorch_model.bin")
        report.presets[preset] = needs
    for name, (model_type, hidden, repo) in MLLM_PRESETS.items():
        ok = [c for c in report.usable("mllm") if c.details.get("model_type") == model_type
              and c.details.get("hidden_size") == hidden]
        report.presets[f"mllm/{name}"] = [] if ok else [f"MLLM: {repo} ({MLLM_FILES})"]


def check_folder(path: str | Path) -> FolderReport:
    """Inspect ``path`` (and two levels of subfolders) and evaluate the presets. A ``path`` that is
    not a folder is a :class:`~bindweave.errors.UserError`; what is wrong inside is in the report."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"{root}: no such folder; give the folder that holds the downloaded weights.")
    if not root.is_dir():
        raise UserError(f"{root}: a file, not a folder; give the folder that holds it ({root.parent}).")
    report = FolderReport(str(root))
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    folders += sorted(q for p in folders[1:] for q in p.iterdir() if q.is_dir())
    diffusers_parts = {"transformer", "vae", "text_encoder", "image_encoder", "tokenizer", "google", "umt5-xxl",
                       "image_processor", "scheduler", "xlm-roberta-large"}
    for folder in folders:
        if folder != root and folder.name in diffusers_parts:
            continue  # scanned as part of their parent
        _scan(folder, report)
    _check_files(folders, report)
    evaluate_presets(report)
    return report


def format_report(report: FolderReport, verbose: bool = True) -> str:
    """The report as text; ``verbose``: what each preset still needs (else one line of ready presets)."""
    lines = [f"{report.root}"]
    if not report.components:
        lines.append("  no model components found")
    for c in report.components:
        status = "ok" if not c.problems else "PROBLEM"
        details = ", ".join(f"{k} {v}" for k, v in c.details.items() if k != "files")
        lines.append(f"  [{status}] {c.kind:<6} {c.format:<18} {c.path}" + (f"  ({details})" if details else ""))
        lines += [f"           {line}" for p in c.problems for line in p.splitlines()]
    if not verbose:
        ready = [preset for preset, needs in report.presets.items() if not needs]
        waiting = len(report.presets) - len(ready)
        lines.append(f"presets ready: {', '.join(ready) or 'none'}"
                     + (f" ({waiting} not; --verbose lists what each still needs)" if waiting else ""))
        return "\n".join(lines)
    lines.append("presets:")
    for preset, needs in report.presets.items():
        lines.append(f"  {preset}: {'ready' if not needs else 'missing'}")
        lines += [f"    - {n}" for n in needs]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``bindweave weights check|export``; exit status 1 with one error line when the folder holds a
    problem or the user's input is wrong (:class:`~bindweave.errors.UserError`)."""
    parser = argparse.ArgumentParser(prog="bindweave weights", description="Inspect and export model weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="which components a folder holds, in which format, what is missing")
    check.add_argument("folder")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("-v", "--verbose", action="store_true",
                       help="for every preset, what is still missing and where to download it")
    export = sub.add_parser("export", help="a Lightning .ckpt of `bindweave fit` (or an export folder) -> safetensors + config.yaml")
    export.add_argument("checkpoint")
    export.add_argument("output")
    export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (GB)")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast the weights (default: as trained)")
    export.add_argument("--int8", action="store_true",
                        help="store the large matrices as int8 with per-channel scales (half of bfloat16's bytes)")
    export.add_argument("--merge_lora", "--merge-lora", action="store_true",
                        help="a LoRA fine-tune: fold the adapters into the base weights and export the whole model "
                             "(default: the adapters only, loaded onto the base the config names)")
    export.add_argument("--layout", choices=["bindweave", "release", "wan", "diffusers"], default="bindweave",
                        help="bindweave: this project's export; release: the official BindWeave inference's DiT + "
                             "text_projector; wan: Wan2.1/ComfyUI DiT keys; diffusers: WanTransformer3DModel "
                             "(docs/weights.md)")
    card = sub.add_parser("card", help="(re)write an export folder's model card, README.md (export writes one)")
    card.add_argument("folder")
    card.add_argument("--scores", help="a Markdown file of measured scores (e.g. `bindweave eval --table`)")
    card.add_argument("--name", help="the card's title (default: the folder's name)")
    card.add_argument("--description", help="a Markdown file with a paragraph on what this model is")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            run_check(args)
        elif args.command == "card":
            run_card(args)
        else:
            run_export(args)
    except (UserError, WeightsError) as e:
        raise report(f"weights {args.command}", e) from None


def run_check(args: argparse.Namespace) -> None:
    """Print the report; a :class:`~bindweave.errors.UserError` naming the first problem if there is one."""
    result = check_folder(args.folder)
    print(json.dumps(asdict(result), indent=2) if args.json else format_report(result, args.verbose))
    problems = result.problems
    if problems:
        more = f" ({len(problems)} problems in {result.root}, all listed above)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)


def run_export(args: argparse.Namespace) -> None:
    from bindweave.weights.export import export_checkpoint

    if args.layout != "bindweave":
        from bindweave.weights.layouts import export_layout
        from bindweave.dtypes import resolve_dtype

        if args.int8 or args.merge_lora:
            raise UserError(f"--int8 and --merge_lora write this project's export; with --layout {args.layout}, export "
                            f"with them first, then export that folder with --layout {args.layout}.")
        out = export_layout(args.checkpoint, args.output, args.layout, int(args.max_shard_gb * 1024**3),
                            resolve_dtype(args.dtype) if args.dtype else None)
        print(f"exported {args.checkpoint} -> {out} ({args.layout} layout: DiT"
              f"{' + text_projector' if args.layout == 'release' else ''}, config.json)")
        return
    try:
        if args.merge_lora:
            out = _export_merged(args)
        if not args.merge_lora or args.dtype or args.int8:
            out = export_checkpoint(args.output if args.merge_lora else args.checkpoint, args.output,
                                    int(args.max_shard_gb * 1024**3), args.dtype, args.int8)
    except (UserError, WeightsError):
        raise
    except ValueError as e:  # export.py still raises some of the user's mistakes (a config-less model) as ValueError
        raise UserError(str(e)) from None
    print(f"exported {args.checkpoint} -> {out} (load with bindweave.inference.pretrained.load_pretrained; "
          f"model card: {Path(out) / 'README.md'})")


def run_card(args: argparse.Namespace) -> None:
    from bindweave.weights.export import write_card

    texts = {}
    for key in ("scores", "description"):
        path = getattr(args, key)
        if path is not None:
            if not Path(path).is_file():
                raise UserError(f"--{key} {path!r} does not exist; pass a Markdown file.")
            texts[key] = Path(path).read_text()
    print(f"wrote {write_card(args.folder, name=args.name, **texts)}")


def _export_merged(args: argparse.Namespace):
    """A LoRA checkpoint (or adapter-only export) built on its base, adapters merged, exported whole."""
    from pathlib import Path

    from bindweave.inference.pretrained import load_checkpoint, load_pretrained
    from bindweave.training.lora import merge_lora
    from bindweave.weights.export import read_config, save_pretrained

    source = Path(args.checkpoint)
    module = load_pretrained(source) if source.is_dir() and not (source / "meta.pt").is_file() else load_checkpoint(source)
    if module.lora is None:
        raise UserError(f"{source}: --merge_lora needs a LoRA fine-tune (its config has no model.lora); "
                        f"export it without --merge_lora.")
    merge_lora(module.model)
    if source.is_dir():
        config = read_config(source)
    else:  # the config the checkpoint stores (the rebuilt module's hparams hold objects, not the config)
        import torch

        config = dict(torch.load(source, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"])
    config["lora"] = None
    return save_pretrained(module, args.output, config=config, max_shard_bytes=int(args.max_shard_gb * 1024**3))

if __name__ == "__main__":
    main()
