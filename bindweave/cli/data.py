"""``bindweave data pack|inspect|cache|sprites``: build, look at and feature-cache training shards.

```bash
bindweave data pack --input clips.jsonl --output data/train --num_frames 81 --fps 16
bindweave data inspect 'data/train/shard-*.tar' --check
bindweave data cache -c configs/my-model.yaml --urls 'data/train/shard-*.tar' --output data/train-cached
```

``pack`` reads a JSONL manifest (one ``{"video", "references", "prompt", ...}`` object per line,
paths relative to the manifest) or a folder laid out like an unpacked shard (``<key>.mp4``,
``<key>.ref0.png``, ``<key>.json`` or ``<key>.txt``), validates every item (the video decodes and
holds a clip, the images open, 1–4 references, a prompt) and writes shards atomically, with a
summary of what was written and what was rejected and why. If every item is rejected nothing is
written (no shard, no summary file) and the command exits with status 1. See docs/data.md.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, Literal

import webdataset as wds
from jsonargparse import ActionYesNo, ArgumentParser
from PIL import Image
from tqdm import tqdm

from bindweave.model.batch import to_rgb
from bindweave.errors import UserError, report
from bindweave.progress import progress
from bindweave.data.shards import (
    FEATURES, IMAGE_EXTENSIONS, MAX_REFERENCES, REASONS, VIDEO_EXTENSIONS, BrokenSample, ShardWriter, expand_urls,
    parse_record, parse_sample, read_image, sample_key,
)
from bindweave.data.video_decode import VideoDecodeError, long_enough, probe, scan

# -- pack -------------------------------------------------------------------------------------


def read_manifest(path: Path) -> Iterator[dict]:
    """Items of a JSONL manifest: ``video``, ``references`` (list), optional ``masks`` (list, None
    entries allowed), ``prompt`` and any other fields (kept in the record). Paths are relative to
    the manifest's folder. A line that does not parse becomes an item that is rejected."""
    base = path.parent
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"--input {path}: not a text file; give a JSONL manifest (one JSON object per line) "
                        f"or a folder of <key>.<ext> files.") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("not an object")
        except ValueError as error:
            yield {"id": f"line{number}", "_error": ("bad_json", f"line {number} of {path}: {error}")}
            continue
        item.setdefault("id", item.get("source_id") or Path(str(item.get("video", f"line{number}"))).stem)
        if isinstance(item.get("video"), str):
            item["video"] = str(base / item["video"])
        for key in ("references", "masks"):
            if isinstance(item.get(key), list):
                item[key] = [str(base / p) if isinstance(p, str) else p for p in item[key]]
        yield item


def read_folder(folder: Path) -> Iterator[dict]:
    """Items of a folder laid out like an unpacked shard: files ``<key>.<ext>`` grouped by key."""
    groups: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in sorted(folder.iterdir()):
        if path.is_file() and "." in path.name and not path.name.startswith("."):
            key, ext = path.name.split(".", 1)
            groups[key][ext.lower()] = path
    for key, files in groups.items():
        item: dict = {"id": key}
        if "json" in files:
            try:
                item.update(json.loads(files["json"].read_text()))
                item["id"] = key
            except (ValueError, UnicodeDecodeError) as error:
                item["_error"] = ("bad_json", f"{files['json']}: {error}")
        elif "txt" in files:
            item["prompt"] = files["txt"].read_text().strip()
        video = next((files[e] for e in VIDEO_EXTENSIONS if e in files), None)
        item["video"] = str(video) if video else None
        refs = sorted((int(e[3:].split(".")[0]), p) for e, p in files.items()
                      if e.startswith("ref") and e[3:].split(".")[0].isdigit() and e.split(".")[-1] in IMAGE_EXTENSIONS)
        item["references"] = [str(p) for _, p in refs]
        masks = {int(e[4:].split(".")[0]): p for e, p in files.items() if e.startswith("mask") and e[4:].split(".")[0].isdigit()}
        item["masks"] = [str(masks[i]) if i in masks else None for i in range(len(refs))]
        yield item


