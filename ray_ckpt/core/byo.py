"""Bring-your-own-files checkpoints: a two-phase commit for files the trainer writes itself.

``store.begin(step, training_info, run_config)`` hands out a :class:`PendingCheckpoint` whose
``path`` is a local directory; the trainer writes anything there (an HF ``save_pretrained``
folder, a DCP directory, a tokenizer), then ``pending.commit(metrics)`` checksums every file,
uploads them when the store is remote and commits through the store's one protocol
(:class:`~ray_ckpt.core.store.StepWriter`, ``kind="files"``, ``checkpoint.json`` written last), then
applies the store's retention. Until then the step is invisible to every reader.

Where ``path`` lies:

* local store: the step directory itself (``<run>/checkpoints/step_N``), so committing moves
  no bytes; without its ``checkpoint.json`` the directory is invisible (and ``gc`` treats it
  as the leftover of a crashed save, so only a run's writer should call ``gc``).
* remote store (s3://, memory://...): a local staging directory (``tempfile``), uploaded on
  commit and removed afterwards.

Only regular files are checkpointed (empty directories are not recorded); names are relative
to ``path`` with ``/`` separators. ``checkpoint.json`` and ``eval_metrics.json`` at the top
level are reserved for the store. Any trainer layout fits, HF's included:
``model.save_pretrained(pending.path)`` writes ``config.json`` and the weights at the top, and
``from_pretrained(checkpoint_files(store, "best"))`` loads them back. ray-ckpt's own files have
names of their own (as NeMo keeps ``config.yaml`` beside ``training_info.json``):
``training_info.json`` and ``ray_ckpt_run_config.json`` (the ``run_config`` argument;
checkpoints committed before that name existed hold it as ``config.json``, and
:func:`read_run_config` still reads them).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ray_ckpt.core.errors import CorruptCheckpointError
from ray_ckpt.core.format.digests import Checksum, FileDigest
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.layout import EVAL_FILE, MARKER_FILE, Selector, step_dir
from ray_ckpt.core.safejson import JsonObject
from ray_ckpt.core.storage.base import is_temp_name
from ray_ckpt.core.storage.storage import Storage
from ray_ckpt.core.writer import copy_checked

if TYPE_CHECKING:  # annotations only: the store imports this module, never the other way round
    from ray_ckpt.core.store import CheckpointStore
    from ray_ckpt.core.writer import StepWriter

logger = logging.getLogger(__name__)

TRAINING_INFO_FILE = "training_info.json"
RUN_CONFIG_FILE = "ray_ckpt_run_config.json"  # a name of its own: the trainer's config.json is the trainer's
# The run config's name in trainer-written steps committed by versions d53f1b0..46468c3^ (2026-11-23
# to 2026-12-01); kept so read_run_config still reads them.
LEGACY_RUN_CONFIG_FILE = "config.json"
RUN_CONFIG_KEY = "run_config"  # the marker names the run-config file (null: none was given)
FILES_KIND = "files"
_CHUNK = 16 << 20


def _json_safe_scalar(value: Any) -> Any:
    """A one-element tensor/array or numpy scalar as a Python number (as NeMo RL does)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
        return value.item()
    return value


def _plain_training_info(training_info: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if training_info is None:
        return None
    if not isinstance(training_info, Mapping):
        raise TypeError(f"training_info: expected a mapping, got {type(training_info).__name__}")
    info = {str(k): _json_safe_scalar(v) for k, v in training_info.items()}
    try:
        json.dumps(info, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"training_info: not JSON serialisable: {exc}") from exc
    return info


def plain_config(run_config: Any) -> dict[str, Any] | None:
    """A run config (mapping, pydantic model, dataclass or object with to_dict) as plain JSON data."""
    if run_config is None:
        return None
    if hasattr(run_config, "model_dump"):
        data = run_config.model_dump(mode="json")
    elif hasattr(run_config, "to_dict") and not isinstance(run_config, Mapping):
        data = run_config.to_dict()
    elif hasattr(run_config, "__dataclass_fields__"):
        import dataclasses

        data = dataclasses.asdict(run_config)
    elif isinstance(run_config, Mapping):
        data = dict(run_config)
    else:
        raise TypeError(f"run_config: expected a mapping, dataclass or pydantic model, got {type(run_config).__name__}")
    try:
        return json.loads(json.dumps(data))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"run_config: not JSON serialisable: {exc}") from exc


