"""A run on storage: the commit protocol, loading and verification, retention, leases and the
run index. No Ray here: the checkpointer actor and every client go through this class.

Layout (a contract; the CLI, eval workers and other tools read it directly)::

    <storage>/<run>/model_architecture.json
    <storage>/<run>/checkpoints/step_<step:09d>/{model*.safetensors, model.safetensors.index.json,
                                                 trainer_state.safetensors, trainer_state.json,
                                                 checkpoint.json}      # the marker, written LAST
    <storage>/<run>/checkpoints/step_<step:09d>/.retiring          # while retention deletes the step
    <storage>/<run>/index.parquet
    <storage>/<run>/leases/step_<step:09d>.<lease_id>.json
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import math
import pickle
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ray_ckpt.architecture import ARCHITECTURE_FILE, Architecture
from ray_ckpt.config import CheckpointConfig
from ray_ckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
)
from ray_ckpt.format import (
    Checksum,
    FileDigest,
    FlatState,
    HashingWriter,
    SafetensorsHeader,
    ShardSpec,
    TensorBuffer,
    check_structure,
    flatten_state,
    hf_index_bytes,
    index_file_name,
    map_safetensors,
    parse_hf_index,
    plan_shards,
    read_safetensors,
    read_safetensors_header,
    safetensors_layout,
    structure_keys,
    to_tensor,
    unflatten_state,
    write_safetensors,
)
from ray_ckpt.index import CheckpointIndex, CheckpointInfo, rankable
from ray_ckpt.safejson import MAX_STEP, JsonObject, parse_json
from ray_ckpt.storage import Storage, is_temp_name

if TYPE_CHECKING:
    from ray_ckpt.byo import PendingCheckpoint

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LEASES_DIR = "leases"
MARKER_FILE = "checkpoint.json"
EVAL_FILE = "eval_metrics.json"
RETIRING_FILE = ".retiring"  # retention's tombstone: the step is being deleted, no new leases
INDEX_SNAPSHOT = "index.parquet"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"
FORMAT_VERSION = 1
# Shard files written at once on a local disk: concurrent write()+fsync streams keep this VM's disk
# busier than one stream does (direct mode, where each rank writes its own shard, gets the same).
SHARD_WRITERS = 2
_LEASE_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
_STEP_RE = re.compile(r"^step_(\d{9,})$")
_REPLACE_RE = re.compile(r"^\.step_(\d{9,})\.(replace|old)-([0-9a-f]{12})$")  # see staging_dir
MAX_WORLD_SIZE = 2**31 - 1
MANIFEST_KINDS = frozenset({"state_dict", "files"})
_MANIFEST_FIELDS = frozenset(
    ("format_version", "step", "created", "kind", "metrics", "world_size")
    + ("metadata", "model", "trainer_state", "files")
)

Selector = int | str


def step_dir(step: int) -> str:
    """Root-relative directory of a step."""
    return f"{CHECKPOINTS_DIR}/step_{step:09d}"


def staging_dir(step: int, replace_id: str) -> str:
    """Where a save that replaces committed ``step`` (overwrite=True) writes until it is swapped in."""
    return f"{CHECKPOINTS_DIR}/.step_{step:09d}.replace-{replace_id}"


def _retired_dir(step: int, replace_id: str) -> str:
    """Where the old version of a replaced step waits for deletion when no atomic swap exists."""
    return f"{CHECKPOINTS_DIR}/.step_{step:09d}.old-{replace_id}"


def parse_step_dir(name: str) -> int | None:
    """The step of a ``step_<n>`` directory name; None for any other name or a step out of range."""
    match = _STEP_RE.match(name)
    if not match:
        return None
    step = int(match.group(1))
    return step if step <= MAX_STEP else None


def _validate_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step: must be a non-negative integer, got {step!r}")
    if step > MAX_STEP:
        raise ValueError(f"step: must be below 2**63 (steps are int64 in the run index), got {step!r}")
    return int(step)


def _validate_metrics(metrics: Mapping[str, Any] | None, *, what: str = "metrics") -> dict[str, float]:
    """Metrics as plain floats: numpy/torch scalars converted; a value that is no number, or does
    not fit a float (``10**400``), is refused naming the metric."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: metric names must be strings, got {key!r}")
        if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{what}: {key!r} must be a number, got {type(value).__name__} {value!r}")
        try:
            out[key] = float(value)
        except OverflowError:
            raise ValueError(f"{what}: {key!r} = {value} does not fit a float (64-bit)") from None
    return out


def _validate_ttl(ttl_s: Any) -> float:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"lease ttl_s: must be a finite number of seconds > 0, got {ttl_s!r}")
    return float(ttl_s)


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def metrics_to_json(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """Metrics as strict JSON: NaN/inf become the strings "NaN"/"Infinity"/"-Infinity"."""
    return {
        k: v if math.isfinite(v) else ("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity"))
        for k, v in metrics.items()
    }


def metrics_from_json(raw: Any, *, name: str, where: str = "metrics") -> dict[str, float]:
    """Inverse of :func:`metrics_to_json` (also reads bare NaN/Infinity written by older versions).

    CorruptCheckpointError naming the file and the metric for anything but names -> numbers.
    """
    doc = JsonObject(raw, name=name, where=where)
    out: dict[str, float] = {}
    for key, value in doc.items():
        if isinstance(value, str) and value in _NON_FINITE:
            out[key] = _NON_FINITE[value]
        else:
            out[key] = doc.float(key, finite=False)
    return out


def read_metrics_file(data: bytes, *, name: str) -> dict[str, float]:
    """A metrics sidecar (``eval_metrics.json``): one JSON object of names -> numbers."""
    return metrics_from_json(parse_json(data, name=name), name=name, where="")


