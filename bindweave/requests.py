"""Predict requests from a JSONL file: one video per line.

Each line is a JSON object; only ``prompt`` is required::

    {"id": "duck-on-bike", "prompt": "a rubber duck rides a bicycle", "references": ["refs/duck.png"],
     "seed": 3, "num_frames": 81, "height": 480, "width": 832}

* ``references``: 0–4 image paths (PNG, JPEG, ...), relative to the JSONL file's folder; each is
  converted to RGB (:func:`bindweave.batch.to_rgb`) and fitted into the video size on a white
  canvas (:func:`bindweave.batch.fit_reference`).
* ``seed``: noise seed (default 0); ``num_frames``, ``height``, ``width``: default to the
  datamodule's, else the model's ``sampling`` settings.
* ``id``: names the output files ``<id>.mp4``/``.png``/``.json``; default: a slug of the prompt plus
  a hash of the request, so an unchanged request keeps its id when lines are added or moved.

A request that cannot be read (bad JSON, missing or unreadable image, empty prompt, bad size) does
not stop the run: it reaches ``predict_step`` as a ``failed`` entry naming the request, its line and
the fix, and is listed in the summary. Requests whose outputs already exist are skipped, so a run can
be restarted after a crash or after fixing a bad line.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from bindweave.batch import check_num_frames, collate, fit_reference

KEYS = ("id", "prompt", "references", "seed", "num_frames", "height", "width")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Request:
    """One parsed line of a requests file (sizes resolved; reference paths absolute)."""

    id: str
    prompt: str
    references: list[str] = field(default_factory=list)
    seed: int = 0
    num_frames: int = 81
    height: int = 480
    width: int = 832
    where: str = ""
    """Where it came from, for error messages (``line 3 of requests.jsonl``)."""

    def record(self) -> dict:
        """The JSONL line that reproduces this request."""
        return {k: v for k, v in asdict(self).items() if k != "where"}


def default_id(fields: dict) -> str:
    """A readable, stable id: the prompt's first words and a hash of what the request asks for."""
    content = json.dumps({k: fields.get(k) for k in KEYS if k != "id"}, sort_keys=True)
    digest = hashlib.sha1(content.encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", str(fields.get("prompt", "")).lower()).strip("-")[:40].rstrip("-")
    return f"{slug}-{digest}" if slug else digest


def load_reference(source: str | Path | Image.Image, height: int, width: int) -> torch.Tensor:
    """A reference image (path or PIL image) fitted into (height, width): (3, H, W) in [-1, 1].

    Raises ValueError naming the file and the fix when it is missing, unreadable or not a colour image.
    """
    if isinstance(source, Image.Image):
        return fit_reference(source, height, width)[0]
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"reference image {str(source)!r} does not exist; fix the path.")
    try:
        with Image.open(path) as image:
            image.load()
            return fit_reference(image, height, width)[0]
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"reference image {str(source)!r} cannot be read as an image ({error}); "
            f"save it as a PNG or JPEG."
        ) from None
    except ValueError as error:
        raise ValueError(f"reference image {str(source)!r}: {error}") from None


def parse_request(
    fields: object, where: str, root: Path, num_frames: int, height: int, width: int, max_references: int | None
) -> Request:
    """Check one JSON request and resolve its defaults; ValueError naming the fix otherwise."""
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: a request is a JSON object like {{\"prompt\": \"...\"}}, got {type(fields).__name__}.")
    unknown = sorted(set(fields) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a request has {list(KEYS)}.")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: the prompt is empty or missing; describe the video in \"prompt\".")
    references = fields.get("references", [])
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, list) or not all(isinstance(r, str) and r for r in references):
        raise ValueError(f"{where}: \"references\" must be a list of image paths, got {references!r}.")
    if max_references is not None and len(references) > max_references:
        raise ValueError(
            f"{where}: {len(references)} references, but the model takes at most {max_references}; "
            f"pass fewer references."
        )
    values = {}
    for key, default in (("seed", 0), ("num_frames", num_frames), ("height", height), ("width", width)):
        value = fields.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise ValueError(f"{where}: \"{key}\" must be a {'non-negative' if key == 'seed' else 'positive'} integer, got {value!r}.")
        values[key] = value
    try:
        check_num_frames(values["num_frames"])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    request_id = fields.get("id")
    if request_id is None:
        request_id = default_id({**fields, **values, "references": references})
    if not isinstance(request_id, str) or not _ID.match(request_id):
        raise ValueError(
            f"{where}: id {request_id!r} cannot name a file; use letters, digits, '.', '_' and '-' "
            f"(at most 128, not starting with '.' or '-')."
        )
    resolved = [str((root / r).resolve()) if not Path(r).is_absolute() else r for r in references]
    return Request(request_id, prompt, resolved, where=where, **values)