def _numeric_items(data: Mapping[str, Any] | None) -> dict[str, float]:
    """The real-number entries of a mapping (bools excluded)."""
    out: dict[str, float] = {}
    for key, value in (data or {}).items():
        value = _json_safe_scalar(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


def iter_files(root: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """Every regular file under ``root`` as ``(relative name with "/", OS path)``, sorted.

    Our own temporary names (left by an interrupted atomic write) are skipped.
    """
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if is_temp_name(name):
                continue
            full = os.path.join(dirpath, name)
            if not os.path.isfile(full):
                continue
            yield os.path.relpath(full, root).replace(os.sep, "/"), full


def digest_file(path: str, *, fsync: bool = False) -> FileDigest:
    """Size and streamed checksum of a local file; ``fsync`` also makes its bytes durable."""
    checksum = Checksum()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            checksum.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return FileDigest(size, checksum.hexdigest())


def _fsync_tree(root: str) -> None:
    """fsync every directory under ``root`` (new entries become durable), deepest first."""
    for dirpath, _, _ in sorted(os.walk(root), key=lambda t: -t[0].count(os.sep)):
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class PendingCheckpoint:
    """A step whose files the trainer writes into ``path``; invisible until :meth:`commit`.

    As a context manager it aborts when the block raises, and also when the block ends without
    :meth:`commit` having been called (nothing is ever committed implicitly: committing needs
    the trainer's word that every file is complete, and usually its metrics).
    """

    def __init__(
        self,
        store: CheckpointStore,
        step: int,
        *,
        training_info: Mapping[str, Any] | None = None,
        run_config: Any = None,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        staging_dir: str | None = None,
        on_commit: Callable[[CheckpointInfo], None] | None = None,
    ) -> None:
        self.store = store
        self.training_info = _plain_training_info(training_info)
        self.run_config = plain_config(run_config)
        self.metadata = dict(metadata or {})
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata: not JSON serialisable: {exc}") from exc
        self._on_commit = on_commit
        self._writer: StepWriter = store.begin_step(step, overwrite=overwrite)
        self.step = self._writer.step
        self.state = "open"  # -> "committed" | "aborted"
        self.info: CheckpointInfo | None = None
        self._ours: set[str] = set()
        local = store.storage.local_path(self._writer.dir)
        self.remote = local is None
        if local is None:
            local = tempfile.mkdtemp(prefix=f"ray-ckpt-{store.run_name}-step_{self.step:09d}-", dir=staging_dir)
        self.path = Path(local)
        logger.info("began step %d of %s in %s", self.step, store.run_name, self.path)

    def __repr__(self) -> str:
        return f"PendingCheckpoint(step={self.step}, path={str(self.path)!r}, state={self.state!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def uri(self) -> str:
        """Where the step lives (or will live) on the store."""
        return self.store.step_uri(self.step)

    # -- commit / abort -----------------------------------------------------------------------
    def commit(self, metrics: Mapping[str, Any] | None = None) -> CheckpointInfo:
        """Checksum every file under ``path``, upload when remote, write the marker last, apply retention.

        Numeric entries of ``training_info`` are recorded as metrics too (NeMo RL ranks by
        them); ``metrics`` wins on a name clash. If committing fails the checkpoint stays
        pending (invisible): call ``commit`` again or :meth:`abort`.
        """
        if self.state != "open":
            raise RuntimeError(f"step {self.step}: cannot commit a checkpoint that is {self.state}")
        merged = {**_numeric_items(self.training_info), **dict(metrics or {})}
        writer = self._writer
        try:
            self._write_own_files()
            files = list(iter_files(self.path))
            for name, _ in files:
                if "/" not in name and name in _reserved_names():
                    raise ValueError(f"{name}: reserved for the store; use another name or a subdirectory")
            writer.files.clear()
            for name, full in files:
                digest = digest_file(full, fsync=not self.remote)
                if self.remote:
                    self.store.storage.put_file(full, f"{writer.dir}/{name}")
                writer.add_file(name, digest)
            if not self.remote:
                _fsync_tree(str(self.path))
            metadata = dict(self.metadata)
            if self.training_info is not None:
                metadata.setdefault("training_info", self.training_info)
            own_config = RUN_CONFIG_FILE if self.run_config is not None else None
            info = writer.commit(metrics=merged, metadata=metadata, kind=FILES_KIND, extra={RUN_CONFIG_KEY: own_config})
        except BaseException:
            writer.files.clear()
            raise
        self.state = "committed"
        self.info = info
        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)
        logger.info(
            "committed trainer-written step %d of %s: %d files, %d bytes",
            self.step,
            self.store.run_name,
            len(files),
            info.files_size,
        )
        self.store.apply_retention()
        if self._on_commit is not None:
            self._on_commit(info)
        return info

    def _write_own_files(self) -> None:
        for name, data in ((TRAINING_INFO_FILE, self.training_info), (RUN_CONFIG_FILE, self.run_config)):
            if data is None:
                continue
            target = self.path / name
            if target.exists() and name not in self._ours:
                raise ValueError(
                    f"{target}: the trainer wrote {name} itself, which ray-ckpt writes from the "
                    f"{'training_info' if name == TRAINING_INFO_FILE else 'run_config'} argument; "
                    "save your files in a subdirectory (e.g. pending.path / 'policy')"
                )
            target.write_text(json.dumps(data, indent=2))
            self._ours.add(name)

    def abort(self) -> None:
        """Discard everything written for this step; it never becomes visible."""
        if self.state != "open":
            return
        self._writer.abort()
        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)
        self.state = "aborted"
        logger.info("aborted step %d of %s", self.step, self.store.run_name)

    def __enter__(self) -> PendingCheckpoint:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self.state != "open":
            return
        if exc_type is None:
            logger.warning("step %d: left the `with` block without commit(); aborting (nothing committed)", self.step)
        self.abort()


