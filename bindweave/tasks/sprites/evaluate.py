"""Ground-truth metrics of generated videos on the sprites task (``bindweave eval``; docs/sprites.md).

Every sprites sample is fully determined by its prompt and references, so a generated video can be
scored against the exact answer its JSON record re-renders (:func:`bindweave.tasks.sprites.scenes.render_record`):

* **frame quality**: PSNR and SSIM of the whole video against the ground truth (torchmetrics; PSNR
  is capped at ``PSNR_CAP`` dB, which an exact video reaches).
* **subject-region error**: MSE in [-1, 1] pixels over the ground truth's subject pixels (the issue's
  headline number), per subject and overall; ``background_mse`` over the rest.
* **identity**: per subject, the colour-histogram intersection (4 levels per channel) between the
  generated pixels under the sprite's shape at the *tracked* position and the subject's pixels in
  its reference image (1: the same colours in the same proportions), over frames where the ground
  truth shows at least 80 % of the subject.
* **motion**: each subject is tracked by masked template matching (OpenCV, its sprite on the
  named background); ``position_error`` is the mean distance to its true centre (fraction of the
  frame's shorter side) and ``motion_accuracy`` the share of subjects whose tracked path is
  classified as the prompt's motion (right/left/up/down/jumps/still).
* **relation**: for a sample with "passing behind / in front of", whether the generated pixels where
  the two subjects overlap are closer to the stated layering than to the opposite one.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import random
from dataclasses import replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from bindweave.tasks.sprites import scenes as S
from bindweave.atomic import write_atomic
from bindweave.progress import progress
from bindweave.data.shards import expand_urls, parse_record, read_image

PSNR_CAP = 60.0
"""PSNR of an exact video (dB); torchmetrics would give infinity."""
MIN_VISIBLE = 0.8
"""Identity looks at frames where the ground truth shows at least this share of the subject."""
METRICS = ("psnr", "ssim", "subject_mse", "background_mse", "identity", "position_error", "motion_accuracy",
           "relation_accuracy")
"""Summary metrics, in table order."""
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "subject_mse": False, "background_mse": False, "identity": True,
                    "position_error": False, "motion_accuracy": True, "relation_accuracy": True}


# -- ground truth -----------------------------------------------------------------------------


def read_ground_truth(urls: str | list[str]) -> dict[str, dict]:
    """Records and reference images of sprites shards: id -> {"record", "references": [(H, W, 3) uint8]}."""
    out = {}
    for sample in wds.DataPipeline(wds.SimpleShardList(expand_urls(urls)), wds.tarfile_to_samples()):
        record = parse_record(sample["json"])
        if "sprites" not in record:
            raise ValueError(f"{sample['__url__']}:{sample['__key__']} is not a sprites sample (no 'sprites' in its record).")
        refs = sorted((k for k in sample if k.startswith("ref")), key=lambda k: int(k[3:].split(".")[0]))
        out[record["id"]] = {"record": record,
                             "references": [np.asarray(read_image(sample[k]).convert("RGB")) for k in refs]}
    if not out:
        raise ValueError(f"No sample in {urls}.")
    return out


def load_video(path: str | Path, num_frames: int, height: int, width: int) -> np.ndarray:
    """A generated video as (F, H, W, 3) uint8 at the ground truth's size (resized if needed)."""
    video = S.decode_video(path)
    if video.shape[0] != num_frames:
        raise ValueError(f"{path} has {video.shape[0]} frames, the ground truth {num_frames}: generate with "
                         f"num_frames={num_frames}.")
    if video.shape[1:3] != (height, width):
        video = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in video])
    return video


# -- tracking and motion ----------------------------------------------------------------------


LOST_RMSE = 32.0
"""A template match worse than this RMS error (0..255 units, over the sprite's pixels), or than 1.5 ×
the subject's first-frame match, counts as not seeing it (occluded): the tracker then coasts."""


