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

The DiT loader reads this project's keys, diffusers' ``WanTransformer3DModel`` keys, the official
Wan2.1 keys and the released BindWeave checkpoint; :class:`PretrainedWanDiT` makes it a YAML-usable
DiT factory whose state-dict keys are :class:`~bindweave.dit.WanDiT`'s.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
from torch import nn

from bindweave.dit import CrossAttentionBranch, WanDiT
from bindweave.dtypes import resolve_dtype  # noqa: F401  (re-exported)
from bindweave.errors import UserError

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


def _shape(shape: Iterable[int]) -> str:
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
    scale: "_Entry | None" = None  # int8 storage (bindweave.quantize): the per-output-channel scales

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
                f"{path}: corrupt or truncated safetensors file: tensor {key!r} {_shape(shape)} needs bytes "
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
        return cls(_fold_int8_scales(entries, path), path, files)

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
            from bindweave.quantize import dequantize

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
    """Attach each ``<key>@int8_scale`` (bindweave.quantize) to its int8 ``<key>``; check the pair."""
    from bindweave.quantize import SCALE_SUFFIX

    for name in [k for k in entries if k.endswith(SCALE_SUFFIX)]:
        key, scale = name.removesuffix(SCALE_SUFFIX), entries.pop(name)
        values = entries.get(key)
        expected = values.shape[:1] + (1,) * (len(values.shape) - 1) if values is not None else None
        if values is None or values.dtype != torch.int8 or scale.shape != expected or not scale.dtype.is_floating_point:
            raise WeightsError(
                f"{source}: {name} does not fit {key} (expected int8 {key} and float scales of shape {expected}, "
                f"got {values.dtype if values is not None else 'no tensor'} and {scale.dtype} {_shape(scale.shape)}): "
                f"the file is corrupt; export it again."
            )
        values.scale = scale
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
                missing.append(f"{names[0]} {_shape(tensor.shape)}"
                               + (f" (checkpoint key {_source_name(source)!r})" if source else ""))
            continue
        name = chosen[names[0]] = found[0]
        source = sources[name]
        if name not in adapt and _source_shape(checkpoint, source) != tuple(tensor.shape):
            wrong.append(
                f"{checkpoint.file_of(_first(source))}: {_source_name(source)} has shape "
                f"{_shape(_source_shape(checkpoint, source))}, expected {_shape(tensor.shape)}"
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
                                                               f"{_shape(checkpoint.shape(k))}" for k in unexpected])):
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


# ----------------------------------------------------------------------------------------------
# The DiT: every released layout into WanDiT
# ----------------------------------------------------------------------------------------------

DiTFormat = Literal["auto", "bindweave", "diffusers", "wan", "bindweave_release"]
DIT_FORMATS = ("bindweave", "diffusers", "wan", "bindweave_release")
"""Layouts :func:`load_dit` reads: this project's :class:`WanDiT` keys; diffusers'
``WanTransformer3DModel`` (``transformer/``); the official Wan2.1 ``WanModel`` (also with ComfyUI's
``model.diffusion_model.`` prefix); ByteDance's released BindWeave DiT (diffusers keys plus the
``condition_embedder.text_projector`` connector, which belongs to the relational conditioner and is
not part of the DiT)."""

# Checkpoint keys that are known and carry nothing the DiT uses.
_UNUSED_DIT_KEYS = (
    re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.weight$"),  # diffusers I2V: defined, never used in forward
    re.compile(r"^condition_embedder\.text_projector\."),  # BindWeave release: the connector (see bindweave_official)
)


