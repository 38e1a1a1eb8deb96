"""The shard format: webdataset tar files, one sample per key (see docs/data.md).

A raw sample ``<key>`` is the files ``<key>.mp4`` (the video), ``<key>.ref0.png`` ...
``<key>.ref3.jpg`` (1–4 reference images, in subject order), optional ``<key>.mask<i>.png``
(subject masks of the references) and ``<key>.json`` (the record: ``prompt`` plus optional
``subjects``, ``fps``, ``source_id``, ... ). A cached sample (``bindweave data cache``) has
``<key>.json`` and ``<key>.safetensors`` (the frozen encoders' outputs) instead.

Everything a loader can trip on is a :class:`BrokenSample` with one of the ``REASONS``, so broken
samples are skipped and counted instead of crashing a run. Shards are written atomically (a
temporary file renamed into place) and never over existing ones unless asked to.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from bindweave.atomic import AtomicPath
from bindweave.errors import UserError

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
FEATURES = "safetensors"
MAX_REFERENCES = 4
"""Most references a sample may have (BindWeave: 1–4)."""

REASONS = {
    "corrupt_video": "the video cannot be opened or decoded",
    "short_video": "the video is shorter than one clip at the requested fps",
    "bad_image": "a reference image or mask cannot be read",
    "bad_json": "the JSON record is not a JSON object with a text prompt",
    "missing_key": "the JSON record lacks a required key",
    "missing_file": "the sample has no video, no JSON record or no features",
    "reference_count": "the sample has no reference, too many, or gaps in their numbering",
    "bad_features": "the cached features cannot be read or do not match the model",
    "unreadable_shard": "a shard, or its end, is not a readable tar file",
    "duplicate_key": "two samples have the same key",
}
"""Why a sample is skipped (loader, ``pack``, ``cache``); the keys are the metric names."""

_REF = re.compile(r"^ref(\d+)\.(" + "|".join(IMAGE_EXTENSIONS) + r")$")
_MASK = re.compile(r"^mask(\d+)\.png$")


class BrokenSample(Exception):
    """A sample that cannot be used, and why (``reason`` is a key of ``REASONS``)."""

    def __init__(self, reason: str, message: str, key: str | None = None, shard: str | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason, self.message, self.key, self.shard = reason, message, key, shard

    def report(self) -> dict[str, str | None]:
        """A JSON-able record: reason, message, shard and key."""
        return {"reason": self.reason, "message": self.message, "shard": self.shard, "key": self.key}

    def __str__(self) -> str:
        where = f"{self.shard}:{self.key}" if self.shard else str(self.key)
        return f"{where}: {self.reason}: {self.message}"


def sample_key(text: str) -> str:
    """A webdataset key from an id: letters, digits, ``_`` and ``-`` only (a dot would split it)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "sample"


@dataclass
class RawSample:
    """The files of one sample, parsed but not decoded."""

    key: str
    shard: str
    record: dict
    video: bytes | None = None
    video_extension: str = "mp4"
    references: list[bytes] = field(default_factory=list)
    reference_extensions: list[str] = field(default_factory=list)
    masks: list[bytes | None] = field(default_factory=list)
    features: bytes | None = None

    def files(self) -> dict[str, bytes]:
        """The sample's files by extension (what a TarWriter takes), record included."""
        out = {"json": json.dumps(self.record, ensure_ascii=False).encode()}
        if self.video is not None:
            out[self.video_extension] = self.video
        for i, (data, ext) in enumerate(zip(self.references, self.reference_extensions)):
            out[f"ref{i}.{ext}"] = data
        for i, mask in enumerate(self.masks):
            if mask is not None:
                out[f"mask{i}.png"] = mask
        if self.features is not None:
            out[FEATURES] = self.features
        return out


