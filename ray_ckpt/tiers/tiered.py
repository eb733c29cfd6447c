"""Tiered saves: commit to local disk first (training resumes at disk speed), then upload to a
remote prefix in the background.

:class:`TieredCheckpointStore` is composed of two plain :class:`~ray_ckpt.core.store.CheckpointStore`
objects of the same run, ``local`` (``storage_uri``) and ``remote`` (``remote_uri``), and an
:class:`~ray_ckpt.tiers.remote.Uploader` between them, joined through the local store's hooks
(a listener, a retention keeper, the read fallback). It offers the store's API
(:class:`~ray_ckpt.core.runstore.RunStore`, same signatures) over both tiers. Both tiers have the
same layout (``<local>/<run>/checkpoints/step_N/`` and ``<remote_uri>/<run>/checkpoints/step_N/``)
and the same commit protocol: the marker is written last, so a reader of the remote prefix never
sees a partial checkpoint. A failed upload is retried with exponential backoff; retention runs
with the same rules on both tiers, and a local copy is dropped only once its remote copy is
committed (``uploaded.json`` beside it records that, also across restarts).

:func:`open_store` is the one place that decides from a config whether a run is plain or tiered.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ray_ckpt.core.architecture import Architecture
from ray_ckpt.core.byo import PendingCheckpoint
from ray_ckpt.core.config import CheckpointConfig, register_consumer
from ray_ckpt.core.errors import CheckpointNotFoundError
from ray_ckpt.core.format.header import SafetensorsHeader
from ray_ckpt.core.hooks import TransferObserver
from ray_ckpt.core.index import CheckpointIndex, CheckpointInfo
from ray_ckpt.core.layout import Manifest, Selector, validate_metrics, validate_step
from ray_ckpt.core.storage.storage import Storage
from ray_ckpt.core.store import CheckpointStore, Ranked, retain_after_event
from ray_ckpt.core.writer import StepWriter
from ray_ckpt.tiers.remote import LOCAL, REMOTE, UPLOADED_FILE, Uploader, UploadError, UploadPolicy

__all__ = [
    "LOCAL",
    "REMOTE",
    "UPLOADED_FILE",
    "TieredCheckpointStore",
    "UploadError",
    "UploadPolicy",
    "open_store",
    "tiers_of",
    "uploader_of",
]


# What TieredCheckpointStore reads of a config (check_consumed(by='TieredCheckpointStore')).
register_consumer("TieredCheckpointStore", {"store", "retention", "tiering"})


def open_store(
    config: CheckpointConfig,
    *,
    observer: TransferObserver | None = None,
    upload_policy: UploadPolicy | None = None,
    max_staleness_s: float | None = None,
) -> CheckpointStore | TieredCheckpointStore:
    """The store of the run ``config`` describes: a plain store, or with ``remote_uri`` a tiered one.

    The one tier resolution (the checkpointer, eval clients, workers, adapters all open runs
    here). A tiered store opened here resumes unfinished uploads when it first writes (a reader
    never uploads). ``observer`` gets the uploads' observations (the Ray layer passes its metrics).
    """
    if not config.remote_uri:
        return CheckpointStore(config=config, max_staleness_s=max_staleness_s)
    return TieredCheckpointStore(
        config, upload_policy=upload_policy, observer=observer, resume_uploads=False, max_staleness_s=max_staleness_s
    )


def uploader_of(store: CheckpointStore | TieredCheckpointStore) -> Uploader | None:
    """The uploader of a store :func:`open_store` returned (None for a run without a remote tier)."""
    return store.uploader if isinstance(store, TieredCheckpointStore) else None


def tiers_of(store: CheckpointStore | TieredCheckpointStore) -> list[CheckpointStore]:
    """The plain stores a store :func:`open_store` returned is made of, local tier first: the store
    itself, or a tiered store's local and remote stores (so a caller needs not ask which it got)."""
    if isinstance(store, TieredCheckpointStore):
        return [store.local] if store.remote is None else [store.local, store.remote]
    return [store]