def read_requests(
    path: str | Path, num_frames: int, height: int, width: int, max_references: int | None = None
) -> list[Request | dict]:
    """Parse a JSONL requests file. Each entry is a :class:`Request`, or a ``{"id", "error",
    "request"}`` dict for a line that is not a valid request (reported, not raised)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Requests file {str(path)!r} does not exist; pass the path of a JSONL file.")
    entries: list[Request | dict] = []
    seen: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"line {number} of {path.name}"
        fields: object = None
        try:
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
            request = parse_request(fields, where, path.parent, num_frames, height, width, max_references)
            if request.id in seen:
                raise ValueError(f"{where}: id {request.id!r} is already used by {seen[request.id]}; ids must be unique.")
            seen[request.id] = where
            entries.append(request)
        except ValueError as error:
            request_id = fields.get("id") if isinstance(fields, dict) and isinstance(fields.get("id"), str) else None
            request_id = request_id or f"line-{number}"
            entries.append({"id": request_id, "error": str(error), "request": fields})
    return entries


def is_done(output_dir: str | Path, request_id: str) -> bool:
    """Whether ``<id>.mp4`` and ``<id>.json`` exist (the writer writes the json last)."""
    output_dir = Path(output_dir)
    return (output_dir / f"{request_id}.mp4").is_file() and (output_dir / f"{request_id}.json").is_file()


class RequestDataset(Dataset):
    """Requests read from a JSONL file; item i is a predict sample or a ``failed`` entry.

    Args:
        path: the JSONL file.
        num_frames: frames of requests that do not say.
        height: height of requests that do not say.
        width: width of requests that do not say.
        max_references: most references a request may have (None: let the model check).
        skip: requests whose id it returns True for are left out (e.g. :func:`is_done`); they are
            listed in ``skipped``. Requests that cannot be parsed are never skipped.
    """

    def __init__(
        self, path: str | Path, num_frames: int, height: int, width: int, max_references: int | None = None,
        skip: Callable[[str], bool] | None = None,
    ) -> None:
        entries = read_requests(path, num_frames, height, width, max_references)
        skipped = [isinstance(e, Request) and skip is not None and skip(e.id) for e in entries]
        self.entries = [e for e, s in zip(entries, skipped) if not s]
        self.skipped = [e.id for e, s in zip(entries, skipped) if s]

    def __len__(self) -> int:
        return len(self.entries)

    def size_key(self, index: int) -> tuple:
        entry = self.entries[index]
        return (entry.num_frames, entry.height, entry.width) if isinstance(entry, Request) else ()

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        if not isinstance(entry, Request):
            return {"failed": entry}
        try:
            references = [load_reference(p, entry.height, entry.width) for p in entry.references]
        except ValueError as error:
            return {"failed": {"id": entry.id, "error": f"request {entry.id!r} ({entry.where}): {error}",
                               "request": entry.record()}}
        refs = torch.stack(references) if references else torch.zeros(0, 3, entry.height, entry.width)
        return {
            "id": entry.id, "prompt": entry.prompt, "references": refs,  # (n, 3, H, W) in [-1, 1]
            "reference_paths": list(entry.references), "seed": entry.seed, "where": entry.where,
            "num_frames": entry.num_frames, "height": entry.height, "width": entry.width,
        }


def collate_requests(samples: list[dict]) -> dict:
    """Collate predict samples; ``failed`` entries go to ``batch["failed"]``."""
    good = [s for s in samples if "failed" not in s]
    if good:
        batch = collate(good)
    else:
        batch = {"prompt": [], "id": [], "num_references": [], "references": torch.zeros(0, 0, 3, 8, 8)}
    batch["failed"] = [s["failed"] for s in samples if "failed" in s]
    return batch


class SizeBatchSampler(Sampler[list[int]]):
    """Batches of up to ``batch_size`` requests of one video size, in file order of first appearance."""

    def __init__(self, dataset: RequestDataset, batch_size: int) -> None:
        groups: dict[tuple, list[int]] = {}
        for i in range(len(dataset)):
            groups.setdefault(dataset.size_key(i), []).append(i)
        self.batches = [idx[j : j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class RequestDataModule(L.LightningDataModule):
    """``bindweave predict`` over a JSONL file of requests (see :mod:`bindweave.requests`).

    Args:
        requests: path of the JSONL file.
        output_dir: where finished videos are looked for to skip them; default: the output folder
            of the trainer's ``VideoWriter`` callback.
        skip_done: skip requests whose ``<id>.mp4`` and ``<id>.json`` exist (rerun-safe).
        batch_size: requests per batch (only requests of the same size are batched together).
        num_workers: DataLoader worker processes (reference images load there).
        num_frames: frames of requests that do not say; default: the model's ``sampling.num_frames``.
        height: height of requests that do not say; default: the model's ``sampling.height``.
        width: width of requests that do not say; default: the model's ``sampling.width``.
        max_references: most references per request (None: the model checks).
    """

    def __init__(
        self,
        requests: str,
        output_dir: str | None = None,
        skip_done: bool = True,
        batch_size: int = 1,
        num_workers: int = 0,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        max_references: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.save_hyperparameters()
        self.skipped: list[str] = []
        self.dataset: RequestDataset | None = None

    def _defaults(self) -> tuple[int, int, int]:
        sampling = getattr(getattr(self.trainer, "lightning_module", None), "sampling", None) if self.trainer else None
        hp = self.hparams
        picked = []
        for key in ("num_frames", "height", "width"):
            value = hp[key] if hp[key] is not None else getattr(sampling, key, None)
            if value is None:
                raise ValueError(f"RequestDataModule needs `{key}` (no model with a sampling config to take it from).")
            picked.append(value)
        return tuple(picked)

    def _output_dir(self) -> Path | None:
        if self.hparams.output_dir is not None:
            return Path(self.hparams.output_dir)
        from callbacks.video_writer import VideoWriter

        for callback in getattr(self.trainer, "callbacks", []) if self.trainer else []:
            if isinstance(callback, VideoWriter):
                return callback.resolve_output_dir(self.trainer)
        return None

    def build_dataset(self) -> RequestDataset:
        """Read the requests (sizes defaulted), leaving out those already done when ``skip_done``."""
        num_frames, height, width = self._defaults()
        output_dir = self._output_dir() if self.hparams.skip_done else None
        skip = (lambda request_id: is_done(output_dir, request_id)) if output_dir is not None else None
        dataset = RequestDataset(self.hparams.requests, num_frames, height, width, self.hparams.max_references, skip)
        self.skipped = dataset.skipped
        return dataset

    def predict_dataloader(self) -> DataLoader:
        # SizeBatchSampler yields every index: Lightning's drop_last caveat for custom samplers does not apply.
        warnings.filterwarnings("ignore", message="You are using a custom batch sampler")
        self.dataset = self.build_dataset()
        return DataLoader(
            self.dataset,
            batch_sampler=SizeBatchSampler(self.dataset, self.hparams.batch_size),
            num_workers=self.hparams.num_workers,
            collate_fn=collate_requests,
        )