def track(video: np.ndarray, scene: S.Scene, radius: float = 0.15) -> np.ndarray:
    """Centres (N, F, 2) of each subject (x, y in pixels) by masked template matching (its sprite on
    the background): anywhere in the first frame, then within ``radius`` × the frame's shorter side
    of where it should be (last position + last velocity). A frame whose best match is worse than
    ``LOST_RMSE`` or 1.5 × the first frame's match (the subject is hidden) keeps the predicted position, so a subject passing behind
    another is not swapped for it."""
    size = scene.sprite_size
    background = np.array(S.ALL_BACKGROUNDS[scene.background], np.uint8)
    pad = size // 2 + 1
    reach = max(2, round(radius * min(scene.height, scene.width)))
    frames = [cv2.copyMakeBorder(f, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=background.tolist()).astype(np.float32)
              for f in video]
    out = np.zeros((len(scene.subjects), video.shape[0], 2))
    for i, subject in enumerate(scene.subjects):
        rgb, mask = S.render_sprite(subject.appearance, size)
        template = np.where(mask[..., None], rgb, background).astype(np.float32)
        weights = np.repeat(mask[..., None], 3, axis=2).astype(np.float32)
        count = float(weights.sum())
        position, velocity, limit = None, np.zeros(2), LOST_RMSE  # (y, x) in score coordinates
        for f, frame in enumerate(frames):
            scores = cv2.matchTemplate(frame, template, cv2.TM_SQDIFF, mask=weights)  # (H + 2 pad - size + 1, ...)
            if position is None:
                best = np.array(np.unravel_index(np.argmin(scores), scores.shape), dtype=np.float64)
                limit = max(LOST_RMSE, 1.5 * math.sqrt(max(0.0, float(scores.min())) / count))
            else:
                expected = position + velocity
                y, x = np.round(expected).astype(int)
                window = np.full_like(scores, np.inf)
                window[max(0, y - reach) : max(0, y + reach + 1), max(0, x - reach) : max(0, x + reach + 1)] = 0.0
                scores = scores + window
                found = np.array(np.unravel_index(np.argmin(scores), scores.shape), dtype=np.float64)
                seen = math.sqrt(max(0.0, float(scores[int(found[0]), int(found[1])])) / count) <= limit
                best = found if seen else expected
                velocity = best - position if seen else velocity
            position = best
            out[i, f] = (best[1] - pad + size / 2, best[0] - pad + size / 2)
    return out


def true_centres(scene: S.Scene) -> np.ndarray:
    """Centres (N, F, 2) of the ground truth, in pixels (as the renderer places the sprites)."""
    return np.array([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for track_ in S.boxes(scene) for b in track_],
                    dtype=np.float64).reshape(len(scene.subjects), scene.num_frames, 2)


def classify_motion(centres: np.ndarray, height: int, width: int) -> str:
    """The motion label of a path (F, 2) of pixel centres: right/left/up/down/jumps/still, or "other".

    Start and end are medians of the first and last three frames; a jump rises at least half a
    jump's height and comes back; a still subject ends where it started and never strays far."""
    p = centres / np.array([width, height])
    k = min(3, len(p))
    start, end = np.median(p[:k], axis=0), np.median(p[-k:], axis=0)
    dx, dy = end - start
    rise = start[1] - p[:, 1].min()
    stray = np.linalg.norm(p - start, axis=-1)
    travel = S.TRAVEL / 2
    if abs(dx) >= travel and abs(dx) > 2 * abs(dy):
        return "right" if dx > 0 else "left"
    if abs(dy) >= travel and abs(dy) > 2 * abs(dx):
        return "down" if dy > 0 else "up"
    if rise >= S.JUMP / 2 and abs(dy) < S.JUMP / 3 and abs(dx) < S.JUMP / 3 and np.ptp(p[:, 0]) < S.JUMP / 2:
        return "jumps"
    if np.hypot(dx, dy) < 0.1 and np.quantile(stray, 0.75) < 0.1:
        return "still"
    return "other"


# -- per-sample metrics -----------------------------------------------------------------------


def _histogram(pixels: np.ndarray) -> np.ndarray:
    """Normalised 4×4×4 colour histogram of (M, 3) uint8 pixels."""
    bins = (pixels.astype(np.int64) // 64) @ np.array([16, 4, 1])
    counts = np.bincount(bins, minlength=64).astype(np.float64)
    return counts / max(1.0, counts.sum())


def reference_pixels(reference: np.ndarray) -> np.ndarray:
    """The subject's pixels of a reference (everything not pure white): (M, 3) uint8."""
    return reference[(reference != 255).any(axis=-1)]


def frame_quality(video: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(PSNR in dB, capped at ``PSNR_CAP``; SSIM) of a video against the ground truth (torchmetrics)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255.0  # (F, 3, H, W)
    b = torch.from_numpy(truth).permute(0, 3, 1, 2).float() / 255.0
    psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))
    ssim = float(structural_similarity_index_measure(a, b, data_range=1.0))
    return (PSNR_CAP if not math.isfinite(psnr) else min(psnr, PSNR_CAP)), ssim