def parse_record(data: bytes | str | dict) -> dict:
    """Decode and check a JSON record (a dict with a non-empty string ``prompt``)."""
    if not isinstance(data, dict):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BrokenSample("bad_json", f"the JSON record does not parse: {error}") from error
    if not isinstance(data, dict):
        raise BrokenSample("bad_json", f"the JSON record is a {type(data).__name__}, not an object")
    if "prompt" not in data:
        raise BrokenSample("missing_key", f"the JSON record has no 'prompt' (keys: {sorted(data)})")
    if not isinstance(data["prompt"], str) or not data["prompt"].strip():
        raise BrokenSample("bad_json", "the 'prompt' of the JSON record is not a non-empty string")
    return data


def parse_sample(sample: dict, max_references: int = MAX_REFERENCES, cached: bool = False) -> RawSample:
    """Parse a webdataset sample (``__key__``, ``__url__``, extension -> bytes) of a raw or cached shard.

    Raises :class:`BrokenSample` (with the key and shard filled in) if a file is missing, the
    record is invalid or the number of references is not within 1..``max_references``.
    """
    key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
    try:
        if "json" not in sample:
            raise BrokenSample("missing_file", f"no {key}.json record (files: {_extensions(sample)})")
        raw = RawSample(key=key, shard=shard, record=parse_record(sample["json"]))
        if cached:
            if FEATURES not in sample:
                raise BrokenSample("missing_file", f"no {key}.{FEATURES} (not a cached shard? files: {_extensions(sample)})")
            raw.features = sample[FEATURES]
            raw.record.setdefault("num_references", 0)
            if not 1 <= int(raw.record["num_references"]) <= max_references:
                raise BrokenSample("reference_count", f"{raw.record['num_references']} references; 1 to {max_references} needed")
            return raw
        videos = [ext for ext in VIDEO_EXTENSIONS if ext in sample]
        if not videos:
            raise BrokenSample("missing_file", f"no video ({'/'.join(VIDEO_EXTENSIONS)}) in files {_extensions(sample)}")
        raw.video_extension = videos[0]
        raw.video = sample[videos[0]]
        refs = sorted((int(m.group(1)), m.group(2)) for name in sample if (m := _REF.match(name)))
        if not 1 <= len(refs) <= max_references:
            raise BrokenSample("reference_count", f"{len(refs)} references; 1 to {max_references} needed")
        if [i for i, _ in refs] != list(range(len(refs))):
            raise BrokenSample("reference_count", f"references must be ref0..ref{len(refs) - 1}, got {[i for i, _ in refs]}")
        raw.references = [sample[f"ref{i}.{ext}"] for i, ext in refs]
        raw.reference_extensions = [ext for _, ext in refs]
        masks = {int(m.group(1)): sample[name] for name in sample if (m := _MASK.match(name))}
        if any(i >= len(refs) for i in masks):
            raise BrokenSample("reference_count", f"masks {sorted(masks)} for {len(refs)} references")
        raw.masks = [masks.get(i) for i in range(len(refs))]
        return raw
    except BrokenSample as broken:
        broken.key, broken.shard = key, shard
        raise


