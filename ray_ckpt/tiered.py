"""Tiered saves: commit to local disk first (training resumes at disk speed), then a background
uploader copies each committed checkpoint to a remote prefix and commits it there.

Both tiers are plain :class:`~ray_ckpt.store.CheckpointStore` runs with the same layout
(``<local>/<run>/checkpoints/step_N/`` and ``<remote_uri>/<run>/checkpoints/step_N/``) and the
same commit protocol: the uploader writes the data files first and ``checkpoint.json`` last, so
a reader of the remote prefix never sees a partial checkpoint. An upload that fails is retried
with exponential backoff; a failed attempt's partial files are removed (they were invisible
anyway, having no marker).

Retention runs with the same rules on both tiers. The local tier may drop a local copy only
once its remote copy is committed: after a successful upload the uploader drops a small
``uploaded.json`` beside the local copy, and every local step without one is protected from
local retention, also across restarts (the uploads of such steps resume on construction).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ray_ckpt.byo import PendingCheckpoint
from ray_ckpt.config import CheckpointConfig
from ray_ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, RayCkptError
from ray_ckpt.format import Checksum, FileDigest
from ray_ckpt.index import CheckpointIndex, CheckpointInfo
from ray_ckpt.layout import MARKER_FILE, Selector, step_dir
from ray_ckpt.store import CheckpointStore
from ray_ckpt.writer import StepWriter

logger = logging.getLogger(__name__)

UPLOADED_FILE = "uploaded.json"
LOCAL = "local"
REMOTE = "remote"
_CHUNK = 16 << 20


class UploadError(RayCkptError):
    """A checkpoint could not be uploaded to the remote tier after every retry."""


class _LocalTier(CheckpointStore):
    """The local run of a tiered store: its retention never drops a step not yet committed remotely."""

    def __init__(self, tiered: TieredCheckpointStore, *, config: CheckpointConfig) -> None:
        super().__init__(config=config)
        self._tiered = tiered

    def apply_retention(self, protected: Iterable[int] | None = None) -> list[int]:
        """Store retention, with every step lacking a committed remote copy added to ``protected``."""
        base = set(self.leased_steps()) if protected is None else set(protected)
        with self._tiered._retention_lock:
            return super().apply_retention(base | self._tiered.not_uploaded_steps())


class TieredCheckpointStore:
    """A local :class:`CheckpointStore` plus a remote one fed by a background uploader.

    ``TieredCheckpointStore(CheckpointConfig(storage_uri="/nvme/ckpt", remote_uri="s3://b/p"))``.
    Without ``remote_uri`` it is just the local store (every checkpoint is ``["local"]``).
    ``remote_storage_options`` default to the config's ``storage_options``.
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
        **options: Any,
    ) -> None:
        cfg = (config or CheckpointConfig()).replace(**options) if options else (config or CheckpointConfig())
        self.config = cfg
        self._retention_lock = threading.RLock()
        self._lock = threading.RLock()
        self.local = _LocalTier(self, config=cfg.replace(remote_uri=None))
        self.remote: CheckpointStore | None = None
        if cfg.remote_checkpoints_enabled:
            remote_options = cfg.storage_options if remote_storage_options is None else remote_storage_options
            self.remote = CheckpointStore(
                config=cfg.replace(storage_uri=cfg.remote_uri, remote_uri=None, storage_options=dict(remote_options))
            )
        self.upload_retries = int(upload_retries)
        self.upload_backoff_s = float(upload_backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._futures: dict[int, concurrent.futures.Future[str]] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closing = threading.Event()
        if resume_uploads and self.remote is not None:
            for step in sorted(self.not_uploaded_steps()):
                logger.info("resuming the upload of step %d of %s", step, self.run_name)
                self._enqueue(step)

    def __repr__(self) -> str:
        return f"TieredCheckpointStore({self.local.uri!r} -> {self.remote.uri if self.remote else None!r})"

    @property
    def run_name(self) -> str:
        """The run's name (the same on both tiers)."""
        return self.config.run_name

    @property
    def remote_checkpoints_enabled(self) -> bool:
        """Whether a remote tier is configured."""
        return self.remote is not None

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
        """Commit to local disk (local retention applied), then queue the upload; returns the local record."""
        info = self.local.save(step, state_dict, metrics, trainer_state, metadata, overwrite=overwrite)
        self._after_local_commit(info)
        return info

    def save_and_upload(
        self, step: int, state_dict: Mapping[str, Any], **kwargs: Any
    ) -> concurrent.futures.Future[str]:
        """:meth:`save`, returning a Future of the remote URI (resolved once the remote commit is done)."""
        self.save(step, state_dict, **kwargs)
        return self.upload_future(step)

    def begin(
        self, step: int, training_info: Mapping[str, Any] | None = None, run_config: Any = None, **kwargs: Any
    ) -> PendingCheckpoint:
        """A trainer-written checkpoint on the local tier; its commit queues the upload."""
        return PendingCheckpoint(
            self.local, step, training_info=training_info, run_config=run_config,
            on_commit=self._after_local_commit, **kwargs,
        )

    def _after_local_commit(self, info: CheckpointInfo) -> None:
        info.durability = [LOCAL]
        if self.remote is not None:
            self._enqueue(info.step)

    # -- uploading ----------------------------------------------------------------------------
    def upload_future(self, step: int) -> concurrent.futures.Future[str]:
        """A Future of step's remote URI: the queued upload, or a new one for a local-only step."""
        if self.remote is None:
            raise RuntimeError(f"run {self.run_name!r} has no remote tier (remote_uri is not set)")
        with self._lock:
            future = self._futures.get(step)
            if future is not None and not (future.done() and future.exception() is not None):
                return future
        if self._uploaded_marker(step) and self._remote_committed(step):
            done: concurrent.futures.Future[str] = concurrent.futures.Future()
            done.set_result(self.remote.step_uri(step))
            return done
        return self._enqueue(step)

    def _enqueue(self, step: int) -> concurrent.futures.Future[str]:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ray-ckpt-upload")
            future = self._executor.submit(self._upload_with_retry, step)
            self._futures[step] = future
            return future

    def pending_uploads(self) -> list[int]:
        """Steps whose upload is queued or running."""
        with self._lock:
            return sorted(s for s, f in self._futures.items() if not f.done())

    def wait_for_uploads(self, timeout: float | None = None, *, raise_on_error: bool = True) -> dict[int, str]:
        """Block until every queued upload has finished; returns ``{step: remote URI}`` of the successful.

        Raises UploadError naming the failed steps (their local copies are kept) unless
        ``raise_on_error=False``.
        """
        with self._lock:
            futures = dict(self._futures)
        concurrent.futures.wait(list(futures.values()), timeout=timeout)
        done, failed = {}, {}
        for step, future in sorted(futures.items()):
            if not future.done():
                raise TimeoutError(f"upload of step {step} of {self.run_name!r} still running after {timeout}s")
            if future.exception() is not None:
                failed[step] = future.exception()
            else:
                done[step] = future.result()
        if failed and raise_on_error:
            raise UploadError(f"run {self.run_name!r}: uploads failed for steps {sorted(failed)}: {failed}")
        return done

    def _upload_with_retry(self, step: int) -> str:
        assert self.remote is not None
        attempt = 0
        while True:
            try:
                return self._upload_once(step)
            except CheckpointNotFoundError:
                raise  # the local copy is gone: nothing to upload
            except Exception as exc:
                self._remove_partial(step)
                if attempt >= self.upload_retries or self._closing.is_set():
                    logger.error("upload of step %d of %s failed for good: %s", step, self.run_name, exc)
                    raise UploadError(
                        f"step {step} of run {self.run_name!r}: upload to {self.remote.uri} failed after "
                        f"{attempt + 1} attempts: {exc}"
                    ) from exc
                delay = min(self.upload_backoff_s * (2**attempt), self.max_backoff_s)
                attempt += 1
                logger.warning(
                    "upload of step %d of %s failed (attempt %d): %s; retrying in %.2fs", step, self.run_name,
                    attempt, exc, delay,
                )
                self._closing.wait(delay)

    def _remove_partial(self, step: int) -> None:
        """Remove an uncommitted remote step directory (best effort: without a marker it is invisible)."""
        assert self.remote is not None
        try:
            if not self.remote.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
                self.remote.storage.rm(step_dir(step), recursive=True, missing_ok=True)
        except Exception as exc:
            logger.warning("could not remove the partial upload of step %d (%s); gc will", step, exc)

    def _upload_once(self, step: int) -> str:
        assert self.remote is not None
        remote = self.remote
        manifest = self.local.read_manifest(step)
        try:
            existing = remote.read_manifest(step)
        except CheckpointNotFoundError:
            existing = None
        if existing is not None and existing.files == manifest.files:
            logger.info("step %d of %s is already committed remotely", step, self.run_name)
            uri = remote.step_uri(step)
        else:
            self._upload_architecture()
            started = time.perf_counter()
            writer = StepWriter(remote, step, overwrite=True)
            for name, digest in sorted(manifest.files.items()):
                self._copy_file(step, name, digest, writer)
            writer.adopt_records(manifest)
            info = writer.commit(
                metrics=manifest.metrics, metadata=manifest.metadata, world_size=manifest.world_size,
                kind=manifest.kind, extra=manifest.extra,
            )
            uri = info.uri
            logger.info(
                "uploaded step %d of %s to %s: %d bytes in %.3fs", step, self.run_name, uri, info.files_size,
                time.perf_counter() - started,
            )
        self._copy_eval_metrics(step)
        record = {"step": step, "uri": uri, "uploaded": time.time()}
        try:
            current = self.local.read_manifest(step)
        except CheckpointNotFoundError:
            current = None
        if current is not None and current.files == manifest.files:  # not deleted or re-saved meanwhile
            self.local.storage.write_atomic(f"{step_dir(step)}/{UPLOADED_FILE}", json.dumps(record).encode())
        remote.apply_retention()
        self.local.apply_retention()
        return uri

    def _copy_file(self, step: int, name: str, expected: FileDigest, writer: StepWriter) -> None:
        """Stream one committed local file to the remote step, checking it against the local marker."""
        assert self.remote is not None
        src_path = f"{step_dir(step)}/{name}"

        def copy(f: Any) -> FileDigest:
            checksum, size = Checksum(), 0
            with self.local.storage.open_read(src_path) as src:
                while chunk := src.read(_CHUNK):
                    checksum.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            return FileDigest(size, checksum.hexdigest())

        try:
            got = self.remote.storage.write_stream(f"{writer.dir}/{name}", copy)
        except FileNotFoundError as exc:
            if not self.local.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
                raise CheckpointNotFoundError(f"step {step} of {self.run_name!r}: deleted before upload") from exc
            raise
        if got != expected:
            raise CorruptCheckpointError(
                f"{src_path}: local copy reads {got.size} bytes {got.checksum}, committed {expected.size} bytes "
                f"{expected.checksum}; not uploading a corrupt checkpoint",
                path=src_path,
            )
        writer.files[name] = expected

    def _upload_architecture(self) -> None:
        assert self.remote is not None
        from ray_ckpt.architecture import ARCHITECTURE_FILE

        try:
            data = self.local.storage.read_bytes(ARCHITECTURE_FILE)
        except FileNotFoundError:
            return
        if not self.remote.storage.exists(ARCHITECTURE_FILE):
            self.remote.storage.write_atomic(ARCHITECTURE_FILE, data)

    def _copy_eval_metrics(self, step: int) -> None:
        assert self.remote is not None
        metrics = self.local.run_index.read_eval_metrics(step)
        if metrics:
            self.remote.report_eval(step, metrics)

    def _uploaded_marker(self, step: int) -> bool:
        return self.local.storage.exists(f"{step_dir(step)}/{UPLOADED_FILE}")

    def _remote_committed(self, step: int) -> bool:
        assert self.remote is not None
        return self.remote.storage.exists(f"{step_dir(step)}/{MARKER_FILE}")

    def not_uploaded_steps(self) -> set[int]:
        """Committed local steps whose remote copy was never committed (empty without a remote tier)."""
        if self.remote is None:
            return set()
        return {i.step for i in self.local.list() if not self._uploaded_marker(i.step)}

    # -- reading ------------------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint on either tier, oldest first, with ``durability`` naming the tiers that hold it.

        When the remote cannot be listed, a local step counts as remote once its upload was
        recorded (``uploaded.json``).
        """
        local = {i.step: i for i in self.local.list()}
        remote: dict[int, CheckpointInfo] = {}
        remote_known = self.remote is not None
        if self.remote is not None:
            try:
                remote = {i.step: i for i in self.remote.list()}
            except OSError as exc:
                remote_known = False
                logger.warning("cannot list the remote tier %s (%s); using local upload records", self.remote.uri, exc)
        out = []
        for step in sorted(set(local) | set(remote)):
            if step in local:
                info = CheckpointInfo.from_dict(local[step].to_dict())
                on_remote = (step in remote) if remote_known else self._uploaded_marker(step)
                if step in remote:
                    info.metrics = {**remote[step].metrics, **info.metrics}
                info.durability = [LOCAL, REMOTE] if on_remote else [LOCAL]
            else:
                info = CheckpointInfo.from_dict(remote[step].to_dict())
                info.durability = [REMOTE]
            out.append(info)
        return out

    def index(self) -> CheckpointIndex:
        """An index over both tiers (ranked by the run's metric)."""
        index = CheckpointIndex(self.config.metric_name, self.config.mode)
        index.extend(self.list())
        return index

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint on either tier (None when there is none)."""
        return self.index().latest()

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        """The best checkpoint on either tier; None if none is ranked."""
        return self.index().best(metric, mode)

    def top_k(self, k: int, metric: str | None = None, mode: str | None = None) -> list[CheckpointInfo]:
        """The ``k`` best checkpoints on either tier, best first."""
        return self.index().top_k(k, metric, mode)

    def resolve(self, selector: Selector) -> int:
        """``"latest"``/``"best"`` over both tiers; ``"step_N"``/``"vN"``/``N`` as the store parses them."""
        if selector in ("latest", "best"):
            found = self.latest() if selector == "latest" else self.best()
            if found is None:
                raise CheckpointNotFoundError(f"run {self.run_name!r} has no checkpoint for {selector!r} on any tier")
            return found.step
        return self.local.resolve(selector)

    def info(self, step: Selector = "latest") -> CheckpointInfo:
        """The record of one checkpoint, with its durability."""
        step = self.resolve(step)
        for info in self.list():
            if info.step == step:
                return info
        raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step} on any tier")

    def store_for(self, step: int) -> CheckpointStore:
        """The tier to read ``step`` from: the local copy when it exists, else the remote one."""
        if self.local.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            return self.local
        if self.remote is not None and self._remote_committed(step):
            return self.remote
        raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step} on any tier")

    def load(
        self, step: Selector = "latest", keys: Iterable[str] | None = None, *, verify: bool | None = None
    ) -> dict[str, Any]:
        """Load a state dict from whichever copy exists (local first)."""
        step = self.resolve(step)
        store = self.store_for(step)
        try:
            return store.load(step, keys, verify=verify)
        except CheckpointNotFoundError:
            if store is self.local and self.remote is not None:  # dropped locally while we read it
                return self.remote.load(step, keys, verify=verify)
            raise

    def load_trainer_state(self, step: Selector = "latest") -> Any:
        """The trainer state saved with a checkpoint, from whichever copy exists."""
        step = self.resolve(step)
        return self.store_for(step).load_trainer_state(step)

    def verify(self, step: Selector = "latest") -> CheckpointInfo:
        """Verify every copy of a checkpoint (CorruptCheckpointError names the first bad file)."""
        step = self.resolve(step)
        found = False
        for store in (self.local, self.remote):
            if store is not None and store.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
                store.verify(step)
                found = True
        if not found:
            raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step} on any tier")
        return self.info(step)

    def instantiate(self, step: Selector = "best", strict: bool = True) -> torch.nn.Module:
        """Build the model from its architecture and load a checkpoint from whichever copy exists."""
        if step == "best" and self.best() is None:
            step = "latest"
        return self.store_for(self.resolve(step)).instantiate(self.resolve(step), strict=strict)

    def step_uri(self, step: int) -> str:
        """The remote URI of a step (the local one without a remote tier)."""
        return (self.remote or self.local).step_uri(step)

    # -- other writes -------------------------------------------------------------------------
    def write_architecture(self, model_or_class_path: Any, config: Any = None) -> Any:
        """Record the run's architecture locally (the uploader copies it to the remote)."""
        return self.local.write_architecture(model_or_class_path, config)

    def report_eval(self, step: int, metrics: Mapping[str, Any]) -> CheckpointInfo:
        """Merge evaluation metrics into every copy of a checkpoint."""
        done = False
        for store in (self.local, self.remote):
            if store is not None and store.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
                store.report_eval(step, metrics)
                done = True
        if not done:
            raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step} on any tier")
        return self.info(step)

    def delete(self, step: int) -> None:
        """Delete a checkpoint from both tiers."""
        self.local.delete(step)
        if self.remote is not None:
            self.remote.delete(step)

    def apply_retention(self) -> dict[str, list[int]]:
        """Apply the run's retention on both tiers (local copies not yet uploaded are kept)."""
        out = {LOCAL: self.local.apply_retention()}
        if self.remote is not None:
            out[REMOTE] = self.remote.apply_retention()
        return out

    def close(self, *, wait: bool = True) -> None:
        """Finish (``wait=True``) or cut short the queued uploads and release the uploader thread."""
        if not wait:
            self._closing.set()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=not wait)
        self.local.close()

    def __enter__(self) -> TieredCheckpointStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
