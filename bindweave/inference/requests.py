"""Predict requests from a JSONL file: one video per line.

Each line is a JSON object; only ``prompt`` is required::

    {"id": "duck-on-bike", "prompt": "a rubber duck rides a bicycle", "references": ["refs/duck.png"],
     "seed": 3, "num_frames": 81, "height": 480, "width": 832}

* ``references``: 0–4 image paths (PNG, JPEG, ...), relative to the JSONL file's folder; each is
  converted to RGB (:func:`bindweave.model.batch.to_rgb`) and fitted into the video size on a white
  canvas (:func:`bindweave.model.batch.fit_reference`). A conversion or an upscale the user should know
  about (:func:`bindweave.model.batch.reference_warnings`: CMYK, palette, enlarged more than 4×, ...)
  travels with the request as ``warnings`` into its ``<id>.json`` and the run's summary.
* ``negative_prompt``: what CFG's unconditional side is read from for this request (default: the
  model's own, e.g. ``RelationalConditioner``'s); carried in the batch as ``negative_prompt``
  (``list[str | None]``, None for requests without one).
* ``seed``: noise seed (default 0); ``num_frames``, ``height``, ``width``: default to the
  datamodule's, else the model's ``sampling`` settings.
* ``mllm_states``, ``negative_mllm_states``: precomputed MLLM states of the prompt and of the
  negative prompt (the released BindWeave's ``.pt`` files, a feature-cache sample ``.safetensors`` or
  ``shard.tar#key``; relative to the JSONL file's folder; :mod:`bindweave.inference.mllm_states`):
  the relational conditioner uses them instead of running its MLLM.
* ``id``: names the output files ``<id>.mp4``/``.png``/``.json``; default: a slug of the prompt plus
  a hash of the request, so an unchanged request keeps its id when lines are added or moved.

A request that cannot be read (bad JSON, missing or unreadable image, empty prompt, bad size) does
not stop the run: it reaches ``predict_step`` as a ``failed`` entry naming the request, its line and
the fix, and is listed in the summary. A file that cannot be a requests file (missing, a folder,
unreadable, not UTF-8 text, no request in it, no line of JSON) stops the run before any model work
with one :class:`~bindweave.errors.UserError`. Requests whose outputs already exist are skipped, so a
run can be restarted after a crash or after fixing a bad line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from bindweave.data.reference_canvas import ReferenceCanvas
from bindweave.model.batch import check_num_frames, collate, fit_reference, reference_warnings
from bindweave.errors import UserError
from bindweave.inference.mllm_states import KEYS as STATE_KEYS
from bindweave.inference.mllm_states import read_mllm_states, resolve_source
from bindweave.inference.outputs import OutputLocation

KEYS = ("id", "prompt", "negative_prompt", "references", "seed", "num_frames", "height", "width", *STATE_KEYS)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Request:
    """One parsed line of a requests file (sizes resolved; reference paths absolute)."""

    id: str
    prompt: str
    references: list[str] = field(default_factory=list)
    negative_prompt: str | None = None
    seed: int = 0
    num_frames: int = 81
    height: int = 480
    width: int = 832
    mllm_states: str | None = None
    negative_mllm_states: str | None = None
    where: str = ""
    """Where it came from, for error messages (``line 3 of requests.jsonl``)."""

    def record(self) -> dict:
        """The JSONL line that reproduces this request."""
        return {k: v for k, v in asdict(self).items()
                if k != "where" and (v is not None or k not in ("negative_prompt", *STATE_KEYS))}


def default_id(fields: dict) -> str:
    """A readable, stable id: the prompt's first words and a hash of what the request asks for."""
    # A request without a negative prompt or states keeps the id it had before requests could have them.
    content = json.dumps({k: fields.get(k) for k in KEYS if k != "id"
                          and not (k == "negative_prompt" and fields.get(k) is None)
                          and not (k in STATE_KEYS and not fields.get(k))}, sort_keys=True)
    digest = hashlib.sha1(content.encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", str(fields.get("prompt", "")).lower()).strip("-")[:40].rstrip("-")
    return f"{slug}-{digest}" if slug else digest


def load_reference(
    source: str | Path | Image.Image, height: int, width: int, notes: list[str] | None = None,
    canvas: ReferenceCanvas | None = None,
) -> torch.Tensor:
    """A reference image (path or PIL image) fitted into (height, width): (3, H, W) in [-1, 1]."""
    return load_reference_and_mask(source, height, width, notes, canvas)[0]


def load_reference_and_mask(
    source: str | Path | Image.Image, height: int, width: int, notes: list[str] | None = None,
    canvas: ReferenceCanvas | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference image (path or PIL image) fitted into (height, width): (3, H, W) in [-1, 1], and
    the (H, W) bool mask of where it lies; ``canvas`` gives the fitting rule (None:
    :func:`bindweave.model.batch.fit_reference`, the paper's; the release's: :class:`ReferenceCanvas`).

    Raises ValueError naming the file and the fix when it is missing, unreadable or not a colour image.
    With ``notes``, what :func:`bindweave.model.batch.reference_warnings` says about the image (a colour
    mode converted, a large upscale) is appended to it, each prefixed by the file's name.
    """
    name = "the reference" if isinstance(source, Image.Image) else f"reference {Path(source).name!r}"

    def fit(image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if notes is not None:
            notes.extend(f"{name}: {note}" for note in reference_warnings(image, height, width))
        return canvas.fit(image, height, width) if canvas is not None else fit_reference(image, height, width)

    if isinstance(source, Image.Image):
        return fit(source)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"reference image {str(source)!r} does not exist; fix the path.")
    try:
        with Image.open(path) as image:
            image.load()
            return fit(image)
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
    negative_prompt = fields.get("negative_prompt")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"{where}: \"negative_prompt\" must be a string (or null for the model's default), "
                         f"got {negative_prompt!r}.")
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
    states = {}
    for key in STATE_KEYS:
        source = fields.get(key)
        if source is not None and (not isinstance(source, str) or not source):
            raise ValueError(f"{where}: \"{key}\" must be the path of a states file, got {source!r}.")
        states[key] = resolve_source(source, root) if source else None
    return Request(request_id, prompt, resolved, negative_prompt, where=where, **values, **states)


def read_requests(
    path: str | Path, num_frames: int, height: int, width: int, max_references: int | None = None
) -> list[Request | dict]:
    """Parse a JSONL requests file. Each entry is a :class:`Request`, or a ``{"id", "error",
    "request"}`` dict for a line that is not a valid request (reported, not raised).

    Raises :class:`~bindweave.errors.UserError` (one line: the file and the fix) when the file as a
    whole cannot be a requests file: missing, a folder, unreadable, not UTF-8 text, without a
    request (empty or comments only), or without a single line of JSON (e.g. a pretty-printed
    ``.json`` file or a YAML file).
    """
    lines = read_lines(path)
    path = Path(path)
    entries: list[Request | dict] = []
    seen: dict[str, str] = {}
    parsed = 0
    for number, line in lines:
        where = f"line {number} of {path.name}"
        fields: object = None
        try:
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
            parsed += 1
            request = parse_request(fields, where, path.parent, num_frames, height, width, max_references)
            if request.id in seen:
                raise ValueError(f"{where}: id {request.id!r} is already used by {seen[request.id]}; ids must be unique.")
            seen[request.id] = where
            entries.append(request)
        except ValueError as error:
            request_id = fields.get("id") if isinstance(fields, dict) and isinstance(fields.get("id"), str) else None
            request_id = request_id or f"line-{number}"
            entries.append({"id": request_id, "error": str(error), "request": fields})
    if not parsed:  # not one line of JSON: not a JSONL file (a pretty-printed .json, YAML, a list of paths)
        first = entries[0]["error"].rstrip(".")
        raise UserError(
            f"requests file {str(path)!r} has no line of JSON ({first}); write one JSON object per line, "
            f'e.g. {{"prompt": "a red circle moves left", "references": ["red.png"]}}.'
        )
    return entries


def check_requests_file(path: str | Path, fix: str) -> None:
    """:class:`~bindweave.errors.UserError` ending in ``fix`` unless ``path`` is an existing file (a
    relative path is shown with the folder it was looked for in)."""
    path = Path(path)
    looked = "" if path.is_absolute() else f" (looked in {Path.cwd()})"
    if path.is_dir():
        raise UserError(f"requests file {str(path)!r}{looked} is a folder; {fix}.")
    if not path.is_file():
        raise UserError(f"requests file {str(path)!r}{looked} does not exist; {fix}.")


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """The numbered request lines of a requests file (blank lines and ``#`` comments left out);
    :class:`~bindweave.errors.UserError` naming the file and the fix when there are none or the
    file cannot be read as text."""
    path = Path(path)
    check_requests_file(path, "pass the path of a JSONL file of requests")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"requests file {str(path)!r} is not UTF-8 text (byte {error.start}); "
            f"save it as a UTF-8 JSONL file, one request per line."
        ) from None
    except OSError as error:
        raise UserError(
            f"requests file {str(path)!r} cannot be read ({error.strerror or error}); check its permissions."
        ) from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise UserError(
            f"requests file {str(path)!r} has no requests (it is empty or all comments); add one JSON "
            f'object per line, e.g. {{"prompt": "a red circle moves left", "references": ["red.png"]}}.'
        )
    return lines


def is_done(output_dir: str | Path, request_id: str) -> bool:
    """Whether ``<id>.mp4`` and ``<id>.json`` exist (the writer writes the json last)."""
    output_dir = Path(output_dir)
    return (output_dir / f"{request_id}.mp4").is_file() and (output_dir / f"{request_id}.json").is_file()


class RequestDataset(Dataset):
    """Requests read from a JSONL file; item i is a predict sample or a ``failed`` entry.

    A sample's ``warnings`` lists what its user should know about its references (a colour mode
    converted, an upscale of more than 4×: :func:`bindweave.model.batch.reference_warnings`), each
    naming the file; predict writes them into ``<id>.json`` and the summary.

    Args:
        path: the JSONL file.
        num_frames: frames of requests that do not say.
        height: height of requests that do not say.
        width: width of requests that do not say.
        max_references: most references a request may have (None: let the model check).
        skip: requests whose id it returns True for are left out (e.g. :func:`is_done`); they are
            listed in ``skipped``. Requests that cannot be parsed are never skipped.
        canvas: how references are fitted into the video size (None: the paper's rule).
        size_note: what to tell the user about a request's (frames, height, width), or None
            (e.g. :meth:`~bindweave.model.bindweave_model.BindWeaveModel.size_warning`); goes into its warnings.
        use_request_sizes: False: every request at ``num_frames`` × ``height`` × ``width``, whatever
            its own fields say (a 32 × 32 model on a test split written at 64 × 64).
    """

    def __init__(
        self, path: str | Path, num_frames: int, height: int, width: int, max_references: int | None = None,
        skip: Callable[[str], bool] | None = None, canvas: ReferenceCanvas | None = None,
        size_note: Callable[[int, int, int], str | None] | None = None, use_request_sizes: bool = True,
    ) -> None:
        self.canvas, self.size_note = canvas, size_note
        entries = read_requests(path, num_frames, height, width, max_references)
        if not use_request_sizes:
            entries = [dataclasses.replace(e, num_frames=num_frames, height=height, width=width)
                       if isinstance(e, Request) else e for e in entries]
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
        notes: list[str] = []
        size_note = self.size_note(entry.num_frames, entry.height, entry.width) if self.size_note else None
        if size_note:
            notes.append(size_note)
        try:
            fitted = [load_reference_and_mask(p, entry.height, entry.width, notes, self.canvas) for p in entry.references]
            states = {key: read_mllm_states(getattr(entry, key), key.startswith("negative"))
                      if getattr(entry, key) else None for key in STATE_KEYS}
        except ValueError as error:
            return {"failed": {"id": entry.id, "error": f"request {entry.id!r} ({entry.where}): {error}",
                               "request": entry.record()}}
        refs = torch.stack([f[0] for f in fitted]) if fitted else torch.zeros(0, 3, entry.height, entry.width)
        masks = torch.stack([f[1] for f in fitted]) if fitted else torch.zeros(0, entry.height, entry.width, dtype=torch.bool)
        return {
            "id": entry.id, "prompt": entry.prompt, "negative_prompt": entry.negative_prompt,
            "references": refs,  # (n, 3, H, W) in [-1, 1]
            "reference_masks": masks,  # (n, H, W) bool: where each reference lies on its canvas
            "reference_paths": list(entry.references), "seed": entry.seed, "where": entry.where,
            "num_frames": entry.num_frames, "height": entry.height, "width": entry.width,
            "warnings": list(dict.fromkeys(notes)),  # once per request, even for a file given twice
            **states,  # (L, C) float32 or None each
            "request_extra": {key: getattr(entry, key) for key in STATE_KEYS if getattr(entry, key)},
        }


def collate_requests(samples: list[dict]) -> dict:
    """Collate predict samples; ``failed`` entries go to ``batch["failed"]``."""
    good = [s for s in samples if "failed" not in s]
    if good:
        ragged = {key: [s.pop(key, None) for s in good] for key in STATE_KEYS}  # (L_i, C): lists, not stacked
        batch = collate(good)
        batch.update({key: values for key, values in ragged.items() if any(v is not None for v in values)})
    else:
        batch = {"prompt": [], "id": [], "num_references": [], "references": torch.zeros(0, 0, 3, 8, 8)}
    batch["failed"] = [s["failed"] for s in samples if "failed" in s]
    return batch


class SizeBatchSampler(Sampler[list[int]]):
    """Batches of up to ``batch_size`` requests of one video size, in file order of first appearance.

    A dataset with nothing left to do (every request already done) gives one empty batch: predict
    then runs its hooks as usual (the writer's summary says "all N already done") instead of
    Lightning skipping a loader of length zero with a warning.
    """

    def __init__(self, dataset: RequestDataset, batch_size: int) -> None:
        groups: dict[tuple, list[int]] = {}
        for i in range(len(dataset)):
            groups.setdefault(dataset.size_key(i), []).append(i)
        self.batches = [idx[j : j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]
        if not self.batches:
            self.batches = [[]]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class RequestDataModule(L.LightningDataModule):
    """``bindweave predict`` over a JSONL file of requests (see :mod:`bindweave.inference.requests`).

    Args:
        requests: path of the JSONL file.
        output_dir: where finished videos are looked for to skip them; default: the output folder
            of the trainer's ``VideoWriter`` callback.
        skip_done: skip requests whose ``<id>.mp4`` and ``<id>.json`` exist (rerun-safe).
        batch_size: requests per batch (only requests of the same size are batched together).
        num_workers: DataLoader worker processes (reference images load there); at most the
            machine's cores.
        num_frames: frames of requests that do not say; default: the model's ``sampling.num_frames``.
        height: height of requests that do not say; default: the model's ``sampling.height``.
        width: width of requests that do not say; default: the model's ``sampling.width``.
        max_references: most references per request (None: the model checks).
        use_request_sizes: False: every request at the default size above (the model's, unless
            given), whatever its own ``num_frames``/``height``/``width`` say.
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
        use_request_sizes: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}; pass --data.batch_size 1 or more.")
        self.save_hyperparameters()
        self.skipped: list[str] = []
        self.dataset: RequestDataset | None = None

    def setup(self, stage: str) -> None:
        """Check the requests file before the model is built and its weights are loaded: a missing,
        empty or unreadable file is one :class:`~bindweave.errors.UserError`. (Not in ``__init__``:
        jsonargparse would bury the line in a traceback of its own.)"""
        if stage == "predict":
            check_requests_file(self.hparams.requests, "pass an existing JSONL file of requests with --data.requests")
            read_lines(self.hparams.requests)

    def _defaults(self) -> tuple[int, int, int]:
        sampling = getattr(getattr(self.trainer, "lightning_module", None), "sampling", None) if self.trainer else None
        hp = self.hparams
        picked = []
        for key in ("num_frames", "height", "width"):
            value = hp[key] if hp[key] is not None else getattr(sampling, key, None)
            if value is None:
                raise UserError(f"RequestDataModule needs `{key}` (no model with a sampling config to take it from); "
                                f"pass --data.{key}.")
            picked.append(value)
        return tuple(picked)

    def _output_dir(self) -> Path | None:
        if self.hparams.output_dir is not None:
            return Path(self.hparams.output_dir)
        for callback in getattr(self.trainer, "callbacks", []) if self.trainer else []:
            if isinstance(callback, OutputLocation):  # declares where it writes (callbacks.VideoWriter)
                return callback.resolve_output_dir(self.trainer)
        return None

    def build_dataset(self) -> RequestDataset:
        """Read the requests (sizes defaulted), leaving out those already done when ``skip_done``."""
        num_frames, height, width = self._defaults()
        output_dir = self._output_dir() if self.hparams.skip_done else None
        skip = (lambda request_id: is_done(output_dir, request_id)) if output_dir is not None else None
        module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        sampling, model = getattr(module, "sampling", None), getattr(module, "model", None)
        size_note = None
        if sampling is not None and hasattr(model, "size_warning"):
            made_for = (sampling.num_frames, sampling.height, sampling.width)
            size_note = lambda f, h, w: model.size_warning(f, h, w, made_for)  # noqa: E731
        dataset = RequestDataset(self.hparams.requests, num_frames, height, width, self.hparams.max_references, skip,
                                 getattr(sampling, "reference_canvas", None), size_note, self.hparams.use_request_sizes)
        self.skipped = dataset.skipped
        return dataset

    def predict_dataloader(self) -> DataLoader:
        self.dataset = self.build_dataset()
        return DataLoader(
            self.dataset,
            batch_sampler=SizeBatchSampler(self.dataset, self.hparams.batch_size),
            # No more workers than cores (a config layered on a training one may carry its count).
            num_workers=min(self.hparams.num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count() or 1),
            collate_fn=collate_requests,
        )