def _read(path: str | None, what: str) -> bytes:
    if not path:
        raise BrokenSample("missing_file", f"no {what} given")
    if not isinstance(path, str):
        raise BrokenSample("bad_json", f"the {what} must be a path (a string), got {path!r}")
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise BrokenSample("missing_file", f"{what} {path}: {error.strerror}") from error


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_item(item: dict, num_frames: int, fps: float | None, max_references: int = MAX_REFERENCES) -> tuple[str, dict]:
    """Validate one item and build its shard files; raises :class:`BrokenSample`.

    Returns the sample key and its files (extension -> bytes), the JSON record included."""
    if "_error" in item:
        raise BrokenSample(*item["_error"])
    meta = {k: v for k, v in item.items() if k not in ("video", "references", "masks")}
    record = parse_record(meta)
    references, masks = item.get("references") or [], item.get("masks") or []
    if not isinstance(references, list) or not 1 <= len(references) <= max_references:
        count = len(references) if isinstance(references, list) else "no list of"
        raise BrokenSample("reference_count", f"{count} references; 1 to {max_references} needed")
    subjects = record.get("subjects")
    if subjects is not None and (not isinstance(subjects, list) or len(subjects) != len(references)):
        raise BrokenSample("bad_json", f"'subjects' must list one name per reference ({len(references)}), got {subjects!r}")

    video_path = item.get("video")
    video = _read(video_path, "video")
    extension = Path(video_path).suffix.lower().lstrip(".")
    if extension not in VIDEO_EXTENSIONS:
        raise BrokenSample("corrupt_video", f"{video_path}: the video must be one of {VIDEO_EXTENSIONS}")
    try:
        info = scan(video)
    except VideoDecodeError as error:
        raise BrokenSample(error.reason, f"{video_path}: {error}") from error
    if not long_enough(info, num_frames, fps):
        need = f"{(num_frames - 1) / fps:.2f} s" if fps else f"{num_frames} frames"
        raise BrokenSample("short_video", f"{video_path}: {info.duration:.2f} s, {info.num_frames} frames; a clip needs {need}")

    files = {extension: video}
    for i, path in enumerate(references):
        data = _read(path, f"reference {i}")
        image = read_image(data, f"reference {i} ({path})")
        try:
            to_rgb(image)
        except ValueError as error:
            raise BrokenSample("bad_image", f"reference {i} ({path}): {error}") from error
        ext = Path(path).suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTENSIONS:
            ext, data = "png", _png(to_rgb(image))
        files[f"ref{i}.{ext}"] = data
        mask_path = masks[i] if i < len(masks) else None
        if mask_path:
            mask = read_image(_read(mask_path, f"mask {i}"), f"mask {i} ({mask_path})")
            if mask.size != image.size:
                raise BrokenSample("bad_image", f"mask {i} is {mask.size}, its reference {image.size}")
            files[f"mask{i}.png"] = _png(mask.convert("L"))

    record.update(
        id=str(item["id"]), source_id=str(item.get("source_id") or video_path), num_references=len(references),
        fps=info.fps, num_frames=info.num_frames, duration=round(info.duration, 4), width=info.width,
        height=info.height, codec=info.codec,
    )
    files["json"] = json.dumps(record, ensure_ascii=False).encode()
    return sample_key(item["id"]), files


def _check_item_safe(args: tuple) -> tuple[str, dict | None, dict | None]:
    item, num_frames, fps, max_references = args
    try:
        key, files = check_item(item, num_frames, fps, max_references)
        return key, files, None
    except BrokenSample as broken:
        broken.key = str(item.get("id"))
        return str(item.get("id")), None, broken.report()


class NothingPacked(UserError):
    """:func:`pack` rejected every item, so it wrote nothing; ``summary`` says why (its ``rejected``)."""

    def __init__(self, message: str, summary: dict) -> None:
        super().__init__(message)
        self.summary = summary


