"""Weights from disk into models built on the meta device, with strict reporting.

A model is built on ``torch.device("meta")`` (no memory), then every parameter is read from its file
straight into its final tensor: safetensors shards are parsed here and read with ``readinto`` (no
mmap, no intermediate state dict), so loading peaks at about the model's size plus its largest
tensor. Legacy ``.pth`` files go through ``torch.load(weights_only=True, mmap=True)``; pickle is
never executed.

Every load is strict: missing keys, unexpected keys and wrong shapes are collected and raised as one
:class:`WeightsError` naming the file, the key and the expected shape. A key may only be missing if
the caller names it (e.g. the zero-initialised parts of :func:`load_dit` with
``allow_new_conditions``).

The DiT's layouts are read by :mod:`bindweave.weights.dit_loading` on top of this reader.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from bindweave.errors import UserError
from bindweave.weights.quantize import FP8_DTYPES, FP8_SCALE_SUFFIX, SCALE_SUFFIX, dequantize

# ----------------------------------------------------------------------------------------------
# Errors and reports
# ----------------------------------------------------------------------------------------------


class WeightsError(UserError):
    """A checkpoint that cannot be loaded as asked: missing/corrupt files, wrong keys or shapes."""


@dataclass
class LoadReport:
    """What a strict load did.

    Attributes:
        source: the file or folder read.
        loaded: target keys read from the checkpoint.
        fresh: target keys the checkpoint does not have and that were allowed to be missing (the
            caller initialises them).
        ignored: checkpoint keys deliberately not used (e.g. Wan's unused ``norm_added_q``).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def format_shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


# ----------------------------------------------------------------------------------------------
# Reading checkpoints: safetensors shards and legacy .pth
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.safetensors$")
_LEGACY_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclass
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offset in a safetensors file
    tensor: torch.Tensor | None = None  # legacy files: the (mmap-backed) tensor
    scale: "_Entry | None" = None  # int8 storage (bindweave.weights.quantize): the per-output-channel scales

    @property
    def nbytes(self) -> int:
        own = math.prod(self.shape) * self.dtype.itemsize
        return own + (self.scale.nbytes if self.scale is not None else 0)


def _read_safetensors_header(path: Path) -> dict[str, _Entry]:
    """Parse and validate a safetensors header (format: u64 little-endian length, JSON, data)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path}: corrupt safetensors file (only {size} bytes, no header); download or export it again.")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, 100_000_000):
            raise WeightsError(
                f"{path}: corrupt safetensors file (header length {length} in a {size}-byte file); download or export it again."
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors file (unreadable header: {e}); download or export it again.") from None
    entries, data_size = {}, size - 8 - length
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(meta.get("dtype"))
        begin, end = meta.get("data_offsets", (0, -1))
        shape = tuple(meta.get("shape", ()))
        if dtype is None:
            raise WeightsError(f"{path}: tensor {key!r} has unsupported dtype {meta.get('dtype')!r}.")
        expected = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= data_size or end - begin != expected:
            raise WeightsError(
                f"{path}: corrupt or truncated safetensors file: tensor {key!r} {format_shape(shape)} needs bytes "
                f"{begin}..{begin + expected} of a {data_size}-byte data section; download or export it again."
            )
        entries[key] = _Entry(path, dtype, shape, start=8 + length + begin)
    return entries


def _read_legacy(path: Path) -> dict[str, _Entry]:
    """A ``.pth``/``.bin``/``.ckpt`` state dict through ``torch.load(weights_only=True)``."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files written before torch's zip format cannot be mmap'ed
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure means the same thing here)
        raise WeightsError(f"{path}: cannot be read as a PyTorch weights file with weights_only=True ({e}).") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}.")
    return {k: _Entry(path, v.dtype, tuple(v.shape), tensor=v) for k, v in obj.items()}