def _extensions(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def read_image(data: bytes, what: str = "image") -> Image.Image:
    """Open and fully load an image; unreadable data is a ``bad_image`` :class:`BrokenSample`."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise BrokenSample("bad_image", f"{what} cannot be read: {error}") from error


def expand_urls(urls: str | list[str]) -> list[str]:
    """Expand brace ranges (``shard-{000000..000099}.tar``) and globs into shard paths.

    Local paths must exist: a pattern matching no file is a :class:`~bindweave.errors.UserError`
    (a ``ValueError``) naming it. Remote
    URLs (``http://``, ``s3://``, ``pipe:``) are passed through unchecked.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns:
        raise UserError("no shard URLs given; name the shards, e.g. 'data/train/shard-{000000..000009}.tar'.")
    found, missing = [], []
    for pattern in patterns:
        for url in braceexpand(str(pattern)):
            if "://" in url or url.startswith("pipe:"):
                found.append(url)
                continue
            path = os.path.expanduser(url)
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
            else:
                matches = [path] if os.path.isfile(path) else []
            if not matches:
                missing.append(url)
            found.extend(matches)
    if missing:
        raise UserError(
            f"{len(missing)} shard URL(s) match no file, e.g. {missing[:3]} (from {patterns}). Check the folder "
            f"and the brace range (e.g. shards/shard-{{000000..000009}}.tar) or the glob."
        )
    return found


# -- writing ----------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    """A written shard."""

    path: str
    samples: int
    bytes: int


class AtomicShard:
    """One tar shard written to a temporary file in the target folder and renamed into place on
    :meth:`close`; on an exception nothing is left behind (and an existing shard is untouched).

    Args:
        path: the shard to write.
        overwrite: replace an existing file at ``path`` (else ``FileExistsError`` at once).
    """

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite to replace it.")
        self._target = AtomicPath(self.path)
        try:
            self._file = open(self._target.tmp, "wb")
        except BaseException:
            self._target.discard()
            raise
        self._tar = wds.TarWriter(self._file, encoder=False)
        self.samples = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add sample ``key`` with ``files`` (extension -> bytes)."""
        if "." in key or "/" in key:
            raise ValueError(f"Sample key {key!r} may not contain '.' or '/' (use shards.sample_key).")
        self._tar.write({"__key__": key, **files})
        self.samples += 1

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._file.tell()

    def close(self) -> ShardInfo:
        """Finish the tar and move it into place."""
        try:
            self._tar.close()  # also closes the file
        except BaseException:
            self._target.discard()
            raise
        self._target.commit()
        return ShardInfo(str(self.path), self.samples, self.path.stat().st_size)

    def abort(self) -> None:
        """Drop the partial shard."""
        try:
            self._tar.close()
        finally:
            self._target.discard()

    def __enter__(self) -> "AtomicShard":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardWriter:
    """Writes samples into ``<directory>/<prefix>-000000.tar``, ``-000001.tar``, ..., starting a new
    shard after ``max_samples`` samples or ``max_bytes`` bytes. Each shard is atomic.

    Existing ``<prefix>-*.tar`` shards are an error (:class:`~bindweave.errors.UserError`) unless
    ``overwrite``; then those not rewritten are removed by :meth:`close`, so the folder holds exactly
    the new set (:meth:`abort` keeps them).

    Args:
        directory: output folder (created).
        prefix: shard name prefix.
        max_samples: samples per shard.
        max_bytes: bytes after which a shard is closed.
        overwrite: replace an existing shard set.
    """

    def __init__(self, directory: str | Path, prefix: str = "shard", max_samples: int = 1000,
                 max_bytes: int = 2**30, overwrite: bool = False) -> None:
        if max_samples < 1:
            raise UserError(f"--samples_per_shard must be >= 1, got {max_samples}.")
        self.directory, self.prefix = Path(directory), prefix
        self.max_samples, self.max_bytes, self.overwrite = max_samples, max_bytes, overwrite
        self._stale = set(self.directory.glob(f"{prefix}-*.tar"))
        if self._stale and not overwrite:
            raise UserError(
                f"{self.directory} already holds {len(self._stale)} shard(s) named {prefix}-*.tar; pass --overwrite to "
                f"replace them or choose another output folder or prefix."
            )
        self._shard: AtomicShard | None = None
        self.shards: list[ShardInfo] = []

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add a sample, opening the next shard when needed."""
        if self._shard is None:
            path = self.directory / f"{self.prefix}-{len(self.shards):06d}.tar"
            self._shard = AtomicShard(path, overwrite=True)
        self._shard.write(key, files)
        if self._shard.samples >= self.max_samples or self._shard.size >= self.max_bytes:
            self._finish()

    def _finish(self) -> None:
        if self._shard is not None:
            info = self._shard.close()
            self._stale.discard(Path(info.path))
            self.shards.append(info)
            self._shard = None

    def close(self) -> list[ShardInfo]:
        """Finish the last shard, remove replaced shards that were not rewritten; the shards written."""
        self._finish()
        for stale in self._stale:
            stale.unlink(missing_ok=True)
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (finished shards stay)."""
        if self._shard is not None:
            self._shard.abort()
            self._shard = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