def relation_correct(video: np.ndarray, scene: S.Scene) -> bool | None:
    """Whether the generated layering of the sample's relation is the stated one (None: no relation,
    or the two layerings look the same)."""
    pair = next(((i, s.relation[1]) for i, s in enumerate(scene.subjects) if s.relation), None)
    if pair is None:
        return None
    a, b = pair
    swapped = replace(scene, subjects=[replace(s) for s in scene.subjects])
    front = swapped.subjects[a].depth > swapped.subjects[b].depth
    swapped.subjects[a].depth = swapped.subjects[b].depth + (0.5 if not front else -0.5)
    right, wrong = S.render(scene).astype(np.float64), S.render(swapped).astype(np.float64)
    differ = (right != wrong).any(axis=-1)  # (F, H, W)
    if not differ.any():
        return None
    v = video.astype(np.float64)
    return bool(((v - right)[differ] ** 2).mean() < ((v - wrong)[differ] ** 2).mean())


def evaluate_sample(video: np.ndarray, record: dict, references: list[np.ndarray]) -> dict:
    """All metrics of one generated video (F, H, W, 3) uint8 against its sprites record."""
    scene = S.scene_from_json(record)
    truth, owner = S.render(scene, with_owner=True)
    if video.shape != truth.shape:
        raise ValueError(f"video {video.shape} vs ground truth {truth.shape}")
    psnr, ssim = frame_quality(video, truth)
    error = ((video.astype(np.float64) - truth.astype(np.float64)) / 127.5) ** 2  # (F, H, W, 3), [-1, 1] units
    subjects_mask = owner >= 0
    tracked, centres = track(video, scene), true_centres(scene)
    short = min(scene.height, scene.width)
    size = scene.sprite_size
    full = [int(S.render_sprite(s.appearance, size)[1].sum()) for s in scene.subjects]
    per_subject = []
    for i, subject in enumerate(scene.subjects):
        rgb, mask = S.render_sprite(subject.appearance, size)
        pixels = []
        for f in range(scene.num_frames):
            if (owner[f] == i).sum() < MIN_VISIBLE * full[i]:
                continue
            x0, y0 = (np.round(tracked[i, f] - size / 2)).astype(int)
            crop = np.zeros((size, size, 3), np.uint8)
            valid = np.zeros((size, size), bool)
            ya, yb, xa, xb = max(0, y0), min(scene.height, y0 + size), max(0, x0), min(scene.width, x0 + size)
            if ya < yb and xa < xb:
                crop[ya - y0 : yb - y0, xa - x0 : xb - x0] = video[f, ya:yb, xa:xb]
                valid[ya - y0 : yb - y0, xa - x0 : xb - x0] = True
            pixels.append(crop[mask & valid])
        identity = None
        if pixels and references:
            generated = _histogram(np.concatenate(pixels))
            identity = float(np.minimum(generated, _histogram(reference_pixels(references[i]))).sum())
        label = classify_motion(tracked[i], scene.height, scene.width)
        own = owner == i
        per_subject.append({
            "motion": subject.motion, "tracked_motion": label, "motion_correct": label == subject.motion,
            "position_error": float(np.linalg.norm(tracked[i] - centres[i], axis=-1).mean() / short),
            "identity": identity, "subject_mse": float(error[own].mean()) if own.any() else None,
        })
    identities = [s["identity"] for s in per_subject if s["identity"] is not None]
    return {
        "psnr": psnr, "ssim": ssim,
        "subject_mse": float(error[subjects_mask].mean()) if subjects_mask.any() else None,
        "background_mse": float(error[~subjects_mask].mean()) if (~subjects_mask).any() else None,
        "identity": float(np.mean(identities)) if identities else None,
        "position_error": float(np.mean([s["position_error"] for s in per_subject])),
        "motion_accuracy": float(np.mean([s["motion_correct"] for s in per_subject])),
        "relation_accuracy": relation_correct(video, scene),
        "subjects": per_subject,
    }


# -- runs -------------------------------------------------------------------------------------


def summarise(results: dict[str, dict]) -> dict:
    """Means of each metric over samples (relation accuracy over the samples that have a relation)."""
    summary: dict = {"samples": len(results)}
    for name in METRICS:
        values = [float(r[name]) for r in results.values() if r.get(name) is not None]
        summary[name] = float(np.mean(values)) if values else None
    summary["relation_samples"] = sum(r.get("relation_accuracy") is not None for r in results.values())
    return summary


