"""Reading checkpoints written before ray-ckpt: Metta ``run:vN.pt`` files, ``{name}.pt`` +
``{name}.json`` pairs, ``{base}.safetensors`` + ``{base}.metrics.json`` bundles and (only when
trusted) whole-model pickles. Formats are detected by extension and contents; loaded files are
kept in a small LRU cache keyed by location, size and modification time.

This module reads files into :class:`LegacyCheckpoint` records and depends on nothing above it;
:func:`ray_ckpt.artifact.load_legacy` turns one into an artifact.
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

from ray_ckpt.architecture import Architecture
from ray_ckpt.errors import CorruptCheckpointError, RayCkptError
from ray_ckpt.format import read_safetensors, read_safetensors_header
from ray_ckpt.layout import parse_step_dir
from ray_ckpt.safejson import JsonObject
from ray_ckpt.storage import Storage
from ray_ckpt.uri import (
    ParsedURI,
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
        return replace(
            self, state_dict=dict(self.state_dict), metrics=dict(self.metrics), metadata=dict(self.metadata)
        )


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

    ``cache=False`` neither uses nor fills the cache (bulk work such as migration).
    """
    storage, name = _split(location, storage_options)
    location = storage.url(name)
    try:
        info = storage.fs.info(storage.full_path(name))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{location}: no such file") from exc
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
    source: Any = local if local is not None else io.BytesIO(storage.read_bytes(name))
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
def find_legacy_files(source: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every legacy checkpoint file at ``source`` (a file, or a directory searched recursively).

    Companion ``.json`` files and files inside ray-ckpt step directories are skipped.
    """
    location = normalize_storage_uri(source)
    storage = Storage(location, storage_options)
    if storage.fs.isfile(storage.root):
        return [location]
    if not storage.fs.isdir(storage.root):
        raise FileNotFoundError(f"{location}: no such file or directory")
    found = []
    for path in sorted(storage.fs.find(storage.root)):
        rel = str(path)[len(storage.root.rstrip("/")) + 1 :]
        parts = rel.split("/")
        if any(p.startswith(".") or parse_step_dir(p) is not None for p in parts):
            continue
        if is_legacy_file_name(parts[-1]):
            found.append(storage.url(rel))
    return found


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
