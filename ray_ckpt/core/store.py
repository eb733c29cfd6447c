"""A run on storage, as one object: save, query, load, verify, retain, lease, score. No Ray here.

:class:`CheckpointStore` is a facade that does bookkeeping and policy; each role lives in its
own module: :mod:`ray_ckpt.core.layout` (names, the marker), :mod:`ray_ckpt.core.writer` (writing and the
commit protocol), :mod:`ray_ckpt.core.reader` (load, mmap, verify), :mod:`ray_ckpt.core.retention`
(policies), :mod:`ray_ckpt.core.leases`, :mod:`ray_ckpt.core.runindex` (the persisted index).

The store reads the run's index from storage once, when first used, and answers every query from
memory; a store that writes a run keeps that index current itself. A reader that wants other
processes' commits calls :meth:`CheckpointStore.reload` (or passes ``max_staleness_s`` to have
queries reload once the copy is older than that). So saves and queries cost the same storage
requests at step 10 and at step 10,000.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch

from ray_ckpt.core.architecture import ARCHITECTURE_FILE, Architecture, hf_config_files
from ray_ckpt.core.background import BackgroundSaves
from ray_ckpt.core.byo import PendingCheckpoint
from ray_ckpt.core.config import CheckpointConfig, register_consumer
from ray_ckpt.core.errors import CheckpointExistsError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from ray_ckpt.core.format.buffers import TensorBuffer, to_tensor
from ray_ckpt.core.format.header import SafetensorsHeader
from ray_ckpt.core.format.tree import FlatState, flatten_state, unflatten_state
from ray_ckpt.core.hooks import StoreListener
from ray_ckpt.core.index import CheckpointIndex, CheckpointInfo
from ray_ckpt.core.layout import (
    CHECKPOINTS_DIR,
    EVAL_FILE,
    MARKER_FILE,
    TRAINER_TENSORS,
    Manifest,
    Selector,
    metrics_to_json,
    parse_selector,
    staging_dir,
    step_dir,
    validate_metrics,
    validate_step,
)
from ray_ckpt.core.leases import Leases
from ray_ckpt.core.reader import StepReader
from ray_ckpt.core.retention import AnyOf, PreservationPolicy, plan, policy_from_config
from ray_ckpt.core.runindex import RunIndex
from ray_ckpt.core.safejson import DamageLog
from ray_ckpt.core.storage.storage import Storage
from ray_ckpt.core.writer import StepWriter, collect_leftovers, copy_checked

logger = logging.getLogger(__name__)


class Ranked(Protocol):
    """What ``latest``/``best`` selectors are resolved over: a store, a tiered store's union of
    tiers, an eval client's live copy of the master's index."""

    def latest(self) -> CheckpointInfo | None: ...

    def best(self) -> CheckpointInfo | None: ...


# What CheckpointStore reads of a config (check_consumed(by='CheckpointStore')).
# tiering: open_store (ray_ckpt.tiers) gives a store opened from a config with remote_uri its remote tier.
register_consumer("CheckpointStore", {"store", "retention", "tiering"})


class CheckpointStore:
    """Checkpoints of one run on one storage: save, load, verify, rank, retain.

    ``CheckpointStore("/data/runs", run_name="run1")`` or ``CheckpointStore(config=cfg)``.
    Keyword options override the config's fields (e.g. ``metric_name="loss"``).
    ``max_staleness_s``: queries reload the index from storage once it is older than this
    (for readers that follow another process's run; the default, None, never reloads by itself).

    One store handles one storage. A config with ``remote_uri`` is a tiered run: open it with
    :func:`ray_ckpt.open_store` (a :class:`~ray_ckpt.tiers.tiered.TieredCheckpointStore` built
    from two plain stores); this class refuses it. What is composed around a store uses its hooks
    (:mod:`ray_ckpt.core.hooks`): ``listeners`` (told of commits, scores, deletions),
    ``keepers`` (retention policies of steps another tier needs kept) and ``fallback`` (a store to
    read a step from when this one does not hold it).
    """

    def __init__(
        self,
        storage_uri: str | None = None,
        run_name: str | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        config: CheckpointConfig | None = None,
        max_staleness_s: float | None = None,
        **options: Any,
    ) -> None:
        overrides = dict(options)
        if storage_uri is not None:
            overrides["storage_uri"] = storage_uri
        if run_name is not None:
            overrides["run_name"] = run_name
        if storage_options is not None:
            overrides["storage_options"] = storage_options
        base_config = config or CheckpointConfig()
        self.config = base_config.replace(**overrides) if overrides else base_config
        if options:  # a keyword the store ignores (write_mode=..., async_save=...) is an error
            self.config.check_consumed("CheckpointStore", among=options)
        if self.config.remote_uri:
            raise ConfigError(
                f"run {self.config.run_name!r}: remote_uri is set, so the run has two tiers and a "
                "CheckpointStore handles one storage; open it with ray_ckpt.open_store(config) "
                "(a TieredCheckpointStore built from a local and a remote store)"
            )
        base = Storage(self.config.storage_uri, self.config.storage_options)
        self.storage = Storage(posixpath.join(base.uri, self.config.run_name), self.config.storage_options)
        self.index = CheckpointIndex(self.config.metric_name, self.config.mode)
        self.max_staleness_s = max_staleness_s
        self.damaged = DamageLog(logger, self.config.run_name)
        self.reader = StepReader(self.storage, self.config.run_name)
        self.leases = Leases(self.storage, self.config.run_name, self.damaged)
        self.run_index = RunIndex(self.storage, self.reader, self.index, self.damaged, self._info_from_manifest)
        self._lock = threading.RLock()
        self._loaded_at = 0.0
        self._saves = BackgroundSaves(self.config.max_pending_saves)  # save_async's writer thread
        self._writer_started = False  # the first save collects a crashed writer's leftovers
        self._side_files: dict[str, bytes] | None = None  # config.json & co. of the run's architecture
        self._retention_lock = threading.RLock()  # one retention at a time (saves, uploads, scores)
        # The hooks of a composition (see ray_ckpt.core.hooks): told of changes, extra retention
        # keepers, and the store a step is read from when this one does not hold it.
        self.listeners: list[StoreListener] = []
        self.keepers: list[Callable[[], PreservationPolicy]] = []
        self.fallback: CheckpointStore | None = None

    def __repr__(self) -> str:
        return f"CheckpointStore({self.storage.uri!r})"

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
            "keep_checkpoints_without_metrics": cfg.keep_checkpoints_without_metrics,
        }

    def step_uri(self, step: int) -> str:
        return self.storage.url(step_dir(step))

    # -- durability: one storage, so a committed step is as durable as it gets -------------------
    def durable_uri(self, step: int, *, wait: bool = False) -> str:
        """The URI of a committed step's most durable copy: on a plain store, its only one (``wait``
        matters to tiered stores: whether to wait for the upload)."""
        return self.info(step).uri

    def wait_for_uploads(self, timeout: float | None = None, *, raise_on_error: bool = True) -> dict[int, str]:
        """``{step: remote URI}`` of the uploads finished: a plain store uploads nothing, so ``{}``."""
        return {}

    def not_uploaded_steps(self) -> set[int]:
        """Committed steps that must stay until their upload is done: none on a plain store."""
        return set()

    # -- the index ----------------------------------------------------------------------------
    def reload(self) -> CheckpointIndex:
        """Read the run's index from storage again (other processes' commits, deletions, scores).

        Returns the index queries answer from.
        """
        with self._lock:
            self.run_index.load()
            self._loaded_at = time.monotonic()
            self._side_files = None
            return self.index

    def __contains__(self, step: object) -> bool:
        """Whether ``step`` is a committed step (of the index in memory)."""
        return step in self._current()

    @property
    def index_loaded(self) -> bool:
        """Whether the run's index has been read from storage (queries read it on first use)."""
        return self.run_index.loaded

    def current_index(self) -> CheckpointIndex:
        """The index queries answer from, read from storage on first use; changes as the store does."""
        return self._current()

    def eval_metrics(self, step: int) -> dict[str, Any]:
        """The scores evaluators reported for ``step`` (its sidecar file; ``{}`` when none)."""
        return self.run_index.read_eval_metrics(step)

    def _notify(self, event: str, *args: Any) -> None:
        """Tell every listener of a change already recorded; a listener's failure is only logged."""
        for listener in list(self.listeners):
            try:
                getattr(listener, event)(*args)
            except Exception:  # noqa: BLE001 - a listener never fails the change it is told of
                logger.exception("run %s: a store listener failed on %s%s", self.run_name, event, args)

    def _current(self) -> CheckpointIndex:
        """The in-memory index, read from storage on first use (and when older than max_staleness_s)."""
        with self._lock:
            stale = self.max_staleness_s is not None and time.monotonic() - self._loaded_at > self.max_staleness_s
            if not self.run_index.loaded or stale:
                self.reload()
            return self.index

    def rebuild_index(self) -> CheckpointIndex:
        """Forget the snapshot and the log: rebuild the index from the checkpoint.json files."""
        with self._lock:
            self.run_index.forget()
            self.reload()
            self.run_index.compact()
            return self.index

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
        step = validate_step(step)
        flat = flatten_state(state_dict, what="state_dict")
        if not flat.tensors:
            raise ValueError("state_dict: empty (no tensors to save)")
        trainer_flat = flatten_state(trainer_state, what="trainer_state") if trainer_state is not None else None
        checked_metrics = validate_metrics(metrics)
        started = time.perf_counter()
        with StepWriter(self, step, overwrite=overwrite) as writer:
            writer.write_state(flat, trainer_flat)
            info = writer.commit(metrics=checked_metrics, metadata=metadata)
        seconds = time.perf_counter() - started
        deleted = self.retain_after_commit(step)
        # one line per commit (retention's deletions included; they are not logged again)
        logger.info(
            "committed step %d of %s: %d bytes in %.3fs; retention deleted %s",
            step,
            self.run_name,
            info.files_size,
            seconds,
            deleted,
        )
        return info

    def copy_step(
        self,
        source: Storage,
        source_dir: str,
        manifest: Manifest,
        *,
        architecture: bytes | None = None,
        eval_metrics: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        on_chunk: Callable[[int], None] | None = None,
        retain: bool = True,
    ) -> CheckpointInfo:
        """Commit into this run a step whose files ``source`` holds under ``source_dir`` (another
        run's step directory, or a step folder ``ray-ckpt download`` wrote), as it was committed there.

        Same step number, metrics, metadata, world size, model index and trainer state (from
        ``manifest``, that step's parsed marker); every file is copied with its committed size and
        checksum checked (:func:`~ray_ckpt.core.writer.copy_checked`: a damaged file is never passed on)
        and the marker is written last. ``architecture`` (the source run's
        ``model_architecture.json``) is written when this run records none, and must name the
        same class when it does; ``eval_metrics`` (its evaluators' scores) join the step's record.
        With ``retain`` retention runs afterwards, as after a save (an uploader retains itself).
        The one step copy: ``ray-ckpt`` copies and uploads, and a tiered store's uploads.
        """
        if architecture is not None:
            theirs = Architecture.from_json_bytes(architecture, name=source.url(ARCHITECTURE_FILE))
            try:
                ours = self.read_architecture()
            except FileNotFoundError:
                ours = None
            if ours is None:
                self.storage.write_atomic(ARCHITECTURE_FILE, architecture)
                self._side_files = None
            elif ours.class_path != theirs.class_path:
                raise ValueError(
                    f"{ARCHITECTURE_FILE}: run {self.run_name!r} records {ours.class_path!r}, the copied step's run "
                    f"{theirs.class_path!r}; copy it into another run"
                )
        step = validate_step(manifest.step)
        with StepWriter(self, step, overwrite=overwrite) as writer:
            for name, digest in sorted(manifest.files.items()):
                copy_checked(source, f"{source_dir}/{name}", self.storage, f"{writer.dir}/{name}", digest,
                             on_chunk=on_chunk)  # fmt: skip
            writer.add_files(manifest.files)  # every file there with its size (one listing per directory)
            writer.adopt_records(manifest)
            info = writer.commit(
                metrics=manifest.metrics,
                metadata=manifest.metadata,
                world_size=manifest.world_size,
                kind=manifest.kind,
                extra=manifest.extra,
            )
        if eval_metrics:
            info = self.report_eval(step, eval_metrics, retain=False)
        deleted = self.retain_after_commit(step) if retain else []
        logger.info("copied step %d from %s into %s; retention deleted %s", step, source.url(source_dir), self.uri,
                    deleted)  # fmt: skip
        return info

    def save_async(self, step: int, state_dict: Mapping[str, Any], **kwargs: Any) -> concurrent.futures.Future:
        """Snapshot the state (a CPU copy) and write it on a background thread.

        Returns a Future of the CheckpointInfo. At most ``max_pending_saves`` saves are in flight;
        further calls block (back-pressure) instead of growing memory.
        """
        step = validate_step(step)
        flat = flatten_state(state_dict, what="state_dict")
        snapshot = _snapshot(state_dict, flat)
        trainer_state = kwargs.pop("trainer_state", None)
        trainer_snapshot = (
            _snapshot(trainer_state, flatten_state(trainer_state, what="trainer_state"))
            if trainer_state is not None
            else None
        )
        return self._saves.submit(self.save, step, snapshot, trainer_state=trainer_snapshot, **kwargs)

    def wait(self) -> None:
        """Block until every async save has finished."""
        self._saves.wait()

    def close(self, *, wait: bool = True) -> None:
        """Finish pending async saves and release the writer thread (``wait`` matters to tiered
        stores: whether their uploads are finished or cut short)."""
        self._saves.shutdown()

    def begin_step(self, step: int, *, overwrite: bool = False) -> StepWriter:
        """A writer for a step whose files are produced piecewise (used by the checkpointer)."""
        return StepWriter(self, validate_step(step), overwrite=overwrite)

    def begin(
        self, step: int, training_info: Mapping[str, Any] | None = None, run_config: Any = None, **kwargs: Any
    ) -> PendingCheckpoint:
        """A checkpoint whose files the trainer writes itself into ``.path``; invisible until ``.commit()``."""
        return PendingCheckpoint(self, step, training_info=training_info, run_config=run_config, **kwargs)

    def prepare_step(self, step: int, *, overwrite: bool) -> str | None:
        """Check a new step may be written and make its directory (a StepWriter calls this).

        Returns the replace id when the save replaces a committed step: it is written in a staging
        directory and the old version stays until the new one is committed and swapped in.
        """
        with self._lock:
            index = self._current()
            if not self._writer_started:
                self._writer_started = True
                self.gc(older_than_s=self.config.leftover_grace_s)  # a crashed earlier writer's leftovers
                if self.run_index.markers_read > 0:
                    self.run_index.compact()  # the next open reads one snapshot, not every marker
                self._notify("writer_started")  # e.g. uploads a crashed or restarted writer left unfinished
            else:
                self.run_index.sync()  # scores and leases other processes added (one listing)
            latest = index.latest()
            if not overwrite:
                if step in index:
                    raise CheckpointExistsError(
                        f"step {step} of run {self.run_name!r} is already committed; pass overwrite=True"
                    )
                if latest is not None and step < latest.step:
                    raise CheckpointExistsError(
                        f"step {step} is older than the latest committed step {latest.step} of run "
                        f"{self.run_name!r}; pass overwrite=True to save it anyway"
                    )
            if step in index:
                replace_id = uuid.uuid4().hex[:12]
                self.storage.makedirs(staging_dir(step, replace_id))
                return replace_id
            directory = step_dir(step)
            self.storage.rm(directory, recursive=True, missing_ok=True)  # leftovers of a crashed save
            self.storage.makedirs(directory)
            return None

    def record_commit(self, manifest: Manifest) -> CheckpointInfo:
        """Add a just-committed step to the index (a StepWriter calls this); its record."""
        info = self._info_from_manifest(manifest)
        with self._lock:
            self._current()
            self.run_index.commit(info)
        self._notify("committed", info)  # e.g. queue the upload; the caller returns at local speed
        return info

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

    # -- queries (memory only) ----------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first."""
        with self._lock:
            return self._current().list()

    def latest(self) -> CheckpointInfo | None:
        return self._current().latest()

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        """The best checkpoint by the run's metric (or ``metric``/``mode``); None if none is ranked."""
        if metric is None and self.config.metric_name is None:
            return None  # a run without a metric ranks nothing (instantiate("best") relies on this)
        return self._current().best(metric, mode)

    def top_k(self, k: int, metric: str | None = None, mode: str | None = None) -> list[CheckpointInfo]:
        """The ``k`` best checkpoints, best first (missing/NaN/inf metrics are never ranked)."""
        return self._current().top_k(k, metric, mode)

    def info(self, step: Selector = "latest") -> CheckpointInfo:
        """The record of one committed checkpoint (read from its marker when the index lacks it;
        from the ``fallback`` store when this one does not hold it)."""
        step = self.resolve(step)
        found = self._current().get(step)
        if found is not None:
            return found
        tier, manifest = self._tier_with(step)
        info = tier._info_from_manifest(manifest)
        info.metrics.update(tier.eval_metrics(step))
        return info

    def resolve(
        self, selector: Selector | None = "latest", *, fallback_to_latest: bool = False, over: Ranked | None = None
    ) -> int:
        """Turn ``"latest"`` (or None), ``"best"``, ``"step_12"``, ``"v12"`` or ``12`` into a step.

        The one resolver of step selectors (URIs, the CLI, the managers and loaders all come
        here). ``fallback_to_latest``: ``"best"`` of a run that ranks nothing (no metric, or no
        finite value of it yet) means the latest step. Without it, ``"best"`` of a run without
        ``metric_name`` is a ConfigError (there is no ranking to ask; pass a metric), and of a
        ranked run without a finite score a CheckpointNotFoundError. ``over`` resolves
        ``latest``/``best`` over another view of the run (a tiered store's tiers, an eval
        client's copy of the master's index) instead of this store's index.
        """
        ranked: Ranked = self if over is None else over
        if selector is None:
            selector = "latest"
        if isinstance(selector, str):
            parsed = parse_selector(selector)
            if parsed is None:
                raise ValueError(f"step selector: expected 'latest', 'best', 'step_N', 'vN' or N, got {selector!r}")
            if parsed == "best" and self.config.metric_name is None and not fallback_to_latest:
                raise ConfigError(
                    f"run {self.run_name!r} records no ranking metric, so it has no 'best' checkpoint; "
                    "pass a metric (metric_name=..., CLI: --metric NAME)"
                )
            if parsed in ("latest", "best"):
                found = ranked.best() if parsed == "best" and self.config.metric_name else None
                if parsed == "latest" or (found is None and fallback_to_latest):
                    found = ranked.latest()
                if found is None:
                    what = "no checkpoint" if parsed == "latest" else "no checkpoint ranked by a finite metric"
                    raise CheckpointNotFoundError(f"run {self.run_name!r} has {what} ({parsed!r})")
                return found.step
            selector = parsed
        return validate_step(selector)

    # -- reading ------------------------------------------------------------------------------
    def read_manifest(self, step: int) -> Manifest:
        """The parsed checkpoint.json of a committed step (of this store's storage)."""
        return self.reader.read_manifest(step)

    def store_for(self, step: int) -> CheckpointStore:
        """The plain store to read ``step`` from: this one when it holds the step, else its ``fallback``'s."""
        return self._tier_with(step)[0]

    def _tier_with(self, step: int) -> tuple[CheckpointStore, Manifest]:
        """The store to read ``step`` from and its marker: this store's storage, else the fallback's."""
        try:
            return self, self.read_manifest(step)
        except CheckpointNotFoundError:
            if self.fallback is None:
                raise
        try:
            return self.fallback._tier_with(step)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step} on any tier") from None

    def _read(self, step: int, read: Callable[[CheckpointStore, Manifest], Any]) -> Any:
        """``read(store, marker)`` from whichever store holds ``step``: this one first, the
        ``fallback`` when this copy is missing (or goes while it is read)."""
        tier, manifest = self._tier_with(step)
        try:
            return read(tier, manifest)
        except CheckpointNotFoundError:
            if self.fallback is None or tier is not self:
                raise
            logger.info("step %d of %s went from %s while being read; reading %s", step, self.run_name, self.uri,
                        self.fallback.uri)  # fmt: skip
            tier, manifest = self.fallback._tier_with(step)
            return read(tier, manifest)

    def load(
        self,
        step: Selector = "latest",
        keys: Iterable[str] | None = None,
        *,
        verify: bool | None = None,
        mmap: bool = False,
        into: Mapping[str, Any] | None = None,
    ) -> Any:
        """Load a checkpoint's state dict (tensors on CPU), or only ``keys`` of it.

        With ``verify_on_load`` (or ``verify``) every byte returned, ``into=`` included, is checked
        against the digests recorded when it was written; a mismatch raises CorruptCheckpointError
        naming the file (and the tensor and byte range). ``verify=False`` is the explicit way to
        skip it. With ``mmap`` (local storage only) the tensors
        are copy-on-write maps of the files: no copy is made, pages are read when first used and
        shared with other processes mapping the same checkpoint. With ``into`` (a state dict of
        tensors, DTensors or Shards, e.g. ``model.state_dict()`` of any world size and placement)
        the given tensors are filled in place, each with only the bytes of its own box, and
        ``into`` is returned.
        """
        verify = self.config.verify_on_load if verify is None else verify
        if into is not None:
            if keys is not None or mmap:
                raise ValueError("into= fills the given tensors: pass neither keys nor mmap with it")
            self._read(self.resolve(step), lambda tier, manifest: tier.reader.load_into(manifest, into, verify=verify))
            return into
        if mmap and not self.storage.is_local:
            raise ValueError(f"mmap=True needs local storage; run {self.run_name!r} is on {self.storage.uri!r}")
        keys = None if keys is None else list(keys)  # read again if the remote copy is read after all
        # a step only an object-store tier holds is read into memory (mmap needs a local file)
        return self._read(
            self.resolve(step),
            lambda tier, manifest: tier.reader.load(manifest, keys, verify=verify, mmap=mmap and tier.storage.is_local),
        )

    def load_trainer_state(self, step: Selector = "latest", *, into: Mapping[str, Any] | None = None) -> Any:
        """The trainer state saved with a checkpoint (None if it had none).

        With ``into`` (e.g. the optimizer state dict from ``get_state_dict``, DTensors included)
        its tensors are filled in place, resharded to their placements, and ``into`` is returned.
        """
        verify = self.config.verify_on_load
        if into is not None:
            self._read(
                self.resolve(step),
                lambda tier, manifest: tier.reader.load_into(manifest, into, trainer=True, verify=verify),
            )
            return into
        return self._read(
            self.resolve(step), lambda tier, manifest: tier.reader.load_trainer_state(manifest, verify=verify)
        )

    def verify(self, step: Selector = "latest") -> CheckpointInfo:
        """Check a checkpoint as strictly as :meth:`load` does, plus every file's checksum.

        Raises CorruptCheckpointError naming the first bad file. The copy checked is the one
        :meth:`load` reads (the ``fallback``'s when this store does not hold the step).
        """
        step = self.resolve(step)
        self._read(step, lambda tier, manifest: tier.reader.verify(manifest))
        return self.info(step)

    def tensor_headers(self, step: Selector = "latest") -> dict[str, SafetensorsHeader]:
        """The validated safetensors header of every model shard of a step, by file name.

        Only files the step's marker lists are opened, and each header must hold every tensor the
        index maps to it (what ``ray-ckpt inspect`` shows and :meth:`verify` checks).
        """
        return self._read(self.resolve(step), lambda tier, manifest: tier.reader.tensor_headers(manifest))

    def file_header(self, step: Selector, name: str) -> SafetensorsHeader:
        """The validated header of one safetensors file the step's marker lists."""
        return self._read(self.resolve(step), lambda tier, manifest: tier.reader.file_header(manifest, name))

    # -- deleting and retention ---------------------------------------------------------------
    def delete(self, step: int) -> None:
        """Delete a checkpoint: the marker first (it turns invisible at once), then the data."""
        step = validate_step(step)
        self._delete_local(step)
        self._notify("deleted", [step])

    def _delete_local(self, step: int) -> None:
        """Delete the copy of ``step`` on this store's storage.

        The index records the deletion first, then the marker goes (the step turns invisible), then
        the data: killed in between, the next open finds the step intact (its marker still there,
        read back from the listing) or gone, never listed without a marker.
        """
        directory = step_dir(step)
        with self._lock:
            if self.run_index.loaded:
                self.run_index.delete(step)
        self.storage.rm(f"{directory}/{MARKER_FILE}", missing_ok=True)
        if self.storage.is_local and self.storage.exists(directory):
            self.storage.fsync_dir(directory)
        self.storage.rm(directory, recursive=True, missing_ok=True)
        logger.debug("deleted step %d of %s", step, self.run_name)

    def retention_plan(self, protected: Iterable[int] = ()) -> tuple[list[int], list[int]]:
        """Which steps retention keeps and which it would delete: ``(keep, delete)``.

        The config's rules, ``protected`` and what the ``keepers`` keep (e.g. a step not yet uploaded).
        """
        policy = policy_from_config(self.config, protected)
        if self.keepers:
            policy = AnyOf((policy, *(keeper() for keeper in self.keepers)))
        return plan(self._current(), policy)

    def apply_retention(self, protected: Iterable[int] | None = None) -> list[int]:
        """Delete the checkpoints no rule keeps; leased steps are protected. Returns the deleted.

        The hook for anything that changes what the rules keep outside a commit or a score (a
        finished upload of a tiered store, an operator's ``ray-ckpt retention --apply``).
        """
        leased = self.leased_steps() if protected is None else set(protected)
        return self._retain(leased)

    def _retain(self, protected: set[int]) -> list[int]:
        """Delete the copies no rule keeps (``protected`` kept); the deleted steps."""
        with self._retention_lock:
            _, doomed = self.retention_plan(protected)
            deleted = [step for step in doomed if self.leases.retire(step, self._delete_local)]
        if deleted:  # the caller's line reports them (a commit's, an operator's): debug here
            logger.debug("retention deleted steps %s of %s", deleted, self.run_name)
            self._notify("deleted", deleted)
        return deleted

    def retain_after_commit(self, step: int, protected: Iterable[int] = ()) -> list[int]:
        """Apply retention after ``step`` committed; the deleted steps.

        The save has succeeded at this point, so a failure here (the storage went away) is a
        warning, never the save's error: the next commit retries it.
        """
        try:
            return self._retain(self.leases.leased_steps() | set(protected))
        except (OSError, CorruptCheckpointError) as exc:
            logger.warning(
                "run %s: retention after step %d failed (retried after the next commit): %s", self.run_name, step, exc
            )
            return []

    def retain_after(self, event: str, protected: Iterable[int] = ()) -> list[int]:
        """Apply retention after ``event`` changed what it may keep (a score, a lease's end); the deleted.

        Cheap when nothing would go: the plan is made in memory first (protection only ever adds
        kept steps), and the leases are listed only when some step is doomed. Like
        :meth:`retain_after_commit`, a storage failure is a warning, never the event's error.
        """
        return retain_after_event(self, event, protected)

    def gc(self, *, dry_run: bool = False, older_than_s: float = 0.0) -> list[str]:
        """Remove leftovers of crashed saves: step dirs without a marker, temp files, expired leases.

        Only a run's writer should call this (an in-progress save looks like a leftover);
        ``older_than_s`` spares recent leftovers. Returns the removed paths.
        """
        removed = collect_leftovers(self.storage, self.run_name, dry_run=dry_run, older_than_s=older_than_s)
        if not dry_run:
            self.leases.expire()
        return removed

    # -- leases -------------------------------------------------------------------------------
    def acquire_lease(self, step: int, ttl_s: float, holder: str = "") -> str:
        """Protect a committed step from retention for ``ttl_s`` seconds; returns the lease id."""
        return self.leases.acquire(step, ttl_s, holder)

    def renew_lease(self, step: int, lease_id: str, ttl_s: float, holder: str = "") -> None:
        """Push a lease's expiry ``ttl_s`` seconds into the future."""
        self.leases.renew(step, lease_id, ttl_s, holder)

    def release_lease(self, step: int, lease_id: str) -> None:
        self.leases.release(step, lease_id)

    def active_leases(self) -> list[dict[str, Any]]:
        """Lease records that have not expired."""
        return self.leases.active()

    def leased_steps(self) -> set[int]:
        """Steps an unexpired lease protects."""
        return self.leases.leased_steps()

    def expire_leases(self) -> int:
        """Delete expired lease records; returns how many."""
        return self.leases.expire()

    # -- eval metrics -------------------------------------------------------------------------
    def report_eval(self, step: int, metrics: Mapping[str, Any], *, retain: bool = True) -> CheckpointInfo:
        """Merge evaluation metrics into a committed checkpoint's record (sidecar file + index log).

        Any process may report: the run's writer picks the scores up at its next save. A score
        may change the ranking, so with ``retain`` retention runs right after it joined (see
        :meth:`retain_after`): storage holds what the rules keep now, not after the next commit.
        The checkpointer passes ``retain=False`` and runs retention itself, on its writer thread.
        """
        step = validate_step(step)
        checked = validate_metrics(metrics, what="eval metrics")
        with self._lock:
            index = self._current()
            if step not in index:
                self.read_manifest(step)  # CheckpointNotFoundError for a step that is not committed
            path = f"{step_dir(step)}/{EVAL_FILE}"
            current = self.run_index.read_eval_metrics(step)  # a damaged sidecar is replaced by these scores
            current.update(checked)
            self.storage.write_atomic(path, json.dumps(metrics_to_json(current), allow_nan=False).encode())
            if step not in index:
                found = self.run_index.read_step(step)
                if found is not None:
                    index.add(found)
            info = self.run_index.update_metrics(step, checked)
            info = info if info is not None else self.info(step)
        self._notify("scored", step)  # e.g. copied to the remote copy in the background
        if retain:
            self.retain_after(f"the eval scores of step {step}")
        return info

    # -- architecture -------------------------------------------------------------------------
    def write_architecture(self, model_or_class_path: Any, config: Any = None) -> Architecture:
        """Write the run's model_architecture.json once; a later call must describe the same class.

        A live model or class (not a string) also trusts its module in this process, so that
        ``instantiate`` allows it with ``allowed_architecture_prefixes=None`` (see
        :mod:`ray_ckpt.core.architecture`).
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
        self._side_files = None
        return arch

    def model_side_files(self) -> dict[str, bytes]:
        """The files that make each step a complete HF model folder (``config.json``, ...), from the
        run's architecture; ``{}`` for a model that is not a transformers model or none recorded.

        Read once (then again after :meth:`reload` or :meth:`write_architecture`): a save costs no
        extra request.
        """
        if self._side_files is None:
            try:
                arch = self.read_architecture()
                self._side_files = hf_config_files(arch, self.config.allowed_architecture_prefixes)
            except FileNotFoundError:
                self._side_files = {}
            except Exception as exc:  # noqa: BLE001 - a damaged or refused architecture never fails a save
                logger.warning("run %s: no config.json in its steps (%s: %s)", self.run_name, type(exc).__name__, exc)
                self._side_files = {}
        return self._side_files

    def read_architecture(self) -> Architecture:
        """The run's architecture, validated but not imported; FileNotFoundError when none was written.

        The ``fallback``'s when this storage holds none.
        """
        try:
            return Architecture.from_json_bytes(self.storage.read_bytes(ARCHITECTURE_FILE))
        except FileNotFoundError:
            if self.fallback is None:
                raise
            return self.fallback.read_architecture()

    def instantiate(self, step: Selector = "best", strict: bool = True) -> torch.nn.Module:
        """Build the model from model_architecture.json and load a checkpoint's weights into it.

        ``step="best"`` falls back to the latest checkpoint when the run ranks by no metric.
        The class is checked against ``allowed_architecture_prefixes`` (None: the defaults plus
        the modules trusted in this process) before any weights are read or anything is called.
        """
        arch = self.read_architecture()
        arch.resolve(self.config.allowed_architecture_prefixes)
        state = self.load(self.resolve(step, fallback_to_latest=True))
        model = arch.build(self.config.allowed_architecture_prefixes)
        model.load_state_dict(state, strict=strict)
        return model


def retain_after_event(store: Any, event: str, protected: Iterable[int] = ()) -> list[int]:
    """Apply ``store``'s retention after ``event`` changed what it may keep; the deleted (see
    :meth:`CheckpointStore.retain_after`: a plan in memory first, a storage failure only a warning).

    One piece for every store kind (a plain store, a tiered one): it uses only their public
    ``retention_plan``, ``apply_retention`` and ``leased_steps``.
    """
    protected = set(protected)
    try:
        _, doomed = store.retention_plan(protected)
        if not doomed:
            return []
        return store.apply_retention(protected=store.leased_steps() | protected)
    except (OSError, CorruptCheckpointError) as exc:
        logger.warning("run %s: retention after %s failed (retried by the next change): %s", store.run_name, event, exc)
        return []


def _snapshot(state: Mapping[str, Any], flat: FlatState) -> dict[str, Any]:
    """A copy of a state that later in-place training updates cannot change (ties kept)."""
    tensors = {k: to_tensor(TensorBuffer(b.dtype, b.shape, b.data.copy())) for k, b in flat.tensors.items()}
    if flat.structure is None:
        values = {**tensors, **{alias: tensors[target] for alias, target in flat.aliases.items()}}
        return {k: values[k] for k in state}
    return unflatten_state(tensors, flat.structure, flat.aliases)


__all__ = [
    "CHECKPOINTS_DIR",
    "EVAL_FILE",
    "MARKER_FILE",
    "TRAINER_TENSORS",
    "CheckpointStore",
    "Manifest",
    "Selector",
    "StepWriter",
    "step_dir",
]