def _score_one(videos: str | Path | None, job: tuple[str, dict]) -> tuple[str, dict | None]:
    """Scores of one sample (None: its video is missing)."""
    sample_id, item = job
    record = item["record"]
    if videos is None:
        video = S.render_record(record)
    else:
        path = Path(videos) / f"{sample_id}.mp4"
        if not path.exists():
            return sample_id, None
        video = load_video(path, record["num_frames"], record["height"], record["width"])
    return sample_id, evaluate_sample(video, record, item["references"])


def _single_threaded() -> None:
    torch.set_num_threads(1)


def _map_samples(score, truth: dict[str, dict], limit: int | None, workers: int, desc: str = "eval") -> list:
    """``score((sample_id, item))`` for the first ``limit`` samples, in ``workers`` single-threaded
    processes (same numbers as one), with progress on stderr (:func:`bindweave.progress.progress`)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    jobs = list(truth.items())[:limit]
    if workers == 1:
        return list(progress(map(score, jobs), len(jobs), desc, "sample"))
    with multiprocessing.get_context("fork").Pool(workers, initializer=_single_threaded) as pool:
        return list(progress(pool.imap(score, jobs, chunksize=4), len(jobs), desc, "sample"))


def evaluate_run(videos: str | Path | None, truth: dict[str, dict], limit: int | None = None, workers: int = 1) -> dict:
    """Score the videos ``<videos>/<id>.mp4`` of a run against the ground truth (``videos`` None:
    the ground truth itself, the perfect score). Missing videos are listed, not scored. ``workers``
    processes score in parallel (same numbers)."""
    scored = _map_samples(partial(_score_one, videos), truth, limit, workers,
                          f"eval {Path(videos).name if videos is not None else 'ground truth'}")
    results = {sample_id: r for sample_id, r in scored if r is not None}
    missing = [sample_id for sample_id, r in scored if r is None]
    if not results:
        raise ValueError(f"No video of the {len(truth)} ground-truth samples found in {videos} (expected <id>.mp4, "
                         f"e.g. {next(iter(truth))}.mp4).")
    return {"videos": str(videos) if videos is not None else "ground truth", "summary": summarise(results),
            "missing": missing, "samples": results}


REFERENCE_POINTS = (
    "background only",
    "other subjects, right places",
    "right colours, other shapes",
    "right subjects, another start row",
    "right subjects, no motion",
)
"""The ground truth with one thing wrong (:func:`reference_point_videos`): where a run's numbers sit
between them says what it gets right (docs/sprites.md, "Reading the metrics")."""


def reference_point_videos(record: dict, rng: random.Random) -> dict[str, np.ndarray]:
    """The sample's ground truth re-rendered with one thing wrong, one video per :data:`REFERENCE_POINTS`
    name: no subjects at all; other appearances (train split) where the subjects are; the subjects'
    colours in another shape and pattern; each subject starting in another row; no motion."""
    scene = S.scene_from_json(record)
    changed = {name: copy.deepcopy(scene) for name in REFERENCE_POINTS}
    changed["background only"].subjects = []
    for subject in changed["other subjects, right places"].subjects:
        subject.appearance = S.random_appearance(rng, "train")
    for subject in changed["right colours, other shapes"].subjects:
        other = S.random_appearance(rng, "train")
        subject.appearance = S.Appearance(other.shape, other.pattern, subject.appearance.colour, subject.appearance.colour2)
    for subject in changed["right subjects, another start row"].subjects:
        subject.row = rng.choice([row for row in S.ROWS if row != subject.row])
    for subject in changed["right subjects, no motion"].subjects:
        subject.motion, subject.relation = "still", None
    return {name: S.render(changed[name]) for name in REFERENCE_POINTS}


def _score_reference_points(job: tuple[str, dict]) -> tuple[str, dict[str, dict]]:
    sample_id, item = job
    rng = random.Random(f"reference points:{sample_id}")  # the same videos whatever the order or workers
    videos = reference_point_videos(item["record"], rng)
    return sample_id, {name: evaluate_sample(video, item["record"], item["references"]) for name, video in videos.items()}


def evaluate_reference_points(truth: dict[str, dict], limit: int | None = None, workers: int = 1) -> dict[str, dict]:
    """Score every :data:`REFERENCE_POINTS` video of each sample: one run result per reference point,
    named ``"ref: <name>"``, in :func:`evaluate_run`'s form."""
    scored = _map_samples(_score_reference_points, truth, limit, workers)
    runs = {}
    for name in REFERENCE_POINTS:
        results = {sample_id: per_point[name] for sample_id, per_point in scored}
        runs[f"ref: {name}"] = {"videos": f"reference point: {name}", "summary": summarise(results), "missing": [],
                                "samples": results}
    return runs