class Checkpoint:
    """The tensors of a checkpoint (one file or a folder of shards), read lazily key by key.

    Use :meth:`open`. Tensors are read with :meth:`read`; shapes and dtypes come from the headers
    without reading data.
    """

    def __init__(self, entries: dict[str, _Entry], source: Path, files: list[Path]) -> None:
        self.entries, self.source, self.files = entries, source, files

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, prefix: str | None = None) -> "Checkpoint":
        """Open a weights file, a ``*.safetensors.index.json``, or a folder holding either.

        In a folder the index (``{prefix}.safetensors.index.json``) wins; else the safetensors files
        (``{prefix}*.safetensors``), which must be one file or one complete ``-0000i-of-0000N`` set;
        else a single ``.pth``/``.bin``. Missing shards and unreadable files raise :class:`WeightsError`.
        """
        path = Path(path)
        if not path.exists():
            raise WeightsError(f"{path}: no such file or folder; check the path (weights are never downloaded at run time).")
        if path.is_dir():
            files = cls._resolve_folder(path, prefix)
        elif path.name.endswith(".safetensors.index.json"):
            files = cls._index_files(path)
        else:
            files = [path]
        entries: dict[str, _Entry] = {}
        for file in files:
            if file.suffix == ".safetensors":
                found = _read_safetensors_header(file)
            elif file.suffix in _LEGACY_SUFFIXES:
                found = _read_legacy(file)
            else:
                raise WeightsError(f"{file}: unknown weights format (expected .safetensors, .pth, .pt, .bin or .ckpt).")
            clash = sorted(set(found) & set(entries))
            if clash:
                raise WeightsError(f"{file}: keys also stored in {entries[clash[0]].file.name}, e.g. {clash[:3]}.")
            entries.update(found)
        return cls(_fold_fp8_scales(_fold_int8_scales(entries, path), path), path, files)

    @staticmethod
    def _index_files(index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a safetensors index (needs a 'weight_map': {e}).") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (index.parent / n).is_file()]
        if missing:
            raise WeightsError(
                f"{index} lists {len(names)} shards but {len(missing)} are missing from {index.parent}: "
                f"{', '.join(missing)}. Download them again; a partial load is not possible."
            )
        return [index.parent / n for n in names]

    @classmethod
    def _resolve_folder(cls, folder: Path, prefix: str | None) -> list[Path]:
        pattern = f"{prefix}.safetensors.index.json" if prefix else "*.safetensors.index.json"
        indexes = sorted(folder.glob(pattern))
        if len(indexes) > 1:
            raise WeightsError(f"{folder}: several indexes ({[i.name for i in indexes]}); name one.")
        if indexes:
            return cls._index_files(indexes[0])
        files = sorted(folder.glob(f"{prefix}*.safetensors" if prefix else "*.safetensors"))
        if len(files) > 1:
            matches = [_SHARD.match(f.name) for f in files]
            sets = {(m["prefix"], m["total"]) for m in matches if m}
            if len(sets) != 1 or not all(matches):
                raise WeightsError(
                    f"{folder}: several unrelated safetensors files ({[f.name for f in files]}) and no index; "
                    f"point to one file."
                )
            (stem, total), = sets
            expected = [f"{stem}-{i:05d}-of-{total}.safetensors" for i in range(1, int(total) + 1)]
            missing = [n for n in expected if not (folder / n).is_file()]
            if missing:
                raise WeightsError(f"{folder}: shards missing: {', '.join(missing)} (of {total}).")
        if files:
            return files
        legacy = sorted(f for f in folder.iterdir() if f.suffix in _LEGACY_SUFFIXES)
        if len(legacy) == 1:
            return legacy
        raise WeightsError(
            f"{folder}: no weights found (looked for *.safetensors.index.json, *.safetensors, or one "
            f".pth/.bin file{'; found ' + str([f.name for f in legacy]) if legacy else ''})."
        )

    # -- reading -------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        """The dtype :meth:`read` returns by default (an int8-stored tensor's is its scales')."""
        entry = self.entries[key]
        return entry.scale.dtype if entry.scale is not None else entry.dtype

    def file_of(self, key: str) -> Path:
        return self.entries[key].file

    @property
    def nbytes(self) -> int:
        """Total size of the tensors as stored."""
        return sum(e.nbytes for e in self.entries.values())

    def read(
        self, key: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Read one tensor, cast to ``dtype`` and moved to ``device`` (default: as stored, CPU; an
        int8-stored tensor comes back dequantized, in its scales' dtype)."""
        entry = self.entries[key]
        tensor = self._read_entry(entry, key)
        if entry.scale is not None:
            tensor = dequantize(tensor, self._read_entry(entry.scale, key))
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device) if device is not None else tensor

    @staticmethod
    def _read_entry(entry: _Entry, key: str) -> torch.Tensor:
        """The tensor as stored."""
        if entry.tensor is not None:
            tensor = entry.tensor
        else:
            # A host buffer whatever the default device (Lightning builds models under the GPU's).
            tensor = torch.empty(entry.shape, dtype=entry.dtype, device="cpu")
            buffer = tensor.reshape(-1).view(torch.uint8).numpy()
            with open(entry.file, "rb") as f:
                f.seek(entry.start)
                view, done = memoryview(buffer), 0
                while done < len(buffer):
                    n = f.readinto(view[done:])
                    if not n:
                        raise WeightsError(f"{entry.file}: truncated while reading {key!r}; download or export it again.")
                    done += n
        return tensor


def check_lightning_checkpoint(path: str | Path) -> None:
    """Raise :class:`WeightsError` (one line: the file, what is wrong, the fix) unless ``path`` looks
    like a whole Lightning checkpoint: a non-empty ``torch.save`` zip whose central directory is
    intact (a truncated copy loses it). Reads only the zip's directory, not the weights. A folder
    (a sharded distributed checkpoint) is left to its loader."""
    path = Path(path)
    if path.is_dir():
        return
    if not path.exists():
        raise WeightsError(f"{path}: no such checkpoint; check --ckpt_path (e.g. <default_root_dir>/checkpoints/last.ckpt).")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{path}: the checkpoint is an empty file (an interrupted copy or save?); use another checkpoint.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint ({size} bytes without a zip directory: truncated or "
            f"not a .ckpt); copy it again or use another checkpoint."
        ) from None
    if not any(n.endswith("data.pkl") for n in names):
        raise WeightsError(f"{path}: a zip file but not a PyTorch checkpoint (no data.pkl); pass a .ckpt of `bindweave fit`.")


def _fold_int8_scales(entries: dict[str, _Entry], source: Path) -> dict[str, _Entry]:
    """Attach each ``<key>@int8_scale`` (bindweave.weights.quantize) to its int8 ``<key>``; check the pair."""
    for name in [k for k in entries if k.endswith(SCALE_SUFFIX)]:
        key, scale = name.removesuffix(SCALE_SUFFIX), entries.pop(name)
        values = entries.get(key)
        expected = values.shape[:1] + (1,) * (len(values.shape) - 1) if values is not None else None
        if values is None or values.dtype != torch.int8 or scale.shape != expected or not scale.dtype.is_floating_point:
            raise WeightsError(
                f"{source}: {name} does not fit {key} (expected int8 {key} and float scales of shape {expected}, "
                f"got {values.dtype if values is not None else 'no tensor'} and {scale.dtype} {format_shape(scale.shape)}): "
                f"the file is corrupt; export it again."
            )
        values.scale = scale
    return entries


def _fold_fp8_scales(entries: dict[str, _Entry], source: Path) -> dict[str, _Entry]:
    """The community's scaled-fp8 files (:data:`bindweave.weights.quantize.FP8_SCALE_SUFFIX`): attach
    each ``<module>.scale_weight`` to its float8 ``<module>.weight`` (read back as ``fp8 * scale``)
    and drop the ``scaled_fp8`` marker and the ``scale_input`` tensors, which only FP8 matmuls use.
    Plain float8 files need nothing: their weights are read and cast like any other dtype."""
    names = [k for k in entries if k.endswith(FP8_SCALE_SUFFIX)]
    if not names:
        return entries
    for name in names:
        key, scale = name.removesuffix(FP8_SCALE_SUFFIX) + ".weight", entries.pop(name)
        values = entries.get(key)
        rows = values.shape[:1] + (1,) * (len(values.shape) - 1) if values is not None else None
        if (values is None or values.dtype not in FP8_DTYPES or not scale.dtype.is_floating_point
                or math.prod(scale.shape) not in (1, rows[0])):
            raise WeightsError(
                f"{source}: {name} does not fit {key} (expected a float8 {key} and one float scale or one per row, "
                f"got {values.dtype if values is not None else 'no tensor'} and {scale.dtype} {format_shape(scale.shape)}): "
                f"not a scaled-fp8 file, or a corrupt one."
            )
        shape = rows if math.prod(scale.shape) > 1 else ()  # per row, or one for the whole tensor
        values.scale = replace(scale, shape=shape, tensor=None if scale.tensor is None else scale.tensor.reshape(shape))
    for name in [k for k in entries if k == "scaled_fp8" or k.endswith(".scale_input")]:
        del entries[name]
    return entries


# ----------------------------------------------------------------------------------------------
# Strict loading into (meta) modules
# ----------------------------------------------------------------------------------------------


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``module`` by ``value`` (a Parameter for parameters)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value


def _present(checkpoint: Checkpoint, source: str | tuple[str, ...] | None) -> bool:
    if isinstance(source, tuple):
        return all(k in checkpoint for k in source)
    return source is not None and source in checkpoint


def _source_shape(checkpoint: Checkpoint, source: str | tuple[str, ...]) -> tuple[int, ...]:
    if isinstance(source, tuple):
        shapes = [checkpoint.shape(k) for k in source]
        if any(s[1:] != shapes[0][1:] for s in shapes):
            return tuple(shapes)  # not concatenable: never equal to a target shape
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return checkpoint.shape(source)


def _source_read(checkpoint: Checkpoint, source, dtype, device) -> torch.Tensor:
    if isinstance(source, tuple):
        return torch.cat([checkpoint.read(k, dtype, device) for k in source])
    return checkpoint.read(source, dtype, device)


def _source_name(source) -> str:
    return " + ".join(source) if isinstance(source, tuple) else source


def _first(source) -> str:
    return source[0] if isinstance(source, tuple) else source


def load_into(
    module: nn.Module,
    checkpoint: Checkpoint,
    sources: dict[str, str | tuple[str, ...]],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_missing: Callable[[str], bool] = lambda name: False,
    ignored: Iterable[str] = (),
    adapt: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
    hint: str = "",
) -> LoadReport:
    """Read every tensor of ``module`` from ``checkpoint``, strictly, in place.

    Args:
        module: the target, typically built on the meta device.
        checkpoint: the opened checkpoint.
        sources: {target key (``module.state_dict()`` name): checkpoint key, or a tuple of keys whose
            tensors are concatenated along dim 0 (fused projections, e.g. q, k, v -> in_proj)}.
        dtype: cast floating tensors to this dtype (default: the target's dtype).
        device: where the tensors go (default: CPU).
        allow_missing: target keys that may be absent from ``sources`` (the caller initialises them).
        ignored: checkpoint keys that are known and deliberately not loaded.
        adapt: {target key: fn(checkpoint tensor, target) -> tensor} for keys whose shape may differ
            (no shape check for them).
        hint: appended to the error message (what to check).

    Raises:
        WeightsError: listing every missing key (with its expected shape), unexpected key (with its
        file) and shape mismatch (file, key, checkpoint shape, expected shape); nothing is loaded.
    """
    adapt = adapt or {}
    targets = module.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}  # tied weights: one tensor under several names
    for name, tensor in targets.items():
        groups.setdefault(id(tensor), []).append(name)
    chosen: dict[str, str] = {}  # first name of each group -> the name whose source is read
    report = LoadReport(source=str(checkpoint.source), ignored=sorted(ignored))
    missing, wrong = [], []
    for names in groups.values():
        tensor = targets[names[0]]
        found = [n for n in names if _present(checkpoint, sources.get(n))]
        if not found:
            if not any(allow_missing(n) for n in names):
                source = sources.get(names[0])
                missing.append(f"{names[0]} {format_shape(tensor.shape)}"
                               + (f" (checkpoint key {_source_name(source)!r})" if source else ""))
            continue
        name = chosen[names[0]] = found[0]
        source = sources[name]
        if name not in adapt and _source_shape(checkpoint, source) != tuple(tensor.shape):
            wrong.append(
                f"{checkpoint.file_of(_first(source))}: {_source_name(source)} has shape "
                f"{format_shape(_source_shape(checkpoint, source))}, expected {format_shape(tensor.shape)}"
                + (f" (for {name})" if name != source else "")
            )
    used = set()
    for n in targets:
        if _present(checkpoint, sources.get(n)):
            used.update(sources[n] if isinstance(sources[n], tuple) else [sources[n]])
    unexpected = sorted(set(checkpoint.keys()) - used - set(ignored))
    if missing or wrong or unexpected:
        lines = [f"Cannot load {checkpoint.source} into {type(module).__name__}; nothing was loaded."]
        for title, items in (("wrong shapes", wrong), ("missing from the checkpoint", missing),
                             ("unexpected in the checkpoint", [f"{checkpoint.file_of(k)}: {k} "
                                                               f"{format_shape(checkpoint.shape(k))}" for k in unexpected])):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines += [f"  {item}" for item in items[:12]]
                lines += [f"  ... and {len(items) - 12} more"] if len(items) > 12 else []
        if hint:
            lines.append(hint)
        raise WeightsError("\n".join(lines))

    # Read in file order (sequential IO), one tensor at a time, straight into its final place.
    order = sorted(chosen.items(), key=lambda item: (str(checkpoint.file_of(_first(sources[item[1]]))),
                                                       checkpoint.entries[_first(sources[item[1]])].start))
    for first, name in order:
        target = targets[first]
        want = dtype if dtype is not None and target.is_floating_point() else target.dtype
        value = _source_read(checkpoint, sources[name], want, device)
        if name in adapt:
            value = adapt[name](value, target)
        if isinstance(target, nn.Parameter):  # one Parameter for all names keeps tied weights tied
            value = nn.Parameter(value, requires_grad=target.requires_grad)
        for alias in groups[id(target)]:
            _set_tensor(module, alias, value)
            report.loaded.append(alias)
    report.fresh = sorted(n for n in targets if n not in report.loaded)
    return report


def assert_materialized(module: nn.Module, what: str) -> None:
    """Raise if a parameter or buffer of ``module`` is still on the meta device."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise WeightsError(f"{what}: {len(left)} tensors were never loaded or initialised, e.g. {left[:5]}.")


# ----------------------------------------------------------------------------------------------
# Writing sharded safetensors
# ----------------------------------------------------------------------------------------------


def save_sharded(
    state_dict: dict[str, torch.Tensor],
    directory: str | Path,
    name: str = "model",
    max_shard_bytes: int = 5 * 1024**3,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``state_dict`` as ``{name}.safetensors`` or ``{name}-0000i-of-0000N.safetensors`` shards
    plus ``{name}.safetensors.index.json`` (the Hugging Face layout). Returns the files written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().contiguous().cpu()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        path = directory / f"{name}.safetensors"
        save_file(shards[0], str(path), metadata=meta)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = directory / f"{name}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=meta)
        weight_map.update({k: path.name for k in shard})
        paths.append(path)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
             "weight_map": weight_map}
    index_path = directory / f"{name}.safetensors.index.json"
    index_path.write_text(json.dumps(index, indent=2))
    return paths + [index_path]
