"""The released BindWeave's three OpenS2V-Eval test cases through ``bindweave predict`` (issue #20, item 3).

The official inference (``infer`` branch of github.com/bytedance/BindWeave) ships three cases in
``s2v/OpenS2V-Eval/test_case_with_features.json`` (faceobj_1: 3 references, singleface_1: 1,
multihuman_14: 2) with their reference images and precomputed Qwen2.5-VL-7B states
(``hidden_states/*_hidden_states.pt`` and ``*_negative.pt``: tensors (1, L, 3584) bfloat16). This
script turns that JSON into a predict requests file and runs it on a tiny random DiT of the release
layout (``configs/tiny.yaml`` + ``configs/layout/release.yaml`` + ``configs/layout/release-tiny.yaml``),
with no MLLM loaded (``relational.mllm_width``: the real states, projected to the tiny width by a
random connector). It checks the plumbing (JSON -> requests -> states -> conditioning -> video), not
the release's weights, which are not downloaded.

* The JSON's state paths name ``<case_id>_hidden_states.pt`` but the files are
  ``<case>_hidden_states.pt`` (``faceobj_1`` -> ``faceobj``): the request names the file that exists
  (``official_requests`` says which it picked).
* A state file that is missing or empty (a mirror without the Git LFS-like large blobs) is replaced,
  with ``--stand-ins``, by random states of the same format, and the summary says so; without it the
  request fails with one line and the others still run.

Usage:
    python benchmarks/release_cases.py /path/to/BindWeave-infer-checkout [--out DIR] [--stand-ins]
    # writes DIR/requests.jsonl, DIR/videos/<case>.mp4|.png|.json and DIR/summary.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import lightning
import torch
import yaml

from bindweave.cli.app import BindWeaveArgumentParser, BindWeaveCLI, run_cli
from bindweave.inference.mllm_states import read_mllm_states
from bindweave.training.module import BindWeave
from bindweave.weights.export import trainable_state_dict

ROOT = Path(__file__).resolve().parents[1]
CASES = "s2v/OpenS2V-Eval/test_case_with_features.json"
LAYERS = ("configs/tiny.yaml", "configs/layout/release.yaml", "configs/layout/release-tiny.yaml", "configs/predict.yaml")


def state_file(repo: Path, case_id: str, listed: str) -> tuple[Path, str]:
    """The states file a case means: the JSON's path if it exists, else the same name without the
    case number (``faceobj_1_hidden_states.pt`` -> ``faceobj_hidden_states.pt``, FACTS (d))."""
    path = repo / listed
    if path.is_file():
        return path, "as listed"
    stem = re.sub(r"_\d+$", "", case_id)
    renamed = path.with_name(path.name.replace(f"{case_id}_", f"{stem}_", 1))
    return renamed, f"listed {path.name}, named {renamed.name}"


def official_requests(repo: Path, out: Path, stand_ins: bool = False, width: int = 3584, seed: int = 1234) -> dict:
    """Write ``out/requests.jsonl`` from the official test-case JSON; return what was picked per case."""
    cases = json.loads((repo / CASES).read_text())
    out.mkdir(parents=True, exist_ok=True)
    lines, picked = [], {}
    generator = torch.Generator().manual_seed(seed)
    for case_id, case in cases.items():
        request = {"id": case_id, "prompt": case["prompt"], "seed": seed,
                   "references": [str((repo / CASES).parent / p) for p in case["img_paths"]]}
        notes = {}
        for key, listed in (("mllm_states", case["hidden_states_path"]),
                            ("negative_mllm_states", case["hidden_states_path_negative"])):
            path, how = state_file(repo, case_id, listed)
            usable = path.is_file() and path.stat().st_size > 0
            if not usable and stand_ins:
                stand_in = out / "stand_ins" / path.name
                stand_in.parent.mkdir(exist_ok=True)
                torch.save(torch.randn(1, 500, width, generator=generator).to(torch.bfloat16), stand_in)
                how += f"; {'empty' if path.is_file() else 'missing'} here: random stand-in (1, 500, {width}) bf16"
                path = stand_in
            elif usable:
                states = read_mllm_states(str(path))
                how += f"; real states {tuple(states.shape)}"
            request[key] = str(path)
            notes[key] = how
        lines.append(json.dumps(request))
        picked[case_id] = {"references": len(case["img_paths"]), **notes}
    (out / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return picked


def tiny_release_checkpoint(configs: list[str], path: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of the tiny release layout (config in its hyperparameters, as
    ``bindweave fit`` writes); the zero-initialised head and connector output are drawn at random too,
    so the video depends on every condition."""
    cli = BindWeaveCLI(BindWeave, lightning.LightningDataModule, subclass_mode_data=True, run=False,
                       parser_class=BindWeaveArgumentParser, args=[a for c in configs for a in ("-c", c)])
    module = cli.model  # built as `bindweave fit` builds it: the parsed config in its hyperparameters
    module.configure_model()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.nn.init.normal_(module.dit.head.proj.weight, std=0.3)
        torch.nn.init.normal_(module.model.conditioners["relational"].connector[2].weight, std=0.3)
    checkpoint = {"state_dict": trainable_state_dict(module), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    torch.save(checkpoint, path)
    return path


def run(repo: Path, out: Path, stand_ins: bool = False, width: int = 3584, steps: int = 2, num_frames: int = 9,
        height: int = 720, width_px: int = 1280) -> dict:
    """Requests from the official JSON, a tiny release checkpoint without an MLLM (states of
    ``width``), ``bindweave predict`` over them; returns (and writes) the summary."""
    out = Path(out).resolve()
    picked = official_requests(Path(repo), out, stand_ins, width)
    overlay = out / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"default_root_dir": str(out), "enable_progress_bar": False},
        "model": {"relational": {"init_args": {"mllm": None, "mllm_width": width}},
                  "sampling": {"num_steps": steps, "num_frames": num_frames, "height": height, "width": width_px}},
        "data": {"init_args": {"requests": str(out / "requests.jsonl"), "max_references": 4, "num_frames": num_frames,
                                "height": height, "width": width_px}}}))
    configs = [str(ROOT / c) for c in LAYERS] + [str(overlay)]
    checkpoint = tiny_release_checkpoint(configs, out / "tiny-release.ckpt")
    start = time.perf_counter()
    run_cli(["predict", *[a for c in configs for a in ("-c", c)], "--ckpt_path", str(checkpoint)])
    seconds = time.perf_counter() - start
    videos = out / "videos"
    summary = {"repo": str(repo), "size": [num_frames, height, width_px], "steps": steps, "mllm_width": width,
               "seconds": round(seconds, 1), "cases": {}}
    for case_id, notes in picked.items():
        record = videos / f"{case_id}.json"
        error = videos / f"{case_id}.error.json"
        summary["cases"][case_id] = {**notes, "video": (videos / f"{case_id}.mp4").is_file(),
                                     "error": json.loads(error.read_text())["error"] if error.is_file() else None,
                                     "request": json.loads(record.read_text())["request"] if record.is_file() else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", help="a checkout of bytedance/BindWeave's infer branch")
    parser.add_argument("--out", default="outputs/release-cases")
    parser.add_argument("--stand-ins", action="store_true", help="random states for missing or empty .pt files")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--num-frames", type=int, default=9)
    args = parser.parse_args()
    summary = run(Path(args.repo), Path(args.out), args.stand_ins, steps=args.steps, num_frames=args.num_frames)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
