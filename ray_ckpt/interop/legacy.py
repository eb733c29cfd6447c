"""Reading checkpoints written before ray-ckpt: Metta ``run:vN.pt`` files, ``{name}.pt`` +
``{name}.json`` pairs, ``{base}.safetensors`` + ``{base}.metrics.json`` bundles and (only when
trusted) whole-model pickles. Formats are detected by extension and contents; loaded files are
kept in a small LRU cache keyed by location, size and modification time.

This module reads files into :class:`LegacyCheckpoint` records and depends on nothing above it;
:func:`ray_ckpt.interop.artifact.load_legacy` turns one into an artifact.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import posixpath
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ray_ckpt.core.architecture import Architecture, architecture_from_hf_config
from ray_ckpt.core.errors import CorruptCheckpointError, RayCkptError
from ray_ckpt.core.format.header import read_safetensors_header
from ray_ckpt.core.format.safetensors_io import read_safetensors
from ray_ckpt.core.layout import MARKER_FILE as STEP_MARKER_FILE
from ray_ckpt.core.layout import parse_step_dir
from ray_ckpt.core.safejson import JsonObject
from ray_ckpt.core.storage.storage import Storage
from ray_ckpt.core.uri import (
    ParsedURI,
    is_hf_index_name,
    is_legacy_file_name,
    normalize_storage_uri,
    parse_metta_file_name,
    validate_run_name,
)

logger = logging.getLogger(__name__)

FORMAT_METTA = "metta"
FORMAT_PT_JSON = "pt+json"
FORMAT_SAFETENSORS = "safetensors"
FORMAT_PT = "pt"
FORMAT_PICKLE = "pickle"
FORMAT_HF = "hf"  # a Hugging Face model folder, sharded or not (see read_hf_folder)

_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "policy", "agent", "weights", "module")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim")
_STEP_KEYS = ("step", "global_step", "epoch", "agent_step")
_TRAILING_STEP_RE = re.compile(r"^(?P<run>.*?)[-_.]?(?:step|epoch|ep|ckpt|checkpoint|iter|v)?[-_]?(?P<step>\d+)$")


class LegacyFormatError(RayCkptError, ValueError):
    """A file is not a checkpoint format ray-ckpt can read; the message names the file."""


class UntrustedPickleError(RayCkptError, PermissionError):
    """A legacy file holds pickled Python objects and ``trust_pickle=True`` was not given."""


@dataclass
class LegacyCheckpoint:
    """What was read from one legacy checkpoint (before it becomes an artifact or is migrated)."""

    location: str
    format: str
    run_name: str
    step: int
    state_dict: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    trainer_state: Any = None
    architecture: Architecture | None = None
    model: torch.nn.Module | None = None

    def copy(self) -> LegacyCheckpoint:
        """A shallow copy whose containers a caller may change without touching the cached one."""
        return replace(self, state_dict=dict(self.state_dict), metrics=dict(self.metrics), metadata=dict(self.metadata))


class LRUCache:
    """A small thread-safe least-recently-used cache (kept simple: an OrderedDict and a lock)."""

    def __init__(self, maxsize: int = 8) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> Any | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)


_CACHE = LRUCache(maxsize=8)


def legacy_cache() -> LRUCache:
    """The process-wide cache of loaded legacy files (for stats, resizing or clearing)."""
    return _CACHE


# ---------------------------------------------------------------------------------------------
# Detection.
# ---------------------------------------------------------------------------------------------
def _split(location: str, storage_options: dict[str, Any] | None) -> tuple[Storage, str]:
    parent, _, name = location.rstrip("/").rpartition("/")
    return Storage(parent or "/", storage_options), name


def detect_format(location: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """Which legacy format a file is in, from its name, its companions and its first bytes."""
    storage, name = _split(location, storage_options)
    if not is_legacy_file_name(name):
        raise LegacyFormatError(
            f"{location}: not a legacy checkpoint file (expected .pt, .pth, .bin, .ckpt, .safetensors)"
        )
    try:
        with storage.open_read(name) as f:
            head = f.read(8)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{location}: no such file") from exc
    if name.endswith(".safetensors"):
        return FORMAT_SAFETENSORS
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CorruptCheckpointError(
            f"{location}: not a torch checkpoint (neither a zip archive nor a pickle)", path=location
        )
    if parse_metta_file_name(name):
        return FORMAT_METTA
    if storage.exists(_stem(name) + ".json"):
        return FORMAT_PT_JSON
    return FORMAT_PT


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def is_companion_file(name: str) -> bool:
    """Whether a file is the metadata companion of a checkpoint (never a checkpoint itself)."""
    return name.endswith(".json")


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------
def read_legacy(
    location: str, *, storage_options: dict[str, Any] | None = None, trust_pickle: bool = False, cache: bool = True
) -> LegacyCheckpoint:
    """Read one legacy checkpoint file (with its companion metadata), through the LRU cache.

    A directory or an index file is a Hugging Face model folder (:func:`read_hf_folder`); one
    shard of a sharded set is refused (:func:`check_not_a_shard`). ``cache=False`` neither uses
    nor fills the cache (bulk work such as migration).
    """
    storage, name = _split(location, storage_options)
    location = storage.url(name)
    try:
        info = storage.fs.info(storage.full_path(name))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{location}: no such file") from exc
    if info.get("type") == "directory" or is_hf_index_name(name):
        return read_hf_folder(location, storage_options=storage_options)  # many files: not cached
    if name.endswith((".safetensors", ".bin")):
        check_not_a_shard(location, storage_options=storage_options)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created")
    key = (location, int(info.get("size") or 0), str(stamp), bool(trust_pickle))
    cached = _CACHE.get(key) if cache else None
    if cached is not None:
        logger.debug("legacy cache hit for %s", location)
        return cached.copy()
    fmt = detect_format(location, storage_options=storage_options)
    if fmt == FORMAT_SAFETENSORS:
        ckpt = _read_safetensors_bundle(storage, name, location)
    else:
        ckpt = _read_torch_file(storage, name, location, fmt, trust_pickle=trust_pickle)
    if not cache:
        return ckpt
    _CACHE.put(key, ckpt)
    return ckpt.copy()


def _read_json(storage: Storage, name: str) -> dict[str, Any] | None:
    try:
        return JsonObject.parse(storage.read_bytes(name), name=storage.url(name)).raw
    except FileNotFoundError:
        return None


def numeric_leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested mapping, keyed by its ``/``-joined path (metrics from JSON)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numeric_leaves(value, f"{path}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[path] = float(value)
    return out


def _run_and_step(name: str, storage: Storage, explicit_run: Any = None, explicit_step: Any = None) -> tuple[str, int]:
    """Run name and step of a file without a Metta name: metadata first, then the file name."""
    stem = _stem(name)
    if stem.endswith(".metrics"):
        stem = stem[: -len(".metrics")]
    match = _TRAILING_STEP_RE.match(stem)
    run = explicit_run if isinstance(explicit_run, str) and explicit_run else None
    if run is None and match:
        # "model_0100" -> "model"; "ckpt-500" (nothing before the number) -> the directory's name
        run = match.group("run") or posixpath.basename(storage.root.rstrip("/"))
    run = run or stem
    step: int
    if isinstance(explicit_step, (int, float)) and not isinstance(explicit_step, bool) and explicit_step >= 0:
        step = int(explicit_step)
    else:
        step = int(match.group("step")) if match else 0
    return sanitize_run_name(run), step


def sanitize_run_name(name: str) -> str:
    """A valid ray-ckpt run name made from an arbitrary legacy name (bad characters become ``_``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._\-+=@,]", "_", name).replace("..", "_")
    cleaned = cleaned.lstrip("._-+=@,") or "legacy"
    try:
        return validate_run_name(cleaned[:200])
    except ValueError:
        return "legacy"