def format_table(runs: dict[str, dict]) -> str:
    """A Markdown table: one row per run, one column per summary metric."""
    names = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "subject_mse": "subject MSE ↓", "background_mse": "background MSE ↓",
             "identity": "identity ↑", "position_error": "position err ↓", "motion_accuracy": "motion acc ↑",
             "relation_accuracy": "relation acc ↑"}
    lines = ["| run | samples | " + " | ".join(names[m] for m in METRICS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in METRICS) + " |"]
    for run, result in runs.items():
        s = result["summary"]
        cells = ["–" if s[m] is None else f"{s[m]:.2f}" if m == "psnr" else f"{s[m]:.3f}" for m in METRICS]
        missing = f" (+{len(result['missing'])} missing)" if result["missing"] else ""
        lines.append(f"| {run} | {s['samples']}{missing} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference(run: dict, baseline: dict, metric: str) -> dict | None:
    """``run`` minus ``baseline`` on ``metric`` over the samples both scored: the mean difference, its
    standard error (scene to scene; not training-seed noise), and the mean difference relative to the
    baseline's mean. Pairing removes the scenes' own difficulty, which dominates either run's spread.
    None where no sample has the metric in both."""
    pairs = [(r[metric], baseline["samples"][k][metric]) for k, r in run["samples"].items()
             if r.get(metric) is not None and baseline["samples"].get(k, {}).get(metric) is not None]
    if not pairs:
        return None
    ours, theirs = np.array(pairs, dtype=np.float64).T
    diff = ours - theirs
    error = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    relative = float(diff.mean() / theirs.mean()) if theirs.mean() != 0 else float("nan")
    return {"mean": float(diff.mean()), "stderr": error, "relative": relative, "samples": len(diff)}


COMPARED = ("subject_mse", "background_mse", "identity", "position_error")
"""The metrics :func:`format_comparison` pairs against a baseline run."""


def format_comparison(runs: dict[str, dict], baseline: str) -> str:
    """A Markdown table of each run against ``baseline`` on :data:`COMPARED`: mean paired difference ±
    standard error, and relative to the baseline's mean (subject MSE -60 % is issue #8's target)."""
    if baseline not in runs:
        raise ValueError(f"--baseline {baseline}: no run of that name (runs: {', '.join(runs)}).")
    names = {"subject_mse": "subject MSE", "background_mse": "background MSE", "identity": "identity",
             "position_error": "position err"}
    lines = [f"| run − {baseline} | " + " | ".join(f"Δ {names[m]}" for m in COMPARED) + " |",
             "| --- | " + " | ".join("---:" for _ in COMPARED) + " |"]
    for run, result in runs.items():
        if run == baseline:
            continue
        cells = []
        for metric in COMPARED:
            d = paired_difference(result, runs[baseline], metric)
            relative = "" if d is None or math.isnan(d["relative"]) else f" ({d['relative']:+.0%})"
            cells.append("–" if d is None else f"{d['mean']:+.3f} ± {d['stderr']:.3f}{relative}")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_by_subjects(runs: dict[str, dict]) -> str:
    """A Markdown table of subject MSE / identity per number of subjects in the scene (1-4 references):
    does a run hold up as the scenes get more subjects to bind?"""
    counts = sorted({len(r["subjects"]) for run in runs.values() for r in run["samples"].values()})
    lines = ["| run | " + " | ".join(f"{n} subject{'s' if n > 1 else ''}: subject MSE / identity (samples)"
                                      for n in counts) + " |",
             "| --- | " + " | ".join("---:" for _ in counts) + " |"]
    for name, run in runs.items():
        cells = []
        for n in counts:
            group = [r for r in run["samples"].values() if len(r["subjects"]) == n]
            mse = [r["subject_mse"] for r in group if r.get("subject_mse") is not None]
            identity = [r["identity"] for r in group if r.get("identity") is not None]
            cells.append(f"{np.mean(mse):.3f} / {np.mean(identity):.3f} ({len(group)})" if mse and identity
                         else f"– ({len(group)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_video(path: str | Path, video: np.ndarray, fps: int = 8) -> None:
    """Write frames as a lossless mp4 (tests and ``--write_ground_truth``)."""
    write_atomic(path, S.encode_video(video, fps))


def contact_sheet(video: np.ndarray, frames: int = 5) -> Image.Image:
    """Evenly spaced frames side by side (for looking at a sample)."""
    picks = np.linspace(0, len(video) - 1, frames).round().astype(int)
    return Image.fromarray(np.concatenate(list(video[picks]), axis=1))


def to_json(runs: dict[str, dict]) -> str:
    return json.dumps(runs, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