class TieredCheckpointStore:
    """A run on local disk with a remote tier fed by a background uploader: two plain stores composed.

    ``TieredCheckpointStore(CheckpointConfig(storage_uri="/nvme/ckpt", remote_uri="s3://b/p"))``.
    Without ``remote_uri`` it is just the local store (every checkpoint is ``["local"]``).
    ``remote_storage_options`` default to the config's ``storage_options``; ``upload_retries``,
    ``upload_backoff_s`` and ``max_backoff_s`` (or ``upload_policy``) are the uploader's
    :class:`UploadPolicy`. With ``resume_uploads`` the uploads of local steps without a remote
    copy resume now (else at the first write).
    """

    def __init__(
        self,
        config: CheckpointConfig | None = None,
        *,
        remote_storage_options: dict[str, Any] | None = None,
        upload_retries: int = 5,
        upload_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        resume_uploads: bool = True,
        upload_policy: UploadPolicy | None = None,
        observer: TransferObserver | None = None,
        max_staleness_s: float | None = None,
        **options: Any,
    ) -> None:
        if remote_storage_options is not None:
            options["remote_storage_options"] = remote_storage_options
        cfg = config or CheckpointConfig()
        self.config = cfg.replace(**options) if options else cfg
        cfg = self.config
        self.local = CheckpointStore(
            config=cfg.replace(remote_uri=None, remote_storage_options=None), max_staleness_s=max_staleness_s
        )
        self.remote: CheckpointStore | None = None
        self.uploader: Uploader | None = None
        self._remote_leases: set[str] = set()  # ids of leases taken on the remote tier
        if cfg.remote_uri:
            remote_options = cfg.storage_options if cfg.remote_storage_options is None else cfg.remote_storage_options
            self.remote = CheckpointStore(
                config=cfg.replace(
                    storage_uri=cfg.remote_uri,
                    remote_uri=None,
                    remote_storage_options=None,
                    storage_options=dict(remote_options),
                )
            )
            policy = upload_policy or UploadPolicy(upload_retries, upload_backoff_s, max_backoff_s)
            self.uploader = Uploader(self.local, self.remote, policy, observer)
            self.uploader.attach()
            if resume_uploads:
                self.uploader.resume()

    def __repr__(self) -> str:
        return f"TieredCheckpointStore({self.uri!r} -> {self.remote.uri if self.remote else None!r})"

    # -- what the run is ----------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        return self.config.run_name

    @property
    def uri(self) -> str:
        """The run's URI on the local tier."""
        return self.local.uri

    @property
    def storage(self) -> Storage:
        """The local tier's storage."""
        return self.local.storage

    @property
    def remote_checkpoints_enabled(self) -> bool:
        """Whether a remote tier is configured."""
        return self.uploader is not None

    def policy(self) -> dict[str, Any]:
        return self.local.policy()

    def step_uri(self, step: int) -> str:
        """Where a step lives on the local tier."""
        return self.local.step_uri(step)

    def _tier(self) -> Uploader:
        if self.uploader is None:
            raise RuntimeError(f"run {self.run_name!r} has no remote tier (remote_uri is not set)")
        return self.uploader

    def _view(self) -> CheckpointIndex:
        """The index queries answer from: the union of both tiers (the local index without a remote)."""
        return self.local.current_index() if self.uploader is None else self.uploader.view()

    # -- the index ----------------------------------------------------------------------------
    def reload(self) -> CheckpointIndex:
        """Read both tiers' indexes again; the union queries answer from."""
        self.local.reload()
        if self.uploader is not None:
            self.uploader.reload()
        return self._view()

    def __contains__(self, step: object) -> bool:
        """Whether ``step`` is a committed step on either tier."""
        return step in self._view()

    def list(self) -> list[CheckpointInfo]:
        """Every committed checkpoint on either tier, oldest first (``durability`` naming the tiers)."""
        return self._view().list()

    def latest(self) -> CheckpointInfo | None:
        return self._view().latest()

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        """The best checkpoint by the run's metric (or ``metric``/``mode``); None if none is ranked."""
        if metric is None and self.config.metric_name is None:
            return None
        return self._view().best(metric, mode)

    def top_k(self, k: int, metric: str | None = None, mode: str | None = None) -> list[CheckpointInfo]:
        """The ``k`` best checkpoints on either tier, best first."""
        return self._view().top_k(k, metric, mode)

    def info(self, step: Selector = "latest") -> CheckpointInfo:
        """The record of one committed checkpoint (either tier)."""
        step = self.resolve(step)
        found = self._view().get(step)
        return found if found is not None else self.local.info(step)

    def resolve(
        self, selector: Selector | None = "latest", *, fallback_to_latest: bool = False, over: Ranked | None = None
    ) -> int:
        """A step selector resolved over both tiers (see :meth:`CheckpointStore.resolve`)."""
        return self.local.resolve(selector, fallback_to_latest=fallback_to_latest, over=self if over is None else over)

    # -- saving (on the local tier; the uploader follows) -----------------------------------------
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
        """Commit on the local tier (then retention); the upload is queued."""
        return self.local.save(step, state_dict, metrics, trainer_state, metadata, overwrite=overwrite)

    def save_async(self, step: int, state_dict: Mapping[str, Any], **kwargs: Any) -> concurrent.futures.Future:
        """:meth:`CheckpointStore.save_async` on the local tier."""
        return self.local.save_async(step, state_dict, **kwargs)

    def copy_step(self, source: Storage, source_dir: str, manifest: Manifest, **kwargs: Any) -> CheckpointInfo:
        """:meth:`CheckpointStore.copy_step` into the local tier (uploaded like any commit)."""
        return self.local.copy_step(source, source_dir, manifest, **kwargs)

    def begin_step(self, step: int, *, overwrite: bool = False) -> StepWriter:
        """A writer of a step on the local tier (used by the checkpointer)."""
        return self.local.begin_step(step, overwrite=overwrite)

    def begin(
        self, step: int, training_info: Mapping[str, Any] | None = None, run_config: Any = None, **kwargs: Any
    ) -> PendingCheckpoint:
        """A checkpoint whose files the trainer writes itself, on the local tier (see :meth:`CheckpointStore.begin`)."""
        return self.local.begin(step, training_info, run_config, **kwargs)

    def wait(self) -> None:
        """Block until every async save has finished."""
        self.local.wait()

    def close(self, *, wait: bool = True) -> None:
        """Finish pending async saves, and the queued uploads (``wait``) or cut them short
        (``wait=False``: the steps stay local and are uploaded after the next start)."""
        self.local.close(wait=wait)
        if self.uploader is not None:
            self.uploader.close(wait=wait)

    def __enter__(self) -> TieredCheckpointStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # -- reading (the local copy first, the remote one when it is gone) ------------------------
    def read_manifest(self, step: int) -> Manifest:
        """The parsed marker of a committed step, from the tier it is read from."""
        return self.store_for(step).read_manifest(step)

    def store_for(self, step: int) -> CheckpointStore:
        """The tier to read ``step`` from: the local copy when it exists, else the remote one."""
        return self.local.store_for(step)

    def load(
        self,
        step: Selector = "latest",
        keys: Iterable[str] | None = None,
        *,
        verify: bool | None = None,
        mmap: bool = False,
        into: Mapping[str, Any] | None = None,
    ) -> Any:
        """:meth:`CheckpointStore.load` from whichever tier holds the step (mmap: local copies only)."""
        return self.local.load(self.resolve(step), keys, verify=verify, mmap=mmap, into=into)

    def load_trainer_state(self, step: Selector = "latest", *, into: Mapping[str, Any] | None = None) -> Any:
        """The trainer state saved with a checkpoint (None if it had none), from either tier."""
        return self.local.load_trainer_state(self.resolve(step), into=into)

    def verify(self, step: Selector = "latest") -> CheckpointInfo:
        """Check every copy of a checkpoint (CheckpointNotFoundError when no tier holds it)."""
        step = self.resolve(step)
        found = False
        for tier in (self.local, self.remote):
            if tier is None:
                continue
            try:
                manifest = tier.read_manifest(step)
            except CheckpointNotFoundError:
                continue
            tier.reader.verify(manifest)
            found = True
        if not found:
            raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step} on any tier")
        return self.info(step)

    def tensor_headers(self, step: Selector = "latest") -> dict[str, SafetensorsHeader]:
        return self.local.tensor_headers(self.resolve(step))

    def file_header(self, step: Selector, name: str) -> SafetensorsHeader:
        return self.local.file_header(self.resolve(step), name)

    # -- deleting and retention ---------------------------------------------------------------
    def delete(self, step: int) -> None:
        """Delete every copy of a checkpoint."""
        step = validate_step(step)
        self.local.delete(step)
        if self.uploader is not None:
            self.uploader.delete_remote(step)

    def retention_plan(self, protected: Iterable[int] = ()) -> tuple[list[int], list[int]]:
        """``(keep, delete)`` of the local tier, where a step not yet uploaded is kept too."""
        return self.local.retention_plan(protected)

    def apply_retention(self, protected: Iterable[int] | None = None) -> list[int]:
        """Apply the rules on the local tier now and have the uploader apply them on the remote
        tier right after (no caller waits for the remote storage); the steps no tier holds any more."""
        leased = self.leased_steps() if protected is None else set(protected)
        deleted = self.local.apply_retention(leased)
        if self.uploader is None:
            return deleted
        self.uploader.retain_remote_soon()
        return self.uploader.gone(deleted)

    def retain_after_commit(self, step: int, protected: Iterable[int] = ()) -> list[int]:
        """Local retention after ``step`` committed (the remote tier is retained after its upload);
        the steps no tier holds any more."""
        deleted = self.local.retain_after_commit(step, protected)
        return deleted if self.uploader is None else self.uploader.gone(deleted)

    def retain_after(self, event: str, protected: Iterable[int] = ()) -> list[int]:
        """Retention on both tiers after ``event`` (see :meth:`CheckpointStore.retain_after`)."""
        return retain_after_event(self, event, protected)

    def gc(self, *, dry_run: bool = False, older_than_s: float = 0.0) -> list[str]:
        """Remove the leftovers of crashed saves on the local tier."""
        return self.local.gc(dry_run=dry_run, older_than_s=older_than_s)

    # -- leases -------------------------------------------------------------------------------
    def acquire_lease(self, step: int, ttl_s: float, holder: str = "") -> str:
        """Protect a step from retention; a step only the remote tier holds is leased there."""
        try:
            return self.local.acquire_lease(step, ttl_s, holder)
        except CheckpointNotFoundError:
            if self.remote is None:
                raise
            lease_id = self.remote.acquire_lease(step, ttl_s, holder)
            self._remote_leases.add(lease_id)
            return lease_id

    def _leased_on(self, lease_id: str) -> CheckpointStore:
        return self.remote if self.remote is not None and lease_id in self._remote_leases else self.local

    def renew_lease(self, step: int, lease_id: str, ttl_s: float, holder: str = "") -> None:
        """Push a lease's expiry ``ttl_s`` seconds into the future."""
        self._leased_on(lease_id).renew_lease(step, lease_id, ttl_s, holder)

    def release_lease(self, step: int, lease_id: str) -> None:
        self._leased_on(lease_id).release_lease(step, lease_id)
        self._remote_leases.discard(lease_id)

    def active_leases(self) -> list[dict[str, Any]]:
        """Lease records on the local tier that have not expired."""
        return self.local.active_leases()

    def leased_steps(self) -> set[int]:
        """Steps an unexpired lease protects: the local tier's, and the remote tier's as its uploader
        last read them (no call here waits for the remote storage)."""
        steps = self.local.leased_steps()
        return steps if self.uploader is None else steps | self.uploader.remote_leased()

    def expire_leases(self) -> int:
        return self.local.expire_leases()

    # -- eval metrics -------------------------------------------------------------------------
    def report_eval(self, step: int, metrics: Mapping[str, Any], *, retain: bool = True) -> CheckpointInfo:
        """Merge evaluation metrics into a step's record: the local copy's (copied to the remote copy
        in the background), or the remote one's when only the remote tier holds the step."""
        step = validate_step(step)
        uploader = self.uploader
        if uploader is not None and self.remote is not None and uploader.remote_only(step):
            info = self.remote.report_eval(step, validate_metrics(metrics, what="eval metrics"), retain=False)
            uploader.metrics_changed(step)  # the uploader re-ranks the remote tier
            return info
        info = self.local.report_eval(step, metrics, retain=False)
        if retain:
            self.retain_after(f"the eval scores of step {step}")
        return info

    # -- architecture -------------------------------------------------------------------------
    def write_architecture(self, model_or_class_path: Any, config: Any = None) -> Architecture:
        """Write the run's model_architecture.json once (on the local tier; uploads copy it)."""
        return self.local.write_architecture(model_or_class_path, config)

    def read_architecture(self) -> Architecture:
        """The run's architecture: the local copy, else the remote one."""
        return self.local.read_architecture()

    def model_side_files(self) -> dict[str, bytes]:
        return self.local.model_side_files()

    def instantiate(self, step: Selector = "best", strict: bool = True) -> torch.nn.Module:
        """Build the model with a checkpoint's weights, from whichever tier holds it."""
        return self.local.instantiate(self.resolve(step, fallback_to_latest=True), strict)

    # -- the uploader ---------------------------------------------------------------------------
    def save_and_upload(
        self, step: int, state_dict: Mapping[str, Any], **kwargs: Any
    ) -> concurrent.futures.Future[str]:
        """:meth:`save`, returning a Future of the remote URI (resolved once the remote commit is done)."""
        self.save(step, state_dict, **kwargs)
        return self.upload_future(step)

    def upload_future(self, step: int) -> concurrent.futures.Future[str]:
        """A Future of step's remote URI: the queued upload, or a new one for a local-only step."""
        return self._tier().upload_future(step)

    def pending_uploads(self) -> list[int]:
        """Steps whose upload is queued or running."""
        return [] if self.uploader is None else self.uploader.pending_uploads()

    def failed_uploads(self) -> list[int]:
        """Steps whose upload failed for good (kept locally; queued again by the next commit)."""
        return [] if self.uploader is None else self.uploader.failed_uploads()

    def wait_for_uploads(self, timeout: float | None = None, *, raise_on_error: bool = True) -> dict[int, str]:
        """Block until every queued upload has finished; ``{step: remote URI}`` of the successful.

        Raises UploadError naming the failed steps (their local copies are kept) unless
        ``raise_on_error=False``.
        """
        return {} if self.uploader is None else self.uploader.wait_for_uploads(timeout, raise_on_error=raise_on_error)

    def not_uploaded_steps(self) -> set[int]:
        """Committed local steps whose remote copy was never committed (empty without a remote tier)."""
        return set() if self.uploader is None else self.uploader.not_uploaded_steps()

    def durable_uri(self, step: int, *, wait: bool = False) -> str:
        """The URI of a step's most durable copy: the remote one once uploaded, else the local one.

        ``wait``: first wait for the step's upload (queued now for a local-only step) and return
        the remote URI; UploadError if the upload fails for good. Without a remote tier: the
        local URI.
        """
        if wait and self.uploader is not None:
            return self.uploader.upload_future(step).result()
        info = self.info(step)
        if self.remote is not None and REMOTE in info.durability:
            return self.remote.step_uri(info.step)
        return info.uri