def _read_safetensors_bundle(storage: Storage, name: str, location: str) -> LegacyCheckpoint:
    size = storage.size(name)
    with storage.open_read(name) as f:
        header = read_safetensors_header(f, name=location, file_size=size)
        f.seek(0)
        tensors = read_safetensors(f, name=location, file_size=size)
    extra = _read_json(storage, _stem(name) + ".metrics.json") or {}
    step_value = next((extra[k] for k in _STEP_KEYS if k in extra), None)
    run, step = _run_and_step(name, storage, extra.get("run_name"), step_value)
    metrics = {k: v for k, v in numeric_leaves(extra).items() if k != "step"}
    metadata: dict[str, Any] = {"legacy_format": FORMAT_SAFETENSORS, "source": location}
    if header.metadata:
        metadata["safetensors_metadata"] = dict(header.metadata)
    return LegacyCheckpoint(location, FORMAT_SAFETENSORS, run, step, dict(tensors), metrics, metadata)


def _torch_load(storage: Storage, name: str, location: str, *, weights_only: bool) -> Any:
    local = storage.local_path(name)
    source: Any = local if local is not None else io.BytesIO(storage.read_bytes(name, limit=None))
    return torch.load(source, map_location="cpu", weights_only=weights_only)


def _read_torch_file(storage: Storage, name: str, location: str, fmt: str, *, trust_pickle: bool) -> LegacyCheckpoint:
    try:
        obj = _torch_load(storage, name, location, weights_only=True)
        pickled = False
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower() and "weights_only" not in str(exc).lower():
            raise _unreadable(location, exc) from exc
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{location}: holds pickled Python objects (e.g. a whole nn.Module) that a weights-only load "
                "refuses; unpickling can run arbitrary code. If you trust this file, pass trust_pickle=True "
                "(CLI: --trust-pickle)"
            ) from None
        logger.warning("loading %s with full unpickling (trust_pickle=True)", location)
        try:
            obj = _torch_load(storage, name, location, weights_only=False)
        except (ModuleNotFoundError, AttributeError) as err:
            raise LegacyFormatError(f"{location}: pickled class cannot be imported here: {err}") from err
        pickled = True
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise _unreadable(location, exc) from exc
    ckpt = _from_loaded(obj, location)
    if pickled and ckpt.model is not None:
        fmt = FORMAT_PICKLE if fmt == FORMAT_PT else fmt
    ckpt.format = fmt
    ckpt.metadata.update({"legacy_format": fmt, "source": location})
    metta = parse_metta_file_name(name)
    if metta is not None:
        ckpt.run_name, ckpt.step = sanitize_run_name(metta[0]), metta[1]
        ckpt.metrics.setdefault("epoch", float(metta[1]))
        return ckpt
    companion = _read_json(storage, _stem(name) + ".json") if fmt == FORMAT_PT_JSON else None
    meta = companion or {}
    step_value = meta.get("epoch", meta.get("agent_step", ckpt.metadata.get("epoch")))
    run_value = meta.get("run_name") or meta.get("run") or ckpt.metadata.get("run_name")
    ckpt.run_name, ckpt.step = _run_and_step(name, storage, run_value, step_value)
    if companion is not None:
        ckpt.metrics.update(numeric_leaves({k: v for k, v in meta.items() if not isinstance(v, Mapping)}))
        if isinstance(meta.get("evals"), Mapping):
            ckpt.metrics.update(numeric_leaves(meta["evals"], "evals/"))
        ckpt.metadata["legacy_metadata"] = meta
    return ckpt