def _file_name(name: Any) -> str:
    """A file name from a marker: relative, inside the step directory, portable."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        raise ValueError(f"{name!r} is not a relative path inside the step directory")
    return name


@dataclass
class Manifest:
    """The parsed commit marker of a step."""

    step: int
    created: float
    metrics: dict[str, float]
    world_size: int
    metadata: dict[str, Any]
    files: dict[str, FileDigest]
    model: dict[str, Any]
    trainer_state: bool
    kind: str = "state_dict"  # or "files" for bring-your-own-files checkpoints
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json_bytes(self) -> bytes:
        data = {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "created": self.created,
            "kind": self.kind,
            "metrics": metrics_to_json(self.metrics),
            "world_size": self.world_size,
            "metadata": self.metadata,
            "model": self.model,
            "trainer_state": self.trainer_state,
            "files": {name: d.to_json() for name, d in sorted(self.files.items())},
            **self.extra,
        }
        return json.dumps(data, indent=2, default=str).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, *, name: str) -> Manifest:
        """Parse and check a marker: every field's type and range, every file name inside the step.

        Raises CorruptCheckpointError naming the file and the field; nothing else.
        """
        doc = JsonObject.parse(data, name=name)
        version = doc.int("format_version", 0, lo=0)
        if version > FORMAT_VERSION:
            raise doc.error("format_version", f"{version} is newer than this ray-ckpt understands")
        files: dict[str, FileDigest] = {}
        for fname, entry in doc.obj("files").objects():
            try:
                _file_name(fname)
            except ValueError as exc:
                raise doc.error("files", str(exc)) from None
            files[fname] = FileDigest(entry.int("size", lo=0, hi=MAX_STEP), entry.str("checksum"))
        kind = doc.str("kind", "state_dict")
        if kind not in MANIFEST_KINDS:
            raise doc.error("kind", f"{kind!r} is not one of {sorted(MANIFEST_KINDS)}")
        return cls(
            step=doc.int("step", lo=0, hi=MAX_STEP),
            created=doc.float("created"),
            metrics=metrics_from_json(doc.any("metrics") or {}, name=name),
            world_size=doc.int("world_size", 1, lo=1, hi=MAX_WORLD_SIZE),
            metadata=doc.dict("metadata", {}),
            files=files,
            model=_model_record(doc.obj("model", {}), files) if kind == "state_dict" else doc.dict("model", {}),
            trainer_state=doc.bool("trainer_state", False),
            kind=kind,
            extra={k: v for k, v in doc.items() if k not in _MANIFEST_FIELDS},
        )


def _model_record(model: JsonObject, files: Mapping[str, FileDigest]) -> dict[str, Any]:
    """The marker's ``model`` section, checked: its index a listed file, sizes and aliases typed."""
    out = dict(model.raw)
    if model.any("index") is not None:
        index = model.str("index")
        if index not in files:
            raise model.error("index", f"{index!r} is not a file listed in the marker")
        out["index"] = index
    fmt = model.str("format", "safetensors")
    if fmt not in ("safetensors", "pt"):
        raise model.error("format", f"{fmt!r} is not 'safetensors' or 'pt'")
    out["format"] = fmt
    out["total_size"] = model.int("total_size", 0, lo=0, hi=MAX_STEP)
    aliases = model.dict("aliases", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise model.error("aliases", "expected an object of tensor names -> tensor names")
    out["aliases"] = aliases
    try:
        check_structure(model.any("structure"))
    except ValueError as exc:
        raise model.error("structure", str(exc)) from None
    return out


class StepWriter:
    """Writes the files of one step, then commits them with the marker written last.

    Until :meth:`commit` the step directory is invisible to every reader; :meth:`abort` removes it.
    """

    def __init__(self, store: CheckpointStore, step: int, *, overwrite: bool = False) -> None:
        self.store = store
        self.step = step
        self.files: dict[str, FileDigest] = {}
        self.model: dict[str, Any] = {}
        self.trainer_state = False
        self.committed = False
        # Where the files go: the step's own directory, or, when this replaces a committed step
        # (overwrite=True), a staging directory swapped in only once it is committed.
        self.replace_id: str | None = store._prepare_step(step, overwrite=overwrite)
        self.dir = step_dir(step) if self.replace_id is None else staging_dir(step, self.replace_id)

    # -- model shards -------------------------------------------------------------------------
    def plan(self, groups: Iterable[Iterable[tuple[str, int]]]) -> list[ShardSpec]:
        """Shard plan for (key, nbytes) groups, one group per rank (see :func:`plan_shards`)."""
        fmt = self.store.config.checkpoint_format
        prefix, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
        return plan_shards(groups, int(self.store.config.max_shard_size), prefix=prefix, ext=ext)

    def write_shard(self, shard: ShardSpec, buffers: Mapping[str, TensorBuffer]) -> FileDigest:
        """Write one shard file from in-memory buffers (streamed, no extra copy)."""
        config = self.store.config
        digest = write_shard_file(
            self.store.storage, self.dir, shard, buffers, config.checkpoint_format, direct_io=config.direct_io
        )
        self.files[shard.name] = digest
        return digest

    def write_shards(self, shards: list[ShardSpec], buffers: Mapping[str, TensorBuffer]) -> None:
        """Write every shard; on a local disk up to SHARD_WRITERS at once (parallel writes and fsyncs)."""
        if len(shards) < 2 or not self.store.storage.is_local:
            for shard in shards:
                self.write_shard(shard, buffers)
            return
        workers = min(SHARD_WRITERS, len(shards))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ray-ckpt-shard") as pool:
            for future in [pool.submit(self.write_shard, shard, buffers) for shard in shards]:
                future.result()  # the first error; leaving the pool still waits for the other writes

    def add_file(self, name: str, digest: FileDigest) -> None:
        """Record a file some other process wrote into the step directory (direct mode)."""
        self.add_files({name: digest})

    def add_files(self, files: Mapping[str, FileDigest]) -> None:
        """Record files other processes wrote into the step directory (direct mode).

        Each must exist with the reported size (one listing per directory, not a stat per file:
        on an object store that is one request for a thousand ranks' shards); checksums are
        taken as reported.
        """
        by_dir: dict[str, list[str]] = {}
        for name in files:
            by_dir.setdefault(posixpath.dirname(name), []).append(name)
        for sub, names in by_dir.items():
            sizes = self.store.storage.file_sizes(f"{self.dir}/{sub}" if sub else self.dir)
            for name in names:
                size = sizes.get(posixpath.basename(name))
                if size is None:
                    raise CorruptCheckpointError(f"{name}: reported written but missing from {self.dir}", path=name)
                if size != files[name].size:
                    raise CorruptCheckpointError(
                        f"{name}: size {size} differs from the reported {files[name].size}", path=name
                    )
        self.files.update(files)

    def write_model_index(
        self,
        shards: list[ShardSpec],
        total_size: int,
        *,
        structure: Any = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        """Write the HF ``*.index.json`` and remember what the marker says of the model."""
        fmt = self.store.config.checkpoint_format
        name = (
            index_file_name("model", "safetensors") if fmt == "safetensors" else index_file_name("pytorch_model", "bin")
        )
        self._write_small(name, hf_index_bytes(shards, total_size))
        self.model = {
            "format": fmt,
            "index": name,
            "total_size": total_size,
            "structure": structure,
            "aliases": dict(aliases or {}),
        }

    def write_state(self, flat: FlatState) -> None:
        """Plan, write every shard of a flattened state and its index (single-process save)."""
        shards = self.plan([[(k, b.nbytes) for k, b in flat.tensors.items()]])
        self.write_shards(shards, flat.tensors)
        self.write_model_index(shards, flat.total_size, structure=flat.structure, aliases=flat.aliases)

    def write_trainer_state(self, flat: FlatState) -> None:
        """Write trainer_state.safetensors (tensors) + trainer_state.json (structure)."""
        self.files.update(write_trainer_state_files(self.store.storage, self.dir, flat))
        self.trainer_state = True

    def _write_small(self, name: str, data: bytes) -> None:
        self.files[name] = write_small_file(self.store.storage, self.dir, name, data)

    # -- commit -------------------------------------------------------------------------------
    def commit(
        self,
        *,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        world_size: int = 1,
        kind: str = "state_dict",
        extra: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Make the step visible: fsync the directory, then write checkpoint.json last."""
        storage = self.store.storage
        storage.fsync_dir(self.dir)
        manifest = Manifest(
            step=self.step,
            created=time.time(),
            metrics=_validate_metrics(metrics),
            world_size=int(world_size),
            metadata=dict(metadata or {}),
            files=dict(self.files),
            model=self.model,
            trainer_state=self.trainer_state,
            kind=kind,
            extra={
                "policy": self.store.policy(),
                **({"replace_id": self.replace_id} if self.replace_id else {}),
                **dict(extra or {}),
            },
        )
        try:
            json.dumps(manifest.metadata)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata: not JSON serialisable: {exc}") from exc
        storage.write_atomic(f"{self.dir}/{MARKER_FILE}", manifest.to_json_bytes())
        storage.fsync_dir(CHECKPOINTS_DIR)
        if self.replace_id is not None:
            # The new version is complete and committed under its staging name: swap it in.
            # Any crash from here on leaves the old or the new version (see swap_in_replacement).
            swap_in_replacement(storage, self.step, self.replace_id)
            self.dir = step_dir(self.step)
        self.committed = True
        info = self.store._info_from_manifest(manifest)
        self.store._on_commit(info)
        return info

    def abort(self) -> None:
        """Remove everything written for this step (it was never visible)."""
        if not self.committed:
            self.store.storage.rm(self.dir, recursive=True, missing_ok=True)

    def __enter__(self) -> StepWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            try:
                self.abort()
            except OSError as exc:  # e.g. the endpoint is down: keep the save's own error, gc() cleans up later
                logger.warning("could not remove the aborted %s (gc() will): %s", self.dir, exc)


def swap_in_replacement(storage: Storage, step: int, replace_id: str) -> None:
    """Put the committed staging copy of ``step`` in place of the committed old one.

    A crash at any point leaves the old or the new version at the step's path, or the new one
    committed under its staging name, which the next writer start (``gc``) swaps in:
    - local disk: one atomic ``renameat2(RENAME_EXCHANGE)`` of the two directories; where that
      is missing, the old directory is renamed aside, then the new one into place;
    - object store (no renames): the old marker goes first (the step turns invisible), then the
      old objects; the new ones are copied in server-side and the marker is copied last.
    """
    staged, target = staging_dir(step, replace_id), step_dir(step)
    if storage.is_local:
        if storage.exchange(staged, target):
            storage.fsync_dir(CHECKPOINTS_DIR)
            storage.rm(staged, recursive=True, missing_ok=True)  # the old version, now under that name
            return
        old = _retired_dir(step, replace_id)
        if storage.exists(target):
            storage.move(target, old)
        storage.move(staged, target)
        storage.fsync_dir(CHECKPOINTS_DIR)
        storage.rm(old, recursive=True, missing_ok=True)
        return
    marker = f"{staged}/{MARKER_FILE}"
    manifest = Manifest.from_json_bytes(storage.read_bytes(marker), name=marker)
    storage.rm(f"{target}/{MARKER_FILE}", missing_ok=True)
    storage.rm(target, recursive=True, missing_ok=True)
    for name in sorted(manifest.files):
        storage.copy(f"{staged}/{name}", f"{target}/{name}")
    storage.copy(marker, f"{target}/{MARKER_FILE}")
    storage.rm(staged, recursive=True, missing_ok=True)


def write_small_file(storage: Storage, directory: str, name: str, data: bytes) -> FileDigest:
    """Write a small file whole (fsync'd when local) and return its digest."""
    storage.write_bytes(f"{directory}/{name}", data)
    checksum = Checksum()
    checksum.update(data)
    return FileDigest(len(data), checksum.hexdigest())


def write_trainer_state_files(storage: Storage, directory: str, flat: FlatState) -> dict[str, FileDigest]:
    """Write trainer_state.safetensors + trainer_state.json (used by the store and by rank 0 in direct mode)."""
    keys = list(flat.tensors)
    digests = {
        TRAINER_TENSORS: storage.write_stream(
            f"{directory}/{TRAINER_TENSORS}", lambda f: write_safetensors(f, flat.tensors, keys)
        )
    }
    payload = {"format_version": FORMAT_VERSION, "structure": flat.structure, "aliases": flat.aliases}
    digests[TRAINER_JSON] = write_small_file(storage, directory, TRAINER_JSON, json.dumps(payload, indent=1).encode())
    return digests


def write_shard_file(
    storage: Storage,
    directory: str,
    shard: ShardSpec,
    buffers: Mapping[str, TensorBuffer],
    fmt: str = "safetensors",
    *,
    direct_io: bool = True,
) -> FileDigest:
    """Write one shard into ``directory`` (used by the store and by ranks in direct mode).

    With ``direct_io`` a big safetensors shard on a local disk bypasses the page cache."""
    missing = [k for k in shard.keys if k not in buffers]
    if missing:
        raise KeyError(f"{shard.name}: no buffer for keys {missing[:5]}")
    path = f"{directory}/{shard.name}"
    if fmt == "safetensors":
        layout = safetensors_layout(buffers, shard.keys)  # a header no reader could open is refused here
        size = sum(buffers[k].nbytes for k in shard.keys) if direct_io else 0
        return storage.write_stream(
            path, lambda f: write_safetensors(f, buffers, shard.keys, layout=layout), size_hint=size
        )

    def write_pt(f: Any) -> FileDigest:
        out = HashingWriter(f)
        torch.save({k: to_tensor(buffers[k]) for k in shard.keys}, out)
        return FileDigest(out.size, out.checksum.hexdigest())

    return storage.write_stream(path, write_pt)


class CheckpointStore:
    """Checkpoints of one run on one storage: save, load, verify, rank, retain.

    ``CheckpointStore("/data/runs", run_name="run1")`` or ``CheckpointStore(config=cfg)``.
    Keyword options override the config's fields (e.g. ``metric_name="loss"``).
    """

    def __init__(
        self,
        storage_uri: str | None = None,
        run_name: str | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        config: CheckpointConfig | None = None,
        **options: Any,
    ) -> None:
        overrides = dict(options)
        if storage_uri is not None:
            overrides["storage_uri"] = storage_uri
        if run_name is not None:
            overrides["run_name"] = run_name
        if storage_options is not None:
            overrides["storage_options"] = storage_options
        self.config = (
            (config or CheckpointConfig()).replace(**overrides) if overrides else (config or CheckpointConfig())
        )
        base = Storage(self.config.storage_uri, self.config.storage_options)
        self.storage = Storage(posixpath.join(base.uri, self.config.run_name), self.config.storage_options)
        self.index = CheckpointIndex(self.config.metric_name, self.config.mode)
        self._lock = threading.RLock()
        self._snapshot_loaded = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: threading.BoundedSemaphore | None = None
        self._warned: set[str] = set()  # damaged files already reported (one warning each)
        self._writer_started = False  # the first save collects a crashed writer's leftovers

    def __repr__(self) -> str:
        return f"CheckpointStore({self.storage.uri!r})"

    def _ignore_damaged(self, exc: CorruptCheckpointError, what: str) -> None:
        """Log one warning per damaged file that a reader skips, so the rest of the run goes on."""
        key = exc.path or str(exc)
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("run %s: %s; %s", self.run_name, exc, what)

    @property
    def run_name(self) -> str:
        return self.config.run_name

    @property
    def uri(self) -> str:
        return self.storage.uri

    def policy(self) -> dict[str, Any]:
        """The ranking and retention settings, recorded in every commit marker so that any later
        reader (CLI, load_from_uri) ranks and retains as the writer did."""
        cfg = self.config
        return {
            "metric_name": cfg.metric_name,
            "mode": cfg.mode,
            "keep_top_k": cfg.keep_top_k,
            "keep_last_n": cfg.keep_last_n,
            "keep_period": cfg.keep_period,
        }

    def step_uri(self, step: int) -> str:
        return self.storage.url(step_dir(step))

    # -- saving -------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state_dict: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        trainer_state: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> CheckpointInfo:
        """Write a checkpoint and commit it atomically, then apply retention.

        Bad input (a non-tensor object, an empty state dict, a step below the latest without
        ``overwrite``) raises before anything is written.
        """
        step = _validate_step(step)
        flat = flatten_state(state_dict, what="state_dict")
        if not flat.tensors:
            raise ValueError("state_dict: empty (no tensors to save)")
        trainer_flat = flatten_state(trainer_state, what="trainer_state") if trainer_state is not None else None
        checked_metrics = _validate_metrics(metrics)
        started = time.perf_counter()
        with StepWriter(self, step, overwrite=overwrite) as writer:
            writer.write_state(flat)
            if trainer_flat is not None:
                writer.write_trainer_state(trainer_flat)
            info = writer.commit(metrics=checked_metrics, metadata=metadata)
        logger.info(
            "committed step %d of %s: %d bytes in %.3fs",
            step,
            self.run_name,
            info.files_size,
            time.perf_counter() - started,
        )
        self.retain_after_commit(step)
        return info

    def save_async(self, step: int, state_dict: Mapping[str, Any], **kwargs: Any) -> concurrent.futures.Future:
        """Snapshot the state (a CPU copy) and write it on a background thread.

        Returns a Future of the CheckpointInfo. At most ``max_pending_saves`` saves are in flight;
        further calls block (back-pressure) instead of growing memory.
        """
        step = _validate_step(step)
        flat = flatten_state(state_dict, what="state_dict")
        snapshot = _snapshot(state_dict, flat)
        trainer_state = kwargs.pop("trainer_state", None)
        trainer_snapshot = (
            _snapshot(trainer_state, flatten_state(trainer_state, what="trainer_state"))
            if trainer_state is not None
            else None
        )
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ray-ckpt-save")
                self._pending = threading.BoundedSemaphore(self.config.max_pending_saves)
        assert self._pending is not None
        self._pending.acquire()
        try:
            future = self._executor.submit(self.save, step, snapshot, trainer_state=trainer_snapshot, **kwargs)
        except BaseException:
            self._pending.release()
            raise
        future.add_done_callback(lambda _: self._pending.release())  # type: ignore[union-attr]
        return future

    def wait(self) -> None:
        """Block until every async save has finished."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()

    def close(self) -> None:
        """Finish pending async saves and release the writer thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def begin_step(self, step: int, *, overwrite: bool = False) -> StepWriter:
        """A writer for a step whose files are produced piecewise (used by the checkpointer)."""
        return StepWriter(self, _validate_step(step), overwrite=overwrite)

    def begin(
        self, step: int, training_info: Mapping[str, Any] | None = None, run_config: Any = None, **kwargs: Any
    ) -> PendingCheckpoint:
        """A checkpoint whose files the trainer writes itself into ``.path``; invisible until ``.commit()``."""
        from ray_ckpt.byo import PendingCheckpoint

        return PendingCheckpoint(self, step, training_info=training_info, run_config=run_config, **kwargs)

    def _prepare_step(self, step: int, *, overwrite: bool) -> str | None:
        """Check a new step may be written and make its directory; the replace id when it replaces
        a committed step (written in a staging directory; the old one stays until the swap)."""
        self.refresh()
        if not self._writer_started:
            self._writer_started = True
            self.gc(older_than_s=self.config.leftover_grace_s)  # a crashed earlier writer's leftovers
        latest = self.index.latest()
        if not overwrite:
            if step in self.index:
                raise CheckpointExistsError(
                    f"step {step} of run {self.run_name!r} is already committed; pass overwrite=True"
                )
            if latest is not None and step < latest.step:
                raise CheckpointExistsError(
                    f"step {step} is older than the latest committed step {latest.step} of run {self.run_name!r}; "
                    "pass overwrite=True to save it anyway"
                )
        if step in self.index:
            replace_id = uuid.uuid4().hex[:12]
            self.storage.makedirs(staging_dir(step, replace_id))
            return replace_id
        directory = step_dir(step)
        self.storage.rm(directory, recursive=True, missing_ok=True)  # leftovers of a crashed save
        self.storage.makedirs(directory)
        return None

    def _on_commit(self, info: CheckpointInfo) -> None:
        with self._lock:
            self.index.add(info)
            self._write_snapshot()

    # -- reading ------------------------------------------------------------------------------
    def refresh(self) -> CheckpointIndex:
        """Bring the in-memory index up to date with storage (committed markers only)."""
        with self._lock:
            # A snapshot that is missing, unreadable or disagrees with the markers is rewritten.
            stale = not self._load_snapshot() if not self._snapshot_loaded else False
            found = self._committed_steps()
            for step in [s for s in self.index.steps() if s not in found]:
                self.index.remove(step)
                stale = True
            for step in sorted(found - set(self.index.steps())):
                try:
                    self.index.add(self._read_info(step))
                    stale = True
                except (CheckpointNotFoundError, FileNotFoundError):
                    continue  # deleted between listing and reading
                except CorruptCheckpointError as exc:
                    self._ignore_damaged(exc, f"step {step} is skipped")
            self._refresh_eval_metrics(found)
            if stale and (len(self.index) or self.storage.exists(INDEX_SNAPSHOT)):
                self._write_snapshot()
            return self.index

    def _committed_steps(self) -> set[int]:
        steps = set()
        for name in self.storage.list_names(CHECKPOINTS_DIR):
            step = parse_step_dir(name)
            if step is not None and self.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
                steps.add(step)
        return steps

    def _load_snapshot(self) -> bool:
        """Load index.parquet into the index; False when it is missing or unreadable."""
        self._snapshot_loaded = True
        try:
            data = self.storage.read_bytes(INDEX_SNAPSHOT)
            records = CheckpointIndex.records_from_parquet_bytes(data)
            for record in records:
                _check_record(record)
        except FileNotFoundError:
            return False
        except Exception as exc:  # a damaged snapshot is rebuilt from the markers
            logger.warning(
                "index snapshot of %s unreadable (%s); rebuilding from checkpoint.json files", self.run_name, exc
            )
            return False
        for record in records:  # the run may have been copied or moved since the snapshot was written
            record.uri = self.step_uri(record.step)
        self.index.extend(records)
        return True

    def rebuild_index(self) -> CheckpointIndex:
        """Forget the snapshot and rebuild the index from the checkpoint.json files."""
        with self._lock:
            self.index.clear()
            self._snapshot_loaded = True
            self.refresh()
            self._write_snapshot()
            return self.index

    def _write_snapshot(self) -> None:
        try:
            self.storage.write_atomic(INDEX_SNAPSHOT, self.index.to_parquet_bytes())
        except (OSError, StorageError) as exc:  # the snapshot is an optimisation: never fail a commit
            logger.warning("could not write %s: %s", INDEX_SNAPSHOT, exc)

    def _refresh_eval_metrics(self, steps: set[int]) -> None:
        for path in self.storage.glob(f"{CHECKPOINTS_DIR}/step_*/{EVAL_FILE}"):
            step = parse_step_dir(path.split("/")[-2])
            if step not in steps or step not in self.index:
                continue
            try:
                metrics = read_metrics_file(self.storage.read_bytes(path), name=path)
            except FileNotFoundError:
                continue
            except CorruptCheckpointError as exc:
                self._ignore_damaged(exc, "its scores are ignored")
                continue
            info = self.index.get(step)
            if info is not None and any(info.metrics.get(k) != v for k, v in metrics.items()):
                self.index.update_metrics(step, metrics)

    def read_manifest(self, step: int) -> Manifest:
        """The parsed checkpoint.json of a committed step."""
        path = f"{step_dir(step)}/{MARKER_FILE}"
        try:
            data = self.storage.read_bytes(path)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step}") from exc
        manifest = Manifest.from_json_bytes(data, name=f"{step_dir(step)}/{MARKER_FILE}")
        if manifest.step != step:
            raise CorruptCheckpointError(f"{path}: records step {manifest.step}, expected {step}", path=path)
        return manifest

    def _read_info(self, step: int) -> CheckpointInfo:
        info = self._info_from_manifest(self.read_manifest(step))
        info.metrics.update(self._read_eval_metrics(step))
        return info

    def _read_eval_metrics(self, step: int) -> dict[str, float]:
        """A step's eval_metrics.json ({} when absent; a damaged one is ignored with a warning)."""
        path = f"{step_dir(step)}/{EVAL_FILE}"
        try:
            return read_metrics_file(self.storage.read_bytes(path), name=path)
        except FileNotFoundError:
            return {}
        except CorruptCheckpointError as exc:
            self._ignore_damaged(exc, "its scores are ignored")
            return {}

    def _info_from_manifest(self, manifest: Manifest) -> CheckpointInfo:
        return CheckpointInfo(
            step=manifest.step,
            uri=self.step_uri(manifest.step),
            metrics=dict(manifest.metrics),
            created=manifest.created,
            total_size=int(manifest.model.get("total_size", 0)),
            files_size=sum(d.size for d in manifest.files.values()),
            world_size=manifest.world_size,
            metadata=dict(manifest.metadata),
            durability=["local" if self.storage.is_local else "remote"],
        )

    def list(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first."""
        return self.refresh().list()

    def latest(self) -> CheckpointInfo | None:
        return self.refresh().latest()

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        """The best checkpoint by the run's metric (or ``metric``/``mode``); None if none is ranked."""
        if metric is None and self.config.metric_name is None:
            return None  # a run without a metric ranks nothing (instantiate("best") relies on this)
        return self.refresh().best(metric, mode)

    def top_k(self, k: int, metric: str | None = None, mode: str | None = None) -> list[CheckpointInfo]:
        """The ``k`` best checkpoints, best first (missing/NaN/inf metrics are never ranked)."""
        return self.refresh().top_k(k, metric, mode)

    def info(self, step: Selector = "latest") -> CheckpointInfo:
        """The record of one committed checkpoint."""
        return self._read_info(self.resolve(step))

    def resolve(self, selector: Selector) -> int:
        """Turn ``"latest"``, ``"best"``, ``"step_12"``, ``"v12"`` or ``12`` into a committed step."""
        if isinstance(selector, str):
            if selector in ("latest", "best"):
                found = self.latest() if selector == "latest" else self.best()
                if found is None:
                    what = "no checkpoint" if selector == "latest" else "no checkpoint ranked by a finite metric"
                    raise CheckpointNotFoundError(f"run {self.run_name!r} has {what} ({selector!r})")
                return found.step
            match = re.fullmatch(r"(?:step_|v)?(\d+)", selector)
            if not match:
                raise ValueError(f"step selector: expected 'latest', 'best', 'step_N', 'vN' or N, got {selector!r}")
            selector = int(match.group(1))
        return _validate_step(selector)

    def load(
        self,
        step: Selector = "latest",
        keys: Iterable[str] | None = None,
        *,
        verify: bool | None = None,
        mmap: bool = False,
    ) -> dict[str, Any]:
        """Load a checkpoint's state dict (tensors on CPU), or only ``keys`` of it.

        With ``verify_on_load`` every file read whole is checksummed; a mismatch raises
        CorruptCheckpointError naming the file. With ``mmap`` (local storage only) the tensors
        are copy-on-write maps of the files: no copy is made, pages are read when first used and
        shared with other processes mapping the same checkpoint.
        """
        if mmap and not self.storage.is_local:
            raise ValueError(f"mmap=True needs local storage; run {self.run_name!r} is on {self.storage.uri!r}")
        step = self.resolve(step)
        manifest = self.read_manifest(step)
        if manifest.kind != "state_dict":
            raise ValueError(f"step {step} holds trainer-written files (kind {manifest.kind!r}); use its path instead")
        verify = self.config.verify_on_load if verify is None else verify
        with self._unchanged(manifest):
            return self._load_state(manifest, keys, verify, mmap=mmap)

    def _load_state(
        self, manifest: Manifest, keys: Iterable[str] | None, verify: bool, *, mmap: bool = False
    ) -> dict[str, Any]:
        """The tensors of a committed step's model (the body of :meth:`load`)."""
        step, model = manifest.step, manifest.model
        aliases: dict[str, str] = dict(model.get("aliases") or {})
        index_name = model["index"]
        weight_map = self._weight_map(manifest, verify=verify)
        keys = None if keys is None else list(keys)  # any iterable (a generator is read only once)
        wanted = None if keys is None else [aliases.get(k, k) for k in keys]
        if wanted is not None:
            unknown = [k for k in wanted if k not in weight_map]
            if unknown:
                raise KeyError(f"step {step}: no tensors named {unknown[:5]}")
        files: dict[str, list[str] | None] = {}
        for key, fname in weight_map.items():
            if wanted is None or key in wanted:
                files.setdefault(fname, [])
                files[fname].append(key)  # type: ignore[union-attr]
        tensors: dict[str, torch.Tensor] = {}
        for fname, file_keys in files.items():
            whole = wanted is None
            loaded = self._load_shard(
                manifest,
                fname,
                None if whole else file_keys,
                verify=verify and whole,
                fmt=model.get("format", "safetensors"),
                mmap=mmap,
            )
            missing = [k for k in (file_keys or []) if k not in loaded]
            if missing:
                raise CorruptCheckpointError(
                    f"{step_dir(step)}/{fname}: missing tensors {missing[:5]} listed in {index_name}"
                )
            tensors.update({k: loaded[k] for k in file_keys or loaded})
        if wanted is not None:
            return {k: tensors[aliases.get(k, k)] for k in keys}  # type: ignore[union-attr]
        return unflatten_state(tensors, model.get("structure"), aliases)

    def _weight_map(self, manifest: Manifest, *, verify: bool) -> dict[str, str]:
        """The model's index, checked against the marker (the checks load and verify share).

        Every file the index names is a committed file of the step, and every tensor the state's
        structure or its aliases refer to is indexed.
        """
        index_name = manifest.model.get("index")
        directory = step_dir(manifest.step)
        if not index_name:
            raise CorruptCheckpointError(f"{directory}/{MARKER_FILE}: no model index recorded")
        path = f"{directory}/{index_name}"
        weight_map = parse_hf_index(self._read_file(manifest, index_name, verify=verify), name=path)
        for fname in set(weight_map.values()):
            self._file_path(manifest, fname)
        _check_indexed(path, manifest.model.get("structure"), manifest.model.get("aliases") or {}, weight_map)
        return weight_map

    def tensor_headers(self, step: Selector = "latest") -> dict[str, SafetensorsHeader]:
        """The validated safetensors header of every model shard of a step, by file name.

        Only files the step's marker lists are opened, and each header must hold every tensor the
        index maps to it (what ``ray-ckpt inspect`` shows and :meth:`verify` checks).
        """
        manifest = self.read_manifest(self.resolve(step))
        if manifest.model.get("format", "safetensors") != "safetensors":
            raise ValueError(f"step {manifest.step} is in {manifest.model.get('format')!r} format: no headers")
        return self._check_shards(manifest, self._weight_map(manifest, verify=False))

    def file_header(self, step: Selector, name: str) -> SafetensorsHeader:
        """The validated header of one safetensors file the step's marker lists."""
        return self._read_header(self.read_manifest(self.resolve(step)), name)

    def _check_shards(self, manifest: Manifest, weight_map: Mapping[str, str]) -> dict[str, SafetensorsHeader]:
        """Each shard's header (or, for ``pt``, its weights-only contents) holds what the index lists."""
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        headers: dict[str, SafetensorsHeader] = {}
        fmt = manifest.model.get("format", "safetensors")
        for fname, keys in sorted(by_file.items()):
            path = self._file_path(manifest, fname)
            if fmt == "safetensors":
                headers[fname] = self._read_header(manifest, fname)
                present: Iterable[str] = headers[fname].entries
            else:
                present = self._load_shard(manifest, fname, None, verify=False, fmt=fmt)
            missing = [k for k in keys if k not in present]
            if missing:
                raise CorruptCheckpointError(
                    f"{path}: missing tensors {missing[:5]} listed in {manifest.model.get('index')}", path=path
                )
        return headers

    def _read_header(self, manifest: Manifest, name: str) -> SafetensorsHeader:
        path = self._file_path(manifest, name)
        try:
            with self.storage.open_read(path) as f:
                return read_safetensors_header(f, name=path, file_size=manifest.files[name].size)
        except FileNotFoundError as exc:
            raise self._missing(manifest.step, name) from exc

    def _trainer_layout(self, manifest: Manifest, *, verify: bool) -> tuple[Any, dict[str, str]]:
        """trainer_state.json's structure and aliases, checked (a damaged file names itself)."""
        path = f"{step_dir(manifest.step)}/{TRAINER_JSON}"
        doc = JsonObject.parse(self._read_file(manifest, TRAINER_JSON, verify=verify), name=path)
        aliases = doc.dict("aliases", {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
            raise doc.error("aliases", "expected an object of tensor names -> tensor names")
        structure = doc.any("structure")
        try:
            check_structure(structure)
        except ValueError as exc:
            raise doc.error("structure", str(exc)) from None
        return structure, aliases

    def _file_path(self, manifest: Manifest, name: str) -> str:
        if name not in manifest.files:
            raise CorruptCheckpointError(f"{step_dir(manifest.step)}/{name}: not listed in {MARKER_FILE}")
        return f"{step_dir(manifest.step)}/{name}"

    def _read_file(self, manifest: Manifest, name: str, *, verify: bool) -> bytes:
        path = self._file_path(manifest, name)
        try:
            data = self.storage.read_bytes(path)
        except FileNotFoundError as exc:
            raise self._missing(manifest.step, name) from exc
        if verify:
            _check_digest(path, data, manifest.files[name])
        return data

    def _missing(self, step: int, name: str) -> Exception:
        if not self.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            return CheckpointNotFoundError(f"step {step} of run {self.run_name!r} was deleted while being read")
        return CorruptCheckpointError(f"{step_dir(step)}/{name}: missing", path=f"{step_dir(step)}/{name}")

    def _load_shard(
        self,
        manifest: Manifest,
        name: str,
        keys: list[str] | None,
        *,
        verify: bool,
        fmt: str = "safetensors",
        mmap: bool = False,
    ) -> dict[str, torch.Tensor]:
        path = self._file_path(manifest, name)
        expected = manifest.files[name]
        try:
            size = self.storage.size(path)
            if size != expected.size:
                raise CorruptCheckpointError(
                    f"{path}: size {size} differs from the committed {expected.size} (truncated or replaced)", path=path
                )
            if fmt == "pt":
                data = self.storage.read_bytes(path) if verify or not mmap else b""
                if verify:
                    _check_digest(path, data, expected)
                try:
                    source = self.storage.local_path(path) if mmap else io.BytesIO(data)
                    loaded = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
                except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise CorruptCheckpointError(
                        f"{path}: not a weights-only torch file (refused, nothing unpickled beyond tensors): {first}",
                        path=path,
                    ) from exc
                return loaded if keys is None else {k: loaded[k] for k in keys if k in loaded}
            if mmap:
                return map_safetensors(
                    self.storage.local_path(path),
                    name=path,
                    keys=keys,
                    expected_checksum=expected.checksum if verify else None,
                )
            with self.storage.open_read(path) as f:
                return read_safetensors(
                    f, name=path, file_size=size, keys=keys, expected_checksum=expected.checksum if verify else None
                )
        except FileNotFoundError as exc:
            raise self._missing(manifest.step, name) from exc

    def load_trainer_state(self, step: Selector = "latest") -> Any:
        """The trainer state saved with a checkpoint (None if it had none)."""
        step = self.resolve(step)
        manifest = self.read_manifest(step)
        if not manifest.trainer_state:
            return None
        verify = self.config.verify_on_load
        with self._unchanged(manifest):
            structure, aliases = self._trainer_layout(manifest, verify=verify)
            tensors = self._load_shard(manifest, TRAINER_TENSORS, None, verify=verify)
            _check_indexed(f"{step_dir(step)}/{TRAINER_TENSORS}", structure, aliases, tensors)
        return unflatten_state(tensors, structure, aliases)

    @contextlib.contextmanager
    def _unchanged(self, manifest: Manifest) -> Iterator[None]:
        """Fail a read whose step was deleted or replaced while it ran (its files may be a mix).

        A replacement (``overwrite=True``) deletes the marker before any new file appears, so a
        read that saw a new file finds the marker missing or different afterwards. Checked after
        the read, and on a corruption error (a replaced file fails its checksum).
        """
        try:
            yield
        except (CorruptCheckpointError, CheckpointNotFoundError):
            self._check_unchanged(manifest)
            raise
        self._check_unchanged(manifest)

    def _check_unchanged(self, manifest: Manifest) -> None:
        step = manifest.step
        try:
            current = self.read_manifest(step)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"step {step} of run {self.run_name!r} was deleted while being read"
            ) from None
        if (current.created, current.files) != (manifest.created, manifest.files):
            raise CheckpointNotFoundError(
                f"step {step} of run {self.run_name!r} was replaced (overwritten) while being read; load it again"
            )

    def verify(self, step: Selector = "latest") -> CheckpointInfo:
        """Check a checkpoint as strictly as :meth:`load` does, plus every file's checksum.

        Every listed file present with its committed size and checksum; the model index, every
        shard header (dtypes, shapes, offsets) and every tensor the index and the state's structure
        name; the trainer state's structure against its tensors. Streams files (no whole-file
        reads). Raises CorruptCheckpointError naming the first bad file.
        """
        step = self.resolve(step)
        manifest = self.read_manifest(step)
        for name, digest in sorted(manifest.files.items()):
            path = f"{step_dir(step)}/{name}"
            try:
                size = self.storage.size(path)
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(f"{path}: missing", path=path) from exc
            if size != digest.size:
                raise CorruptCheckpointError(f"{path}: size {size} differs from the committed {digest.size}", path=path)
            checksum = Checksum()
            with self.storage.open_read(path) as f:
                while chunk := f.read(16 << 20):
                    checksum.update(chunk)
            if checksum.hexdigest() != digest.checksum:
                raise CorruptCheckpointError(
                    f"{path}: checksum mismatch (expected {digest.checksum}, got {checksum.hexdigest()})", path=path
                )
            if name.endswith(".safetensors"):
                self._read_header(manifest, name)
        if manifest.kind == "state_dict":
            self._check_shards(manifest, self._weight_map(manifest, verify=False))
        if manifest.trainer_state:
            structure, aliases = self._trainer_layout(manifest, verify=False)
            header = self._read_header(manifest, TRAINER_TENSORS)
            _check_indexed(f"{step_dir(step)}/{TRAINER_TENSORS}", structure, aliases, header.entries)
        return self._read_info(step)

    # -- deleting and retention ---------------------------------------------------------------
    def delete(self, step: int) -> None:
        """Delete a checkpoint: the marker first (it turns invisible at once), then the data."""
        step = _validate_step(step)
        directory = step_dir(step)
        self.storage.rm(f"{directory}/{MARKER_FILE}", missing_ok=True)
        if self.storage.is_local and self.storage.exists(directory):
            self.storage.fsync_dir(directory)
        self.storage.rm(directory, recursive=True, missing_ok=True)
        with self._lock:
            if self.index.remove(step) is not None:
                self._write_snapshot()
        logger.info("deleted step %d of %s", step, self.run_name)

    def retention_plan(self, protected: Iterable[int] = ()) -> tuple[list[int], list[int]]:
        """Which steps retention keeps and which it would delete: ``(keep, delete)``."""
        cfg = self.config
        records = self.refresh().list()
        if not records or (cfg.keep_top_k is None and cfg.keep_last_n is None):
            return [r.step for r in records], []
        keep = {records[-1].step} | set(protected)
        if cfg.keep_last_n:
            keep.update(r.step for r in records[-cfg.keep_last_n :])
        if cfg.keep_period:
            keep.update(r.step for r in records if r.step % cfg.keep_period == 0)
        if cfg.keep_top_k and not cfg.metric_name:
            logger.warning(
                "retention: keep_top_k=%d but the run has no metric_name: no step is ever best, "
                "steps are kept only by keep_last_n/keep_period/leases and the latest",
                cfg.keep_top_k,
            )
        if cfg.keep_top_k and cfg.metric_name:
            keep.update(r.step for r in self.index.top_k(cfg.keep_top_k, cfg.metric_name, cfg.mode))
            unranked = [r.step for r in records if rankable(r.metrics.get(cfg.metric_name)) is None]
            if unranked:
                logger.info(
                    "retention: steps %s have no finite %r; they are never best and are kept only by the other rules",
                    unranked,
                    cfg.metric_name,
                )
        all_steps = [r.step for r in records]
        return [s for s in all_steps if s in keep], [s for s in all_steps if s not in keep]

    def apply_retention(self, protected: Iterable[int] | None = None) -> list[int]:
        """Delete the checkpoints no rule keeps; leased steps are protected. Returns the deleted."""
        leased = set(self.leased_steps()) if protected is None else set(protected)
        _, doomed = self.retention_plan(leased)
        deleted = [step for step in doomed if self._retire(step)]
        if deleted:
            logger.info("retention deleted steps %s of %s", deleted, self.run_name)
        return deleted

    def retain_after_commit(self, step: int, protected: Iterable[int] = ()) -> list[int]:
        """Apply retention after ``step`` committed; the deleted steps.

        The save has succeeded at this point, so a failure here (the storage went away) is a
        warning, never the save's error: the next commit retries it.
        """
        try:
            return self.apply_retention(protected=self.leased_steps() | set(protected))
        except (OSError, CorruptCheckpointError) as exc:
            logger.warning("run %s: retention after step %d failed (retried after the next commit): %s",
                           self.run_name, step, exc)
            return []

    def _retire(self, step: int) -> bool:
        """Delete a step retention doomed unless a lease on it appeared meanwhile; True if deleted.

        The leases were read before deciding, and a reader may have leased the step since. So a
        tombstone goes up first and the leases are read again: a lease written before the
        tombstone is seen here (the step is kept), and a reader that leases after it sees the
        tombstone and is refused (see :meth:`acquire_lease`). Either way no granted lease is lost.
        """
        tombstone = f"{step_dir(step)}/{RETIRING_FILE}"
        self.storage.write_bytes(tombstone, b"")
        if step in self.leased_steps():
            self.storage.rm(tombstone, missing_ok=True)
            logger.info("retention kept step %d of %s: it was leased while retention decided", step, self.run_name)
            return False
        self.delete(step)
        return True

    def gc(self, *, dry_run: bool = False, older_than_s: float = 0.0) -> list[str]:
        """Remove leftovers of crashed saves: step dirs without a marker, temp files, expired leases.

        Only a run's writer should call this (an in-progress save looks like a leftover);
        ``older_than_s`` spares recent leftovers. Returns the removed paths.
        """
        removed: list[str] = []
        now = time.time()
        names = self.storage.list_names(CHECKPOINTS_DIR)
        # Replacements first ("replace" sorts before "old"): a finished one may restore a step.
        for name in sorted((n for n in names if _REPLACE_RE.match(n)), key=lambda n: n.split(".")[2]):
            removed += self._recover_replacement(name, now, older_than_s, dry_run)
        for name in names:
            if _REPLACE_RE.match(name):
                continue
            path = f"{CHECKPOINTS_DIR}/{name}"
            step = parse_step_dir(name)
            if step is not None and self.storage.exists(f"{path}/{MARKER_FILE}"):
                for inner in self.storage.list_names(path):
                    if is_temp_name(inner) or inner == RETIRING_FILE:  # a tombstone outlives only a crash
                        removed.append(f"{path}/{inner}")
                continue
            if older_than_s and self._age(path, now) < older_than_s:
                continue
            removed.append(path)
        removed += [n for n in self.storage.list_names("") if is_temp_name(n)]
        removed += [f"{LEASES_DIR}/{n}" for n in self.storage.list_names(LEASES_DIR) if is_temp_name(n)]
        if not dry_run:
            for path in removed:
                self.storage.rm(path, recursive=True, missing_ok=True)
            self.expire_leases()
        if removed:
            logger.info("gc %s %s", "would remove" if dry_run else "removed", removed)
        return removed

    def _recover_replacement(self, name: str, now: float, older_than_s: float, dry_run: bool) -> list[str]:
        """Finish or drop what an interrupted ``overwrite=True`` save left; the paths removed.

        A staging copy committed for this very replacement is swapped in (the save had
        committed it; only the swap was cut short); the old version left aside is removed once
        the step's path holds a committed version again, or moved back if it does not.
        """
        match = _REPLACE_RE.match(name)
        assert match is not None
        step, kind, replace_id = int(match.group(1)), match.group(2), match.group(3)
        path = f"{CHECKPOINTS_DIR}/{name}"
        if older_than_s and self._age(path, now) < older_than_s:
            return []  # a writer may be in the middle of it
        marker = f"{path}/{MARKER_FILE}"
        try:
            manifest: Manifest | None = Manifest.from_json_bytes(self.storage.read_bytes(marker), name=marker)
        except (FileNotFoundError, CorruptCheckpointError):
            manifest = None
        target_committed = self.storage.exists(f"{step_dir(step)}/{MARKER_FILE}")
        if kind == "replace" and manifest is not None and manifest.extra.get("replace_id") == replace_id:
            if not dry_run:
                swap_in_replacement(self.storage, step, replace_id)
                logger.warning("run %s: finished the interrupted replacement of step %d", self.run_name, step)
            return [path]
        if kind == "old" and manifest is not None and not target_committed:
            if not dry_run:
                self.storage.rm(step_dir(step), recursive=True, missing_ok=True)
                self.storage.move(path, step_dir(step))
                logger.warning("run %s: restored step %d from an interrupted replacement", self.run_name, step)
            return [path]
        if not dry_run:
            self.storage.rm(path, recursive=True, missing_ok=True)
        return [path]

    def _age(self, path: str, now: float) -> float:
        """Seconds since anything under ``path`` last changed (inf when unknown).

        A directory counts as young while any file in it is: object stores have no directory
        mtimes, and locally a shard still being streamed does not touch its directory's mtime.
        """
        fs, full = self.storage.fs, self.storage.full_path(path)
        try:
            infos = [fs.info(full)]
            if infos[0].get("type") == "directory":
                infos += list(fs.find(full, withdirs=True, detail=True).values())
        except (OSError, ValueError, TypeError):
            return float("inf")
        times = []
        for info in infos:
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            if isinstance(mtime, (int, float)) and not isinstance(mtime, bool):
                times.append(float(mtime))
        return now - max(times) if times else float("inf")

    # -- leases -------------------------------------------------------------------------------
    def acquire_lease(self, step: int, ttl_s: float, holder: str = "") -> str:
        """Protect a committed step from retention for ``ttl_s`` seconds; returns the lease id."""
        step = _validate_step(step)
        lease_id = uuid.uuid4().hex[:16]
        self._write_lease(step, lease_id, ttl_s, holder)
        # Written first, checked second: retention either sees this lease or we see its tombstone.
        if not self.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            self.release_lease(step, lease_id)
            raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step} to lease")
        if self.storage.exists(f"{step_dir(step)}/{RETIRING_FILE}"):
            self.release_lease(step, lease_id)
            raise CheckpointNotFoundError(f"step {step} of run {self.run_name!r} is being deleted by retention")
        return lease_id

    def renew_lease(self, step: int, lease_id: str, ttl_s: float, holder: str = "") -> None:
        """Push a lease's expiry ``ttl_s`` seconds into the future."""
        self._write_lease(_validate_step(step), lease_id, ttl_s, holder)

    def release_lease(self, step: int, lease_id: str) -> None:
        self.storage.rm(_lease_path(step, lease_id), missing_ok=True)

    def _write_lease(self, step: int, lease_id: str, ttl_s: float, holder: str) -> None:
        path = _lease_path(step, lease_id)
        expires = time.time() + _validate_ttl(ttl_s)
        record = {"step": step, "lease_id": lease_id, "holder": str(holder), "expires": expires}
        self.storage.write_atomic(path, json.dumps(record).encode())

    def _lease_records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every readable lease record with its path; a damaged one is skipped with one warning."""
        for name in self.storage.list_names(LEASES_DIR):
            if is_temp_name(name) or not name.endswith(".json"):
                continue
            path = f"{LEASES_DIR}/{name}"
            try:
                doc = JsonObject.parse(self.storage.read_bytes(path), name=path)
                record = {
                    "step": doc.int("step", lo=0, hi=MAX_STEP),
                    "lease_id": doc.str("lease_id", ""),
                    "holder": doc.any("holder", ""),
                    "expires": doc.float("expires"),
                }
            except FileNotFoundError:
                continue
            except CorruptCheckpointError as exc:
                self._ignore_damaged(exc, "the lease is ignored")
                continue
            yield path, record

    def active_leases(self) -> list[dict[str, Any]]:
        """Lease records that have not expired."""
        now = time.time()
        return [record for _, record in self._lease_records() if record["expires"] > now]

    def leased_steps(self) -> set[int]:
        return {r["step"] for r in self.active_leases()}

    def expire_leases(self) -> int:
        """Delete expired lease records; returns how many."""
        now, removed = time.time(), 0
        for path, record in self._lease_records():
            if record["expires"] <= now:
                self.storage.rm(path, missing_ok=True)
                removed += 1
        return removed

    # -- eval metrics -------------------------------------------------------------------------
    def report_eval(self, step: int, metrics: Mapping[str, Any]) -> CheckpointInfo:
        """Merge evaluation metrics into a committed checkpoint's record (sidecar file)."""
        step = _validate_step(step)
        checked = _validate_metrics(metrics, what="eval metrics")
        with self._lock:
            self.read_manifest(step)
            path = f"{step_dir(step)}/{EVAL_FILE}"
            current = self._read_eval_metrics(step)  # a damaged sidecar is replaced by the scores given
            current.update(checked)
            self.storage.write_atomic(path, json.dumps(metrics_to_json(current), allow_nan=False).encode())
            self.refresh()
            if step in self.index:
                self.index.update_metrics(step, checked)
                self._write_snapshot()
            return self.index.get(step) or self._read_info(step)

    # -- architecture -------------------------------------------------------------------------
    def write_architecture(self, model_or_class_path: Any, config: Any = None) -> Architecture:
        """Write the run's model_architecture.json once; a later call must describe the same class.

        A live model or class (not a string) also trusts its module in this process, so that
        ``instantiate`` allows it with ``allowed_architecture_prefixes=None`` (see
        :mod:`ray_ckpt.architecture`).
        """
        arch = Architecture.describe(model_or_class_path, config)
        try:
            existing = self.read_architecture()
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if existing.class_path != arch.class_path:
                raise ValueError(
                    f"{ARCHITECTURE_FILE}: run {self.run_name!r} already records {existing.class_path!r}, "
                    f"not {arch.class_path!r}"
                )
            return existing
        self.storage.write_atomic(ARCHITECTURE_FILE, arch.to_json_bytes())
        return arch

    def read_architecture(self) -> Architecture:
        """The run's architecture, validated but not imported; FileNotFoundError when none was written."""
        return Architecture.from_json_bytes(self.storage.read_bytes(ARCHITECTURE_FILE))

    def instantiate(self, step: Selector = "best", strict: bool = True) -> torch.nn.Module:
        """Build the model from model_architecture.json and load a checkpoint's weights into it.

        ``step="best"`` falls back to the latest checkpoint when the run ranks by no metric.
        The class is checked against ``allowed_architecture_prefixes`` (None: the defaults plus
        the modules trusted in this process) before any weights are read or anything is called.
        """
        arch = self.read_architecture()
        arch.resolve(self.config.allowed_architecture_prefixes)
        if step == "best" and self.best() is None:
            step = "latest"
        state = self.load(step)
        model = arch.build(self.config.allowed_architecture_prefixes)
        model.load_state_dict(state, strict=strict)
        return model


def _check_record(record: CheckpointInfo) -> None:
    """Refuse a snapshot record whose fields a reader could trip on (the snapshot is then rebuilt)."""
    if not (isinstance(record.step, int) and 0 <= record.step <= MAX_STEP):
        raise ValueError(f"step {record.step!r} out of range")
    if not isinstance(record.metadata, dict) or not isinstance(record.metrics, dict):
        raise ValueError(f"step {record.step}: metadata and metrics must be objects")
    if not all(isinstance(k, str) and isinstance(v, float) for k, v in record.metrics.items()):
        raise ValueError(f"step {record.step}: metrics must map names to numbers")
    if record.world_size < 1 or record.total_size < 0 or record.files_size < 0:
        raise ValueError(f"step {record.step}: negative sizes or world size")


def _lease_path(step: int, lease_id: str) -> str:
    """A lease record's path; the id must be one :meth:`CheckpointStore.acquire_lease` made."""
    if not isinstance(lease_id, str) or not _LEASE_ID_RE.fullmatch(lease_id):
        raise ValueError(f"lease_id: expected an id acquire_lease returned, got {lease_id!r}")
    return f"{LEASES_DIR}/step_{_validate_step(step):09d}.{lease_id}.json"


def _check_indexed(path: str, structure: Any, aliases: Mapping[str, str], present: Iterable[str]) -> None:
    """Every tensor a state's structure or aliases name is in ``present`` (CorruptCheckpointError)."""
    have = set(present)
    needed = set(aliases.values())
    if structure is not None:
        needed.update(aliases.get(k, k) for k in structure_keys(structure))
    missing = sorted(needed - have)
    if missing:
        raise CorruptCheckpointError(f"{path}: tensors {missing[:5]} of the saved state are missing", path=path)


def _check_digest(path: str, data: bytes, digest: FileDigest) -> None:
    if len(data) != digest.size:
        raise CorruptCheckpointError(f"{path}: size {len(data)} differs from the committed {digest.size}", path=path)
    checksum = Checksum()
    checksum.update(data)
    if checksum.hexdigest() != digest.checksum:
        raise CorruptCheckpointError(
            f"{path}: checksum mismatch (expected {digest.checksum}, got {checksum.hexdigest()})", path=path
        )


def _snapshot(state: Mapping[str, Any], flat: FlatState) -> dict[str, Any]:
    """A copy of a state that later in-place training updates cannot change (ties kept)."""
    tensors = {k: to_tensor(TensorBuffer(b.dtype, b.shape, b.data.copy())) for k, b in flat.tensors.items()}
    if flat.structure is None:
        values = {**tensors, **{alias: tensors[target] for alias, target in flat.aliases.items()}}
        return {k: values[k] for k in state}
    return unflatten_state(tensors, flat.structure, flat.aliases)