def _reserved_names() -> set[str]:
    return {MARKER_FILE, EVAL_FILE}


def begin_checkpoint(
    store: CheckpointStore,
    step: int,
    training_info: Mapping[str, Any] | None = None,
    run_config: Any = None,
    **kwargs: Any,
) -> PendingCheckpoint:
    """Start a trainer-written checkpoint on ``store`` (see :class:`PendingCheckpoint`)."""
    return PendingCheckpoint(store, step, training_info=training_info, run_config=run_config, **kwargs)


def checkpoint_files(
    store: CheckpointStore, step: Selector = "latest", dest: str | os.PathLike[str] | None = None
) -> Path:
    """A local directory with a trainer-written checkpoint's files, ready for ``from_pretrained``.

    On a local store: the step directory itself (nothing copied). On a remote store: a
    download into ``dest`` (default: a new temporary directory), every file checked against
    its committed size and checksum (CorruptCheckpointError names a bad file).
    """
    step = store.resolve(step)
    manifest = store.read_manifest(step)
    directory = step_dir(step)
    local = store.storage.local_path(directory)
    if local is not None:
        return Path(local)
    if dest is None:
        dest = tempfile.mkdtemp(prefix=f"ray-ckpt-{store.run_name}-step_{step:09d}-")
    target = Path(dest)
    target.mkdir(parents=True, exist_ok=True)
    downloads = Storage(str(target))
    for name, expected in sorted(manifest.files.items()):  # the one checksum-checked copy
        copy_checked(store.storage, f"{directory}/{name}", downloads, name, expected)
    return target


def read_training_info(store: CheckpointStore, step: Selector = "latest") -> dict[str, Any] | None:
    """The training_info.json of a committed step (None when it has none)."""
    step = store.resolve(step)
    found = TRAINING_INFO_FILE in store.read_manifest(step).files
    return _read_own_json(store, step, TRAINING_INFO_FILE if found else None)


def read_run_config(store: CheckpointStore, step: Selector = "latest") -> dict[str, Any] | None:
    """The ``run_config`` a trainer-written step was committed with (None when it had none).

    Read from ``ray_ckpt_run_config.json``; a checkpoint committed before that name existed
    (its marker names no run-config file) holds it as ``config.json``.
    """
    step = store.resolve(step)
    manifest = store.read_manifest(step)
    if RUN_CONFIG_KEY in manifest.extra:
        name = manifest.extra[RUN_CONFIG_KEY]
        if name is not None and name != RUN_CONFIG_FILE:
            raise CorruptCheckpointError(
                f"{step_dir(step)}/{MARKER_FILE}: {RUN_CONFIG_KEY}: {name!r} is not {RUN_CONFIG_FILE!r}",
                path=f"{step_dir(step)}/{MARKER_FILE}",
            )
    else:
        name = LEGACY_RUN_CONFIG_FILE
    return _read_own_json(store, step, name if name in manifest.files else None)


def _read_own_json(store: CheckpointStore, step: int, name: str | None) -> dict[str, Any] | None:
    if name is None:
        return None
    path = f"{step_dir(step)}/{name}"
    return JsonObject.parse(store.storage.read_bytes(path), name=path).raw