def pack(
    input: str, output: str, prefix: str = "shard", samples_per_shard: int = 1000, max_shard_bytes: int = 2**30,
    num_frames: int = 81, fps: float | None = 16.0, max_references: int = MAX_REFERENCES, workers: int = 1,
    overwrite: bool = False, progress: bool = True,
) -> dict:
    """Validate items and write them into shards; returns the summary (also saved as
    ``<output>/<prefix>.pack.json``). See :func:`main` for the arguments.

    Raises :class:`NothingPacked` if every item is rejected: then nothing is written (no shard, no
    summary file, an existing shard set is left as it was) and the exception carries the summary.
    A missing input, an input without items or an output that is a file is a
    :class:`~bindweave.errors.UserError`."""
    source = Path(input)
    if not source.exists():
        raise UserError(f"--input {input}: no such file or folder; give a JSONL manifest or a folder of "
                        f"<key>.<ext> files.")
    if Path(output).exists() and not Path(output).is_dir():
        raise UserError(f"--output {output}: a file, not a folder; give the folder the shards go into.")
    items = list(read_manifest(source) if source.is_file() else read_folder(source))
    if not items:
        what = "no JSON lines" if source.is_file() else "no <key>.<ext> files"
        raise UserError(f"--input {input}: {what}, so nothing to pack; give a JSONL manifest or a folder of "
                        f"<key>.<ext> files.")
    writer = ShardWriter(output, prefix=prefix, max_samples=samples_per_shard, max_bytes=max_shard_bytes, overwrite=overwrite)
    rejected, seen = [], set()
    jobs = [(item, num_frames, fps, max_references) for item in items]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    results = pool.map(_check_item_safe, jobs, chunksize=4) if pool is not None else map(_check_item_safe, jobs)
    try:
        for key, files, error in tqdm(results, total=len(items), desc="pack", unit="item", disable=not progress, file=sys.stderr):
            if error is None and key in seen:
                error = BrokenSample("duplicate_key", f"key {key!r} is already used by another item", key=key).report()
            if error is not None:
                rejected.append(error)
                continue
            seen.add(key)
            writer.write(key, files)
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if not seen:  # nothing to write: keep an existing shard set and its summary as they are
        writer.abort()
        summary = _summary(output, [], rejected)
        counts = ", ".join(f"{reason} {count}" for reason, count in sorted(summary["rejected_by_reason"].items()))
        raise NothingPacked(
            f"--input {input}: all {len(items)} item(s) rejected ({counts}; each is listed above), so nothing "
            f"was written to {output}; fix the items, or the clip length (--num_frames, --fps) they must hold, "
            f"and pack again.",
            summary,
        )
    summary = _summary(output, writer.close(), rejected)
    Path(output, f"{prefix}.pack.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(output: str, shards: list, rejected: list[dict]) -> dict:
    return {
        "output": str(output), "samples": sum(s.samples for s in shards), "bytes": sum(s.bytes for s in shards),
        "shards": [{"path": s.path, "samples": s.samples, "bytes": s.bytes} for s in shards],
        "rejected": rejected, "rejected_by_reason": dict(Counter(r["reason"] for r in rejected)),
    }


def format_pack_summary(summary: dict, max_listed: int = 20, summary_file: str | None = None) -> str:
    """What was written; the rejections counted by reason, then each rejected item (the first
    ``max_listed``; ``summary_file``, if given, is named as holding them all) with why."""
    if summary["samples"]:
        lines = [f"Wrote {summary['samples']} samples to {len(summary['shards'])} shard(s) in {summary['output']} "
                 f"({summary['bytes'] / 1e6:.1f} MB)."]
    else:
        lines = [f"Wrote nothing to {summary['output']}: every item was rejected."]
    rejected = summary["rejected"]
    if rejected:
        lines.append(f"Rejected {len(rejected)}:")
        for reason, count in sorted(summary["rejected_by_reason"].items()):
            lines.append(f"  {reason}: {count} ({REASONS[reason]})")
        lines += [f"  - {r['key']}: {r['reason']}: {r['message']}" for r in rejected[:max_listed]]
        if len(rejected) > max_listed:
            where = f" (all in {summary_file})" if summary_file and summary["samples"] else ""
            lines.append(f"  ... and {len(rejected) - max_listed} more{where}")
    return "\n".join(lines)


# -- inspect ----------------------------------------------------------------------------------


def inspect(urls: list[str], check: bool = False, limit: int | None = None, max_references: int = MAX_REFERENCES,
            show_progress: bool = False) -> dict:
    """Counts, durations, resolutions, frame rates and reference counts of a shard set (raw or
    cached). ``check`` decodes every video fully; otherwise the record (or container) metadata is used.
    ``show_progress`` counts the samples read on stderr (:func:`bindweave.progress.progress`)."""
    shards = expand_urls(urls)
    stats = {"shards": len(shards), "samples": 0, "raw": 0, "cached": 0}
    durations, sizes, rates, refs, masks, features, broken = [], Counter(), Counter(), Counter(), 0, Counter(), []

    def on_error(error: Exception) -> bool:
        broken.append(BrokenSample("unreadable_shard", str(error.args[0] if error.args else error),
                                   shard=next((a for a in error.args[1:] if isinstance(a, str)), None)).report())
        return True

    samples = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=on_error))
    for sample in progress(samples, limit, "inspect --check" if check else "inspect", "sample", enabled=show_progress):
        if limit is not None and stats["samples"] + len(broken) >= limit:
            break
        cached = FEATURES in sample
        try:
            raw = parse_sample(sample, max_references, cached=cached)
            record = raw.record
            if cached:
                from bindweave.data.feature_cache import read_features

                latents, named = read_features(raw.features)
                features[f"video_latents {tuple(latents.shape)}"] += 1
                for conditioner, tensors in named.items():
                    for name, tensor in tensors.items():
                        features[f"{conditioner}.{name} {tensor.dtype}".replace("torch.", "")] += 1
                sizes[f"{record.get('width')}x{record.get('height')}"] += 1
                refs[int(record["num_references"])] += 1
            else:
                if check:
                    info = scan(raw.video)
                elif all(k in record for k in ("width", "height", "fps", "duration")):
                    info = None
                else:
                    info = probe(raw.video)
                width, height = (info.width, info.height) if info else (record["width"], record["height"])
                fps, duration = (info.fps, info.duration) if info else (record["fps"], record["duration"])
                durations.append(float(duration))
                sizes[f"{width}x{height}"] += 1
                rates[round(float(fps), 2)] += 1
                refs[len(raw.references)] += 1
                masks += sum(m is not None for m in raw.masks)
                if check:
                    for i, data in enumerate(raw.references):
                        read_image(data, f"reference {i}")
        except VideoDecodeError as error:
            broken.append(BrokenSample(error.reason, str(error), key=sample.get("__key__"), shard=sample.get("__url__")).report())
            continue
        except BrokenSample as error:
            error.key, error.shard = sample.get("__key__"), sample.get("__url__")
            broken.append(error.report())
            continue
        stats["samples"] += 1
        stats["cached" if cached else "raw"] += 1
    if durations:
        stats["duration_s"] = {"total": round(sum(durations), 2), "min": round(min(durations), 3),
                               "mean": round(statistics.fmean(durations), 3), "max": round(max(durations), 3)}
    stats.update(
        resolutions=dict(sizes.most_common()), fps=dict(sorted(rates.items())), references=dict(sorted(refs.items())),
        masks=masks, broken=len(broken), broken_by_reason=dict(Counter(b["reason"] for b in broken)), broken_samples=broken,
    )
    if features:
        stats["features"] = dict(features)
    return stats