def _unreadable(location: str, exc: BaseException) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{location}: not a readable torch checkpoint ({_first_line(exc)})", path=location)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_tensor_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _from_loaded(obj: Any, location: str) -> LegacyCheckpoint:
    """Split a loaded torch object into weights, trainer state, metrics and metadata."""
    ckpt = LegacyCheckpoint(location, FORMAT_PT, "legacy", 0, {})
    if isinstance(obj, torch.nn.Module):
        _take_module(ckpt, obj)
        return ckpt
    if not isinstance(obj, Mapping):
        raise LegacyFormatError(f"{location}: holds a {type(obj).__name__}, not a state dict or a model")
    if _is_tensor_mapping(obj):
        ckpt.state_dict = dict(obj)
        return ckpt
    rest = dict(obj)
    for key in _WEIGHT_KEYS:
        value = rest.get(key)
        if isinstance(value, torch.nn.Module):
            _take_module(ckpt, value)
            del rest[key]
            break
        if _is_tensor_mapping(value):
            ckpt.state_dict = dict(value)
            del rest[key]
            break
    else:
        ckpt.state_dict = {k: v for k, v in rest.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in rest.items() if k not in ckpt.state_dict}
    if not ckpt.state_dict:
        raise LegacyFormatError(f"{location}: found no model weights (keys: {sorted(map(str, obj))[:10]})")
    for key in _OPTIMIZER_KEYS:
        if isinstance(rest.get(key), Mapping):
            ckpt.trainer_state = {key: rest.pop(key)}
            break
    ckpt.metrics.update(
        {str(k): float(v) for k, v in rest.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )
    for key, value in rest.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            logger.info("%s: dropping non-JSON field %r (%s)", location, key, type(value).__name__)
            continue
        ckpt.metadata[str(key)] = value
    return ckpt


def _take_module(ckpt: LegacyCheckpoint, module: torch.nn.Module) -> None:
    ckpt.state_dict = dict(module.state_dict())
    ckpt.model = module
    try:
        # The class came from a file, not from the caller's code: describing it trusts nothing.
        ckpt.architecture = Architecture.describe(module, trust=False)
    except (TypeError, ValueError):
        klass = type(module)
        ckpt.architecture = Architecture(f"{klass.__module__}.{klass.__qualname__}", {})


# ---------------------------------------------------------------------------------------------
# Finding legacy checkpoints.
# ---------------------------------------------------------------------------------------------
# What transformers.Trainer writes beside the model in a checkpoint-N folder: part of that
# checkpoint, never a checkpoint of its own.
HF_TRAINER_SIDE_FILES = re.compile(
    r"^(?:optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(?:_\d+)?\.pth|training_args\.bin)$"
)


def find_legacy_files(source: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every checkpoint at ``source`` (a file, or a directory searched recursively), in order.

    A Hugging Face model folder is ONE entry (its URL): its shards, index and Trainer side files
    are never listed on their own. Companion ``.json`` files and files inside ray-ckpt step
    directories are skipped.
    """
    location = normalize_storage_uri(source)
    storage = Storage(location, storage_options)
    if storage.fs.isfile(storage.root):
        return [location]
    if not storage.fs.isdir(storage.root):
        raise FileNotFoundError(f"{location}: no such file or directory")
    rels = []
    for path in sorted(storage.fs.find(storage.root)):
        rel = str(path)[len(storage.root.rstrip("/")) + 1 :]
        parts = rel.split("/")
        if any(p.startswith(".") or parse_step_dir(p) is not None for p in parts):
            continue
        rels.append(rel)
    # a folder holding one ray-ckpt step (`ray-ckpt download` writes one: its files and its
    # checkpoint.json) is ONE entry, the folder; nothing inside it is a checkpoint of its own
    steps = sorted({rel.rpartition("/")[0] for rel in rels if rel.rpartition("/")[2] == STEP_MARKER_FILE})
    if "" in steps:
        return [location]
    rels = [rel for rel in rels if not any(rel.startswith(f"{d}/") for d in steps)]
    folders: dict[str, set[str]] = {}  # folder (root-relative, "" for the root) -> its files
    for rel in rels:
        directory, _, name = rel.rpartition("/")
        if directory not in folders and (is_hf_index_name(name) or name in HF_SINGLE_NAMES):
            folder = find_hf_folder(storage.url(directory) if directory else location, storage_options=storage_options)
            if folder is not None:
                folders[directory] = {folder.index or "", *folder.files}
    found = {directory: storage.url(directory) if directory else location for directory in folders}
    found.update({directory: storage.url(directory) for directory in steps})
    for rel in rels:
        directory, _, name = rel.rpartition("/")
        if directory in folders and (
            name in folders[directory] or HF_TRAINER_SIDE_FILES.match(name) or _SHARD_NAME_RE.match(name)
        ):
            continue
        if is_legacy_file_name(name):
            found[rel] = storage.url(rel)
    return [found[key] for key in sorted(found)]


def find_metta_checkpoint(parsed: ParsedURI, *, storage_options: dict[str, Any] | None = None) -> str | None:
    """For a run URI with no ray-ckpt checkpoints: the Metta ``run:vN.pt`` file its selector names.

    Looks in ``<run>/checkpoints/``, ``<run>/`` and beside the run; ``:latest`` (or none) picks
    the highest N. Returns None when there is no such file.
    """
    if parsed.selector == "best":
        return None
    candidates: dict[int, str] = {}
    for directory in (f"{parsed.location}/checkpoints", parsed.location, parsed.storage_uri):
        storage = Storage(directory, storage_options)
        for name in storage.list_names(""):
            metta = parse_metta_file_name(name)
            if metta and metta[0] == parsed.run_name:
                candidates.setdefault(metta[1], storage.url(name))
        if candidates:
            break
    if not candidates:
        return None
    version = max(candidates) if parsed.step is None else parsed.step
    return candidates.get(version)


# ---------------------------------------------------------------------------------------------
# Hugging Face model folders: save_pretrained, huggingface_hub.save_torch_state_dict and DCP's
# HuggingFaceStorageWriter all write <folder>/{model.safetensors | model-XXXXX-of-YYYYY.safetensors
# + model.safetensors.index.json} (or pytorch_model*.bin), with config.json beside them.
# ---------------------------------------------------------------------------------------------
HF_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
HF_TRAINER_STATE = "trainer_state.json"  # transformers.Trainer's checkpoint-N folders
_SHARD_NAME_RE = re.compile(r"^(?P<prefix>.+?)-\d{5}-of-(?P<count>\d{5})\.(?P<ext>safetensors|bin)$")
_INDEX_METADATA_KEYS = ("total_size", "total_parameters")


class PartialCheckpointError(LegacyFormatError):
    """A URI names one shard of a sharded checkpoint; the message names the index to load instead."""


@dataclass
class HFFolder:
    """A Hugging Face model folder found on storage: its weight files and (sharded) its index."""

    location: str  # the folder's URL
    index: str | None  # the index file's name, None for a single weights file
    files: list[str]  # the weight files' names
    sizes: dict[str, int] = field(default_factory=dict)  # every file directly in the folder

    @property
    def total_size(self) -> int:
        return sum(self.sizes.get(name, 0) for name in self.files)


def _read_index(storage: Storage, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """(weight_map, aliases) of an index file; CorruptCheckpointError naming the file if malformed.

    ``aliases`` come from ``huggingface_hub``'s shared-tensor records in the index metadata
    (``{"dropped.name": "kept.name"}``); every file named must be a plain name beside the index.
    """
    where = storage.url(name)
    doc = JsonObject.parse(storage.read_bytes(name), name=where)
    weight_map = doc.dict("weight_map")
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname in ("", ".", ".."):
            raise doc.error("weight_map", f"{key!r}: {str(fname)[:80]!r} is not a file name beside the index")
        if not fname.endswith((".safetensors", ".bin")):
            raise doc.error("weight_map", f"{key!r}: {fname[:80]!r} is not a .safetensors or .bin file")
    metadata = doc.obj("metadata", {})
    aliases = {
        k: v
        for k, v in metadata.items()
        if k not in _INDEX_METADATA_KEYS and isinstance(v, str) and v in weight_map and k not in weight_map
    }
    return weight_map, aliases


def find_hf_folder(location: str, *, storage_options: dict[str, Any] | None = None) -> HFFolder | None:
    """The Hugging Face model folder at ``location`` (a directory URL), or None when it is none.

    An index (``model.safetensors.index.json``, or another ``*.safetensors.index.json`` /
    ``*.bin.index.json``) makes it a sharded folder; else ``model.safetensors`` or
    ``pytorch_model.bin`` a single-file one. One listing of the directory.
    """
    location = normalize_storage_uri(location.rstrip("/"))
    storage = Storage(location, storage_options)
    sizes = storage.file_sizes("")
    if not sizes:
        return None
    indexes = [n for n in HF_INDEX_NAMES if n in sizes] or sorted(n for n in sizes if is_hf_index_name(n))
    if indexes:
        weight_map, _ = _read_index(storage, indexes[0])
        return HFFolder(location, indexes[0], sorted(set(weight_map.values())), sizes)
    for name in HF_SINGLE_NAMES:
        if name in sizes:
            return HFFolder(location, None, [name], sizes)
    return None


def check_not_a_shard(location: str, *, storage_options: dict[str, Any] | None = None) -> None:
    """Refuse one shard of a sharded set (PartialCheckpointError naming the index to load instead).

    A shard is a file named ``<prefix>-XXXXX-of-YYYYY.safetensors`` (YYYYY > 1), or one that an
    index beside it lists. Loading it alone would silently give a part of the model.
    """
    storage, name = _split(location, storage_options)
    sizes = storage.file_sizes("")
    for index in [n for n in HF_INDEX_NAMES if n in sizes] + sorted(
        n for n in sizes if is_hf_index_name(n) and n not in HF_INDEX_NAMES
    ):
        weight_map, _ = _read_index(storage, index)
        files = set(weight_map.values())
        if name in files and len(files) > 1:
            raise PartialCheckpointError(
                f"{location}: one shard of {len(files)} listed in {storage.url(index)}; load the whole "
                f"checkpoint through the index ({storage.url(index)}) or its folder ({storage.url('')})"
            )
    match = _SHARD_NAME_RE.match(name)
    if match and int(match.group("count")) > 1:
        index = f"{match.group('prefix')}.{match.group('ext')}.index.json"
        raise PartialCheckpointError(
            f"{location}: named as one shard of {int(match.group('count'))}, and no index beside it lists "
            f"it; load the whole checkpoint through its index ({storage.url(index)})"
        )


def read_hf_folder(location: str, *, storage_options: dict[str, Any] | None = None) -> LegacyCheckpoint:
    """A Hugging Face model folder (or its index file) as one checkpoint: every shard via the index.

    Tensors are checked against the index (each listed tensor in its file, no file outside the
    folder); ``config.json`` gives the architecture (``transformers.<Class>``, its config class),
    ``generation_config.json`` is kept with it, and a Trainer's ``trainer_state.json`` gives the
    step. Every JSON file and header goes through :mod:`ray_ckpt.core.safejson` (damage raises
    CorruptCheckpointError naming the file).
    """
    location = normalize_storage_uri(location.rstrip("/"))
    _, name = _split(location, storage_options)
    if is_hf_index_name(name):
        folder_location = location.rpartition("/")[0]
        storage = Storage(folder_location, storage_options)
        weight_map, aliases = _read_index(storage, name)
        index: str | None = name
    else:
        folder_location = location
        storage = Storage(folder_location, storage_options)
        folder = find_hf_folder(folder_location, storage_options=storage_options)
        if folder is None:
            raise LegacyFormatError(
                f"{location}: not a Hugging Face model folder (no {' / '.join(HF_INDEX_NAMES + HF_SINGLE_NAMES)})"
            )
        index = folder.index
        weight_map, aliases = _read_index(storage, index) if index is not None else ({}, {})
    files: list[str] = [] if index is not None else folder.files
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {"legacy_format": FORMAT_HF, "source": location}
    by_file: dict[str, list[str]] = {}
    if index is not None:
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        files = sorted(by_file)
        metadata["hf_index"] = index
    for fname in files:
        loaded, file_meta = _read_weights_file(storage, fname)
        wanted = by_file[fname] if index is not None else list(loaded)
        missing = [k for k in wanted if k not in loaded]
        if missing:
            raise CorruptCheckpointError(
                f"{storage.url(fname)}: missing tensors {missing[:5]} listed in {index}", path=storage.url(fname)
            )
        tensors.update({k: loaded[k] for k in wanted})
        if index is None:
            aliases = {k: v for k, v in file_meta.items() if k != "format" and v in loaded and k not in loaded}
    for alias, target in aliases.items():
        tensors.setdefault(alias, tensors[target])
    if not tensors:
        raise LegacyFormatError(f"{location}: holds no tensors")
    config = _read_json(storage, "config.json")
    generation = _read_json(storage, "generation_config.json")
    trainer = _read_json(storage, HF_TRAINER_STATE)
    folder_name = folder_location.rstrip("/").rpartition("/")[2]
    parent = Storage(folder_location.rpartition("/")[0] or "/", storage_options)
    explicit_step = trainer.get("global_step") if trainer else None
    run, step = _run_and_step(folder_name, parent, None, explicit_step)
    ckpt = LegacyCheckpoint(location, FORMAT_HF, run, step, tensors, {}, metadata)
    if config is not None:
        ckpt.architecture = architecture_from_hf_config(config, generation, name=storage.url("config.json"))
        if ckpt.architecture is None:
            metadata["hf_config"] = config
    if trainer:
        history = trainer.get("log_history")
        if isinstance(history, list):
            for entry in history:
                if isinstance(entry, Mapping):
                    ckpt.metrics.update({k: v for k, v in numeric_leaves(entry).items() if k != "step"})
    return ckpt


def _read_weights_file(storage: Storage, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of one weights file of a folder (``.bin``: weights-only load)."""
    where = storage.url(name)
    try:
        if name.endswith(".safetensors"):
            size = storage.size(name)
            with storage.open_read(name) as f:
                header = read_safetensors_header(f, name=where, file_size=size)
                f.seek(0)
                return read_safetensors(f, name=where, file_size=size), dict(header.metadata)
        try:
            loaded = _torch_load(storage, name, where, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            raise _unreadable(where, exc) from exc
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{where}: missing (listed in the folder's index)", path=where) from exc
    if not _is_tensor_mapping(loaded):
        raise CorruptCheckpointError(f"{where}: not a state dict of tensors", path=where)
    return dict(loaded), {}