def detect_dit_format(keys: Iterable[str]) -> str:
    """Which of :data:`DIT_FORMATS` a DiT checkpoint's keys are in (by their module names)."""
    keys = set(keys)
    if any(k.startswith("condition_embedder.text_projector.") for k in keys):
        return "bindweave_release"
    if any(k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    stripped = {k.removeprefix("model.diffusion_model.") for k in keys}
    if "blocks.0.self_attn.q.weight" in stripped or "text_embedding.0.weight" in stripped:
        return "wan"
    if "blocks.0.self_attn.to_q.weight" in keys or any(k.startswith("context_embedders.") for k in keys):
        return "bindweave"
    raise WeightsError(
        f"Cannot tell which DiT layout these keys are (e.g. {sorted(keys)[:4]}); expected one of {DIT_FORMATS}. "
        f"Set checkpoint_format explicitly if it is one of them."
    )


def _diffusers_key(key: str, text_branch: str, image_branch: str) -> str | None:
    from bindweave.convert import diffusers_to_bindweave

    try:
        return next(iter(diffusers_to_bindweave({key: None}, text_branch, image_branch)))
    except ValueError:
        return None


def dit_key_map(
    keys: Iterable[str], checkpoint_format: str, text_branch: str = "text", image_branch: str = "image"
) -> tuple[dict[str, str], list[str]]:
    """({our WanDiT key: checkpoint key}, [known checkpoint keys the DiT does not use]).

    Keys with no counterpart are left out, so the strict load reports them as unexpected.
    """
    from bindweave.wan_official import UNSUPPORTED_DIT_KEYS, wan_to_bindweave_key

    sources, ignored = {}, []
    for key in keys:
        for marker, why in UNSUPPORTED_DIT_KEYS.items():
            if key.removeprefix("model.diffusion_model.").startswith(marker):
                raise WeightsError(f"Checkpoint key {key!r}: {why}; BindWeave builds on Wan2.1 T2V/I2V.")
        if any(p.match(key) for p in _UNUSED_DIT_KEYS):
            ignored.append(key)
            continue
        if checkpoint_format == "bindweave":
            target = key
        elif checkpoint_format == "wan":
            target = wan_to_bindweave_key(key, text_branch, image_branch)
        elif checkpoint_format in ("diffusers", "bindweave_release"):
            target = _diffusers_key(key, text_branch, image_branch)
        else:
            raise ValueError(
                f"Unknown DiT checkpoint_format {checkpoint_format!r}; use one of {DIT_FORMATS} or 'auto'.")
        if target is not None:
            sources[target] = key
    return sources, ignored


def _init_new_branch(dit: WanDiT, branch: str, dtype: torch.dtype, device: torch.device | str) -> None:
    """Initialise a branch the checkpoint lacks with WanDiT's rules and a zero value projection, so
    the branch contributes exactly nothing until training moves it (STYLE rule 5)."""
    parts = [dit.context_embedders[branch]] + [block.cross_attn.branches[branch] for block in dit.blocks]
    for part in parts:
        part.to_empty(device=device)
        for module in part.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
    with torch.no_grad():
        for module in dit.context_embedders[branch].modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for block in dit.blocks:
            kv = block.cross_attn.branches[branch]
            nn.init.xavier_uniform_(kv.to_k.weight)
            nn.init.zeros_(kv.to_k.bias)
            nn.init.zeros_(kv.to_v.weight)
            nn.init.zeros_(kv.to_v.bias)
    for part in parts:
        part.to(dtype)


def load_dit(
    dit: WanDiT,
    path: str | Path | Checkpoint,
    checkpoint_format: DiTFormat = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_new_conditions: bool = False,
    text_branch: str = "text",
    image_branch: str = "image",
) -> LoadReport:
    """Load DiT weights of any :data:`DIT_FORMATS` layout into ``dit`` (typically built on meta).

    With ``allow_new_conditions``, a checkpoint with fewer input channels (T2V: 16) and/or without
    some branches (T2V: no ``image``) loads into a wider DiT: the new patch-embedding channels and
    the new branches' value projections are zero, so the loaded model's output is exactly the
    checkpoint's until training moves them. Without it, such a checkpoint is an error.

    Raises:
        WeightsError: missing/unexpected keys or wrong shapes (file, key, expected shape), missing
            shards, corrupt files. Nothing is loaded then.
    """
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    fmt = detect_dit_format(checkpoint.keys()) if checkpoint_format == "auto" else checkpoint_format
    sources, ignored = dit_key_map(checkpoint.keys(), fmt, text_branch, image_branch)
    new_branches = [b for b in dit.branches if not any(k.startswith(f"context_embedders.{b}.") for k in sources)]
    new_prefixes = tuple(f"context_embedders.{b}." for b in new_branches) + tuple(
        f".cross_attn.branches.{b}." for b in new_branches)
    adapt = {}
    patch = sources.get("patch_embedding.weight")
    target = dit.patch_embedding.weight
    if patch in checkpoint:
        have = checkpoint.shape(patch)
        if have[1] < target.shape[1] and (have[0], *have[2:]) == (target.shape[0], *target.shape[2:]):
            adapt["patch_embedding.weight"] = lambda value, target: torch.cat(
                [value, value.new_zeros(value.shape[0], target.shape[1] - value.shape[1], *value.shape[2:])], dim=1)
    if (new_branches or adapt) and not allow_new_conditions:
        details = []
        if adapt:
            details.append(f"{checkpoint.file_of(patch)}: {patch} has shape {_shape(checkpoint.shape(patch))}, "
                           f"expected {_shape(target.shape)} ({checkpoint.shape(patch)[1]} input channels instead of "
                           f"{target.shape[1]})")
        for b in new_branches:
            key = f"blocks.0.cross_attn.branches.{b}.to_k.weight"
            details.append(f"{checkpoint.source}: no weights for the {b!r} branch (e.g. {key} "
                           f"{_shape(dit.state_dict()[key].shape)})")
        raise WeightsError(
            "This DiT checkpoint has fewer conditions than the DiT it is loaded into (a text-to-video DiT where "
            "an image-to-video one is expected?):\n  " + "\n  ".join(details) + "\nUse a checkpoint of the same kind "
            "(e.g. Wan2.1-I2V for in_channels 36 + image branch), or set allow_new_conditions: true to add the new "
            "input channels and branches zero-initialised (the loaded DiT then reproduces the checkpoint's output)."
        )
    want = dtype or target.dtype
    report = load_into(
        dit, checkpoint, sources, dtype=want, device=device,
        allow_missing=lambda name: name.startswith(new_prefixes) or any(p in name for p in new_prefixes),
        ignored=ignored, adapt=adapt,
        hint=f"Checkpoint layout: {fmt}. Check the DiT preset (1.3B: dim 1536, 30 layers; 14B: dim 5120, 40 layers; "
             f"T2V: in_channels 16, text branch; I2V: in_channels 36, text + image branches) against the checkpoint.",
    )
    for b in new_branches:
        _init_new_branch(dit, b, want, device or "cpu")
    if adapt:
        report.fresh.append("patch_embedding.weight (new input channels)")
    assert_materialized(dit, f"DiT from {checkpoint.source}")
    return report


def dit_arguments_from_checkpoint(path: str | Path | Checkpoint) -> dict:
    """:class:`WanDiT` arguments of a DiT checkpoint, read from its tensor shapes.

    The head count is not in the shapes: it comes from the folder's ``config.json`` (official Wan
    ``num_heads`` or diffusers ``num_attention_heads``), else Wan's head size 128 is assumed.
    """
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    sources, _ = dit_key_map(checkpoint.keys(), detect_dit_format(checkpoint.keys()))
    shape = lambda key: checkpoint.shape(sources[key])  # noqa: E731
    dim, in_channels, *patch = shape("patch_embedding.weight")
    branches = [CrossAttentionBranch("text", shape("context_embedders.text.net.0.weight")[1], "mlp")]
    if "context_embedders.image.net.1.weight" in sources:
        branches.append(CrossAttentionBranch("image", shape("context_embedders.image.net.1.weight")[1], "norm_mlp"))
    layers = {int(m.group(1)) for k in sources if (m := re.match(r"blocks\.(\d+)\.", k))}
    num_heads, eps = max(dim // 128, 1), 1e-6
    source = Path(checkpoint.source)
    config_file = (source if source.is_dir() else source.parent) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        num_heads = config.get("num_heads", config.get("num_attention_heads", num_heads))
        eps = config.get("eps", eps)
    return dict(
        in_channels=in_channels, out_channels=shape("head.proj.weight")[0] // math.prod(patch), dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0], num_heads=num_heads, num_layers=len(layers),
        branches=branches, patch_size=tuple(patch), freq_dim=shape("time_embedding.0.weight")[1], eps=eps,
    )


class PretrainedWanDiT(WanDiT):
    """A :class:`WanDiT` whose weights are read from disk as it is built: the factory to name in YAML.

    The model is built on the meta device and every tensor is read straight into place (see
    :func:`load_dit`), onto the current default device (Lightning's ``configure_model`` sets it), in
    ``dtype``. Its state-dict keys are :class:`WanDiT`'s, so checkpoints and exports are unchanged.

    Args:
        pretrained_path: DiT weights: a file, a ``*.safetensors.index.json``, or a folder of shards
            (official Wan2.1 folder, diffusers ``transformer/``, ByteDance/BindWeave, or this project's).
        checkpoint_format: ``auto`` (by key names) or one of ``bindweave``, ``diffusers``, ``wan``,
            ``bindweave_release``.
        allow_new_conditions: load a checkpoint with fewer input channels / branches (T2V into an
            I2V-shaped DiT, BindWeave's 1.3B setup), zero-initialising what is new. Off: that is an error.
        dtype: dtype of the loaded weights (``float32``, ``bfloat16``, ``float16``).
        text_branch: our branch filled by the checkpoint's text key/value stream.
        image_branch: our branch filled by the checkpoint's image key/value stream.
        in_channels: see :class:`WanDiT`; all architecture arguments are checked against the checkpoint.
        out_channels: see :class:`WanDiT`.
        dim: see :class:`WanDiT`.
        ffn_dim: see :class:`WanDiT`.
        num_heads: see :class:`WanDiT` (not visible in the weights: take it from the model's config).
        num_layers: see :class:`WanDiT`.
        branches: see :class:`WanDiT`.
        patch_size: see :class:`WanDiT`.
        freq_dim: see :class:`WanDiT`.
        eps: see :class:`WanDiT`.
    """

    def __init__(
        self,
        pretrained_path: str,
        checkpoint_format: DiTFormat = "auto",
        allow_new_conditions: bool = False,
        dtype: str = "float32",
        text_branch: str = "text",
        image_branch: str = "image",
        in_channels: int = 36,
        out_channels: int = 16,
        dim: int = 1536,
        ffn_dim: int = 8960,
        num_heads: int = 12,
        num_layers: int = 30,
        branches: list[CrossAttentionBranch] | None = None,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        freq_dim: int = 256,
        eps: float = 1e-6,
    ) -> None:
        device = torch.get_default_device()
        with torch.device("meta"):
            super().__init__(in_channels, out_channels, dim, ffn_dim, num_heads, num_layers, branches, patch_size,
                             freq_dim, eps)
        self.load_report = load_dit(
            self, pretrained_path, checkpoint_format, resolve_dtype(dtype),
            None if device.type in ("cpu", "meta") else device, allow_new_conditions, text_branch, image_branch,
        )