def format_inspect(stats: dict) -> str:
    lines = [f"{stats['shards']} shard(s), {stats['samples']} valid sample(s) ({stats['raw']} raw, {stats['cached']} cached), "
             f"{stats['broken']} broken."]
    if "duration_s" in stats:
        d = stats["duration_s"]
        lines.append(f"duration: {d['total'] / 3600:.3f} h total; per clip min {d['min']} s, mean {d['mean']} s, max {d['max']} s")
    lines.append("resolutions (WxH): " + ", ".join(f"{k} ×{v}" for k, v in list(stats["resolutions"].items())[:10]))
    if stats["fps"]:
        lines.append("fps: " + ", ".join(f"{k:g} ×{v}" for k, v in stats["fps"].items()))
    lines.append("references per sample: " + ", ".join(f"{k} ×{v}" for k, v in stats["references"].items())
                 + f"; {stats['masks']} subject mask(s)")
    for name, count in stats.get("features", {}).items():
        lines.append(f"feature {name}: {count}")
    for reason, count in stats["broken_by_reason"].items():
        example = next(b for b in stats["broken_samples"] if b["reason"] == reason)
        lines.append(f"broken: {reason}: {count}, e.g. {example['shard']}:{example['key']}: {example['message']}")
    return "\n".join(lines)


# -- cache ------------------------------------------------------------------------------------


def cache(config: list[str], urls: list[str], output: str, device: str = "cpu", overwrite: bool = False,
          part: str = "0/1", progress: bool = True, dtype: str = "float32"):
    """Run the frozen encoders of the model in ``config`` over raw shards; see bindweave.data.feature_cache."""
    import lightning as L

    from bindweave.cli.app import BindWeaveCLI
    from bindweave.data.datamodule import WebDataModule
    from bindweave.data.samples import SampleDecoder
    from bindweave.data.feature_cache import cache_shards
    from bindweave.training.module import BindWeave

    try:
        index, count = (int(x) for x in part.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise ValueError(f"--part must be i/n with 0 <= i < n, got {part!r}.") from None
    args = [arg for path in config for arg in ("-c", path)] + ["--trainer.logger", "false", "--trainer.callbacks", "[]"]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI gets its arguments from `args` only
    try:
        cli = BindWeaveCLI(BindWeave, L.LightningDataModule, subclass_mode_data=True, run=False,
                           save_config_callback=None, args=args)
    finally:
        sys.argv = argv
    data = cli.datamodule
    if not isinstance(data, WebDataModule):
        raise ValueError(
            f"The config's data is a {type(data).__name__}; `cache` takes the clip settings (num_frames, fps, buckets) from "
            f"a bindweave.data.datamodule.WebDataModule: layer a data config such as configs/data/webdataset.yaml."
        )
    model = cli.model
    model.feature_cache = None  # the encoders are what we run
    model.build_encoders()
    d = data.eval_decoder
    decoder = SampleDecoder(d.num_frames, d.fps, d.buckets, random_crop=False, max_references=d.max_references,
                            augmentation=None, use_masks=d.use_masks, threads=d.threads)
    model_config = cli.config.as_dict().get("model", {})
    encoders = ("vae", "relational", "identity", "multi_reference", "extra_conditioners")  # what makes the features
    config_record = json.loads(json.dumps({k: model_config.get(k) for k in encoders}, default=str))
    bar = (lambda shards: tqdm(shards, desc="cache", unit="shard", file=sys.stderr)) if progress else None
    return cache_shards(model, urls, output, decoder, overwrite=overwrite, device=device, part=(index, count),
                        config=config_record, progress=bar, dtype=dtype)


# -- entry point ------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="bindweave data", description="Build, inspect and feature-cache training shards.")
    commands = parser.add_subcommands(dest="command")

    p = ArgumentParser(description="Validate clips and write them into webdataset shards (never over existing ones).")
    p.add_argument("--input", type=str, required=True, help="a JSONL manifest or a folder of <key>.<ext> files")
    p.add_argument("--output", type=str, required=True, help="folder of the shards")
    p.add_argument("--prefix", type=str, default="shard", help="shard names: <prefix>-000000.tar, ...")
    p.add_argument("--samples_per_shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--max_shard_bytes", type=int, default=2**30, help="bytes after which a shard is closed")
    p.add_argument("--num_frames", type=int, default=81, help="a video must hold a clip of this many frames ...")
    p.add_argument("--fps", type=float | None, default=16.0, help="... at this frame rate (null: source frames)")
    p.add_argument("--max_references", type=int, default=MAX_REFERENCES, help="most references per sample")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes validating items")
    p.add_argument("--overwrite", action=ActionYesNo, default=False, help="replace an existing shard set")
    p.add_argument("--progress", action=ActionYesNo, default=True, help="show a progress bar")
    commands.add_subcommand("pack", p, help="build shards from a folder or a JSONL manifest")

    i = ArgumentParser(description="Print counts, durations, resolutions and reference counts of a shard set.")
    i.add_argument("urls", type=str, nargs="+", help="shards: brace ranges, globs or paths")
    i.add_argument("--check", action=ActionYesNo, default=False, help="decode every video and image")
    i.add_argument("--limit", type=int | None, default=None, help="stop after this many samples")
    i.add_argument("--json", action=ActionYesNo, default=False, help="print JSON")
    commands.add_subcommand("inspect", i, help="summarise a shard set")

    c = ArgumentParser(description="Run a model config's frozen encoders once over raw shards and write cached shards.")
    c.add_argument("-c", "--config", type=str, action="append", required=True,
                   help="the fit config(s) (layered in order), with a WebDataModule data section")
    c.add_argument("--urls", type=str, nargs="+", required=True, help="raw shards")
    c.add_argument("--output", type=str, required=True, help="cache folder (shards keep their names)")
    c.add_argument("--device", type=str, default="cpu", help="where the encoders run (cuda, cuda:1, cpu)")
    c.add_argument("--overwrite", action=ActionYesNo, default=False, help="re-encode shards that exist (else skipped)")
    c.add_argument("--part", type=str, default="0/1", help="i/n: take shards i, i+n, ... (n processes in parallel)")
    c.add_argument("--progress", action=ActionYesNo, default=True, help="show a progress bar")
    c.add_argument("--dtype", type=Literal["float32", "bfloat16"], default="float32",
                   help="storage of floating-point features (bfloat16: half the bytes; read back as float32)")
    commands.add_subcommand("cache", c, help="write cached encoder features of shards")

    from bindweave.tasks.sprites.generate_cli import sprites_parser  # procedural demo data (docs/sprites.md)

    commands.add_subcommand("sprites", sprites_parser(), help="generate procedural sprite samples (docs/sprites.md)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``bindweave data pack|inspect|cache|sprites``; a user error (bad path, existing shards, every
    item rejected) prints one line ``bindweave data <command>: error: ...`` and exits with status 1."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except UserError as error:
        raise report(f"data {args.command}", error) from None
    except (ValueError, FileExistsError) as error:
        if args.command == "pack":
            raise  # pack raises UserError for the user's mistakes: anything else is a bug
        # inspect, cache and sprites (feature_cache, sprites, the config's datamodule) still raise these for them
        raise report(f"data {args.command}", error) from None


def run(args) -> None:
    """Run the parsed subcommand."""
    sub = args[args.command]
    if args.command == "pack":
        summary_file = str(Path(sub.output, f"{sub.prefix}.pack.json"))
        try:
            summary = pack(sub.input, sub.output, sub.prefix, sub.samples_per_shard, sub.max_shard_bytes,
                           sub.num_frames, sub.fps, sub.max_references, sub.workers, sub.overwrite, sub.progress)
        except NothingPacked as nothing:
            print(format_pack_summary(nothing.summary))
            raise
        print(format_pack_summary(summary, summary_file=summary_file))
    elif args.command == "sprites":
        from bindweave.tasks.sprites.generate_cli import run_sprites

        run_sprites(sub)
    elif args.command == "inspect":
        stats = inspect(sub.urls, check=sub.check, limit=sub.limit, show_progress=sub.check)
        print(json.dumps(stats, indent=2) if sub.json else format_inspect(stats))
    else:
        summary = cache(sub.config, sub.urls, sub.output, sub.device, sub.overwrite, sub.part, sub.progress, sub.dtype)
        print(f"Cached {summary.samples} samples into {summary.shards_written} shard(s) in {sub.output} "
              f"({summary.shards_skipped} already there) in {summary.seconds:.1f} s; rejected {len(summary.rejected)}.")
        for rejected in summary.rejected[:10]:
            print(f"  {rejected['shard']}:{rejected['key']}: {rejected['reason']}: {rejected['message']}")


if __name__ == "__main__":
    main()
