"""The uploader between two plain stores of one run: local disk first, the remote copy in the background.

An :class:`Uploader` joins a local and a remote :class:`~ray_ckpt.core.store.CheckpointStore`
(same run, same layout) through the local store's hooks only (:mod:`ray_ckpt.core.hooks`): it is
one of its ``listeners``, one of its ``keepers``, and the remote store is its read ``fallback``
(:class:`~ray_ckpt.tiers.tiered.TieredCheckpointStore` wires that up). It adds:

* an after-commit hook: every local commit queues the step's upload, and the save (or the
  checkpointer's acknowledgement to its workers) returns at local-disk speed;
* a background upload thread (alive while there is work): it copies a committed step into the
  remote store with :meth:`~ray_ckpt.core.store.CheckpointStore.copy_step` (every file's checksum
  checked, the marker last, as any commit), so a reader of ``remote_uri`` never sees a partial
  checkpoint. A failed attempt is put back in the queue with exponential backoff (each storage
  operation is already retried within its deadline by the storage layer); after
  ``UploadPolicy.retries`` more attempts the step fails for good, is kept locally, and is queued
  again by the next commit or the next start;
* ``uploaded.json`` beside a local copy once its remote copy is committed, and a retention rule,
  ``Steps(not_uploaded, "not uploaded")``: a local copy is never deleted before it is uploaded,
  also across restarts (a writer start queues every local step without the sidecar again);
* the same retention rules on the remote tier (ranked with the local scores), applied after
  every upload, so that once uploads are done both tiers hold what the rules keep;
* reads from whichever tier holds a step, and queries over the union of both tiers
  (``durability`` names the tiers that hold each step).

Only a run's writer uploads: a store that never commits (an eval client's) only reads. Transfers
are reported to a :class:`~ray_ckpt.core.hooks.TransferObserver` (the Ray layer hands in its metrics).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import heapq
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ray_ckpt.core.architecture import ARCHITECTURE_FILE
from ray_ckpt.core.errors import CheckpointNotFoundError, CorruptCheckpointError, RayCkptError
from ray_ckpt.core.hooks import NO_OBSERVER, StoreListener, TransferObserver
from ray_ckpt.core.index import CheckpointIndex, CheckpointInfo
from ray_ckpt.core.layout import MARKER_FILE, step_dir
from ray_ckpt.core.retention import Steps, plan, policy_from_config
from ray_ckpt.core.safejson import DAMAGE, JsonObject
from ray_ckpt.core.store import CheckpointStore

logger = logging.getLogger(__name__)

UPLOADED_FILE = "uploaded.json"
LOCAL = "local"
REMOTE = "remote"
# After the remote tier could not be read, queries use the local upload records this long before
# they try it again (so a remote outage costs one storage deadline, not one per query).
REMOTE_RETRY_S = 30.0

Listener = Callable[[list[int]], None]


class UploadError(RayCkptError):
    """A checkpoint could not be uploaded to the remote tier after every retry."""


@dataclasses.dataclass(frozen=True)
class UploadPolicy:
    """How the uploader retries: ``retries`` more attempts after the first, ``backoff_s``
    doubling up to ``max_backoff_s`` between them (other uploads go on meanwhile)."""

    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"upload retries: must be an integer >= 0, got {self.retries!r}")
        for name in ("backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"upload {name}: must be a number of seconds >= 0, got {value!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` >= 1 failed so far)."""
        return float(min(self.backoff_s * (2 ** (attempt - 1)), self.max_backoff_s))


class Uploader(StoreListener):
    """Uploads a local store's commits to a remote store of the same run; records, remote
    retention and the union view of both.

    ``local`` and ``remote`` are plain stores; the uploader only uses their public API. Attach it
    with :meth:`attach` (a listener, a keeper and the read fallback of ``local``).
    """

    def __init__(
        self,
        local: CheckpointStore,
        remote: CheckpointStore,
        policy: UploadPolicy | None = None,
        observer: TransferObserver | None = None,
    ) -> None:
        self.store = local
        self.remote = remote
        self.policy = policy or UploadPolicy()
        self.observer = observer or NO_OBSERVER
        # Called with the steps whose union record changed (uploaded, deleted on a tier), from
        # the uploader or a saving thread; a listener re-reads them with record().
        self.listeners: list[Listener] = []
        # The upload queue: (not before, seq, kind, step); kind "upload" | "retain" | "eval".
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, str, int]] = []
        self._queued: set[tuple[str, int]] = set()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._running: int | None = None  # the step being uploaded now
        self._closing = threading.Event()  # close(wait=False): no more attempts
        self._futures: dict[int, concurrent.futures.Future[str]] = {}
        self._attempts: dict[int, int] = {}
        self._failed: dict[int, BaseException] = {}
        self._resumed = False
        # step -> whether its local copy has a committed remote copy (uploaded.json)
        self._marks: dict[int, bool] = {}
        self._marks_lock = threading.Lock()
        self._marks_version = 0
        self._view: CheckpointIndex | None = None
        self._view_key: tuple[Any, ...] | None = None
        self._view_lock = threading.Lock()
        self._remote_retry_at = 0.0
        self._remote_leased: frozenset[int] = frozenset()  # read by retain_remote

    def __repr__(self) -> str:
        return f"Uploader({self.store.uri!r} -> {self.remote.uri!r})"

    @property
    def run_name(self) -> str:
        return self.store.run_name

    def attach(self) -> None:
        """Hook into the local store: told of its changes, keeping its steps not yet uploaded,
        reading from the remote store what it does not hold."""
        self.store.listeners.append(self)
        self.store.keepers.append(self.retention_rule)
        self.store.fallback = self.remote

    # -- hooks of the local store -------------------------------------------------------------
    def writer_started(self) -> None:
        """The local store's first write: uploads a crashed or restarted writer left unfinished go on."""
        self.resume()

    def scored(self, step: int) -> None:
        self.metrics_changed(step)

    def deleted(self, steps: list[int]) -> None:
        """Local copies went (retention, delete): forget their upload records; their records changed."""
        with self._marks_lock:
            for step in steps:
                self._marks.pop(step, None)
        self._emit(steps)

    def committed(self, info: CheckpointInfo) -> None:
        """A local commit: queue its upload, and those of steps whose upload had failed for good."""
        self._mark(info.step, False)
        with self._cond:
            failed = sorted(self._failed)
        for step in failed:
            self._attempts.pop(step, None)
            self._enqueue_upload(step)
        self._attempts.pop(info.step, None)
        self._enqueue_upload(info.step)

    def resume(self) -> list[int]:
        """Queue the upload of every committed local step without a remote copy (once per store).

        A writer calls this when it starts (its first save, the checkpointer's start): uploads
        cut short by a crash or a restart go on. Returns the steps queued.
        """
        with self._cond:
            if self._resumed:
                return []
            self._resumed = True
        if self._remote_index() is not None:  # upload records are checked against the remote tier
            with self._marks_lock:
                self._marks = {s: v for s, v in self._marks.items() if v is False}
                self._marks_version += 1
        steps = sorted(self.not_uploaded_steps())
        for step in steps:
            logger.info("resuming the upload of step %d of %s to %s", step, self.run_name, self.remote.uri)
            self._enqueue_upload(step)
        return steps

    def metrics_changed(self, step: int) -> None:
        """Scores joined a local step: copy them to its remote copy (and re-rank there) in the background."""
        if self._on_remote(step):
            self._push("eval", step)

    def remote_only(self, step: int) -> bool:
        """Whether only the remote tier holds ``step`` (its local copy is gone or was never here)."""
        if step in self.store.index or self.store.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            return False
        return self.remote.storage.exists(f"{step_dir(step)}/{MARKER_FILE}")

    def retain_remote_soon(self) -> None:
        """Have the upload thread apply the rules on the remote tier next (no caller waits for it)."""
        self._push("retain", -1)

    def gone(self, deleted: Iterable[int]) -> list[int]:
        """Of steps deleted locally, those no tier holds any more."""
        return [step for step in deleted if not self._on_remote(step)]

    def remote_leased(self) -> set[int]:
        """The remote tier's leased steps as the uploader last read them (no I/O here)."""
        return set(self._remote_leased)

    def delete_remote(self, step: int) -> None:
        """Delete the remote copy of ``step`` (part of the store's ``delete``)."""
        self.remote.delete(step)
        self._emit([step])

    # -- records and the union view -----------------------------------------------------------
    def _mark(self, step: int, uploaded: bool) -> None:
        with self._marks_lock:
            self._marks[step] = uploaded
            self._marks_version += 1

    def _uploaded_record(self, step: int) -> bool:
        """Whether ``step``'s local copy has a valid ``uploaded.json`` (read once per step, then kept).

        The record is a claim like any file on storage: it counts only when it parses, names this
        step and this local commit (its ``created``), and, once the remote index has been read,
        the remote tier holds the step as the record says. A planted or stale record never
        stops a step from being uploaded (or lets its only copy be deleted); a damaged one is
        skipped with one warning naming it.
        """
        with self._marks_lock:
            known = self._marks.get(step)
        if known is not None:
            return known
        path = f"{step_dir(step)}/{UPLOADED_FILE}"
        try:
            found = self._valid_upload_record(step, JsonObject.parse(self.store.storage.read_bytes(path), name=path))
        except FileNotFoundError:
            found = False
        except DAMAGE as exc:
            self.store.damaged.skip(exc, f"step {step} counts as not uploaded")
            found = False
        with self._marks_lock:
            self._marks.setdefault(step, found)
            self._marks_version += 1
            return self._marks[step]

    def _valid_upload_record(self, step: int, doc: JsonObject) -> bool:
        """Cross-check an ``uploaded.json`` against the local commit and the remote index (no I/O)."""
        if doc.int("step", lo=0) != step:
            raise doc.error("step", f"is not {step}")
        local = self.store.index.get(step)
        if local is None or doc.float("created") != local.created:
            raise doc.error("created", f"is not the commit time of the local step {step}")
        if not self.remote.index_loaded:
            return True  # checked against the remote tier once its index is read (see resume)
        remote = self.remote.index.get(step)
        recorded = doc.float("remote_created", None)
        if remote is None or (recorded is not None and recorded != remote.created):
            logger.warning(
                "run %s: %s/%s claims an upload the remote tier %s does not hold; uploading again",
                self.run_name,
                step_dir(step),
                UPLOADED_FILE,
                self.remote.uri,
            )
            return False
        return True

    def not_uploaded_steps(self) -> set[int]:
        """Committed local steps whose remote copy was never committed (no ``uploaded.json``)."""
        return {step for step in self.store.current_index().steps() if not self._uploaded_record(step)}

    def retention_rule(self) -> Steps:
        """The tier's retention rule: a local step not yet uploaded is kept."""
        return Steps(frozenset(self.not_uploaded_steps()), "not uploaded")

    def _remote_index(self) -> CheckpointIndex | None:
        """The remote run's index (read once), or None while the remote tier cannot be read."""
        remote = self.remote
        if remote.index_loaded:
            return remote.index
        if time.monotonic() < self._remote_retry_at:
            return None
        try:
            remote.reload()
        except (OSError, CorruptCheckpointError) as exc:
            self._remote_retry_at = time.monotonic() + REMOTE_RETRY_S
            logger.warning(
                "run %s: cannot read the remote tier %s (%s); using the local upload records",
                self.run_name,
                remote.uri,
                exc,
            )
            return None
        return remote.index

    def _on_remote(self, step: int) -> bool:
        """Whether the remote tier holds ``step`` (by its index, or the upload record when unreadable)."""
        if self.remote.index_loaded:
            return step in self.remote.index
        return bool(self._marks.get(step))

    def reload(self) -> None:
        """Read the remote index again, if it was read (after other processes' changes)."""
        self._remote_retry_at = 0.0
        if self.remote.index_loaded:
            try:
                self.remote.reload()
            except (OSError, CorruptCheckpointError) as exc:
                logger.warning("run %s: cannot reload the remote tier %s: %s", self.run_name, self.remote.uri, exc)

    def _merge(self, local: CheckpointInfo | None, remote: CheckpointInfo | None) -> CheckpointInfo | None:
        if local is None:
            return None if remote is None else dataclasses.replace(remote, durability=[REMOTE])
        if remote is None:
            on_remote = not self.remote.index_loaded and bool(self._marks.get(local.step))
            return dataclasses.replace(local, durability=[LOCAL, REMOTE] if on_remote else [LOCAL])
        if not self._uploaded_record(local.step):  # not (verifiably) uploaded, or re-saved since
            return dataclasses.replace(local, durability=[LOCAL])
        return dataclasses.replace(local, durability=[LOCAL, REMOTE], metrics={**remote.metrics, **local.metrics})

    def record(self, step: int) -> CheckpointInfo | None:
        """The union record of ``step`` (None when no tier holds it); no I/O."""
        remote = self.remote.index.get(step) if self.remote.index_loaded else None
        return self._merge(self.store.index.get(step), remote)

    def view(self) -> CheckpointIndex:
        """An index over both tiers, rebuilt only after either changed (queries are O(k) between)."""
        local = self.store.current_index()
        remote = self._remote_index()
        if remote is None:
            self.not_uploaded_steps()  # the upload records stand in for the remote listing
        key = (local.changes, None if remote is None else remote.changes, self._marks_version if remote is None else 0)
        with self._view_lock:
            if self._view is not None and self._view_key == key:
                return self._view
        # Built outside _view_lock: a thread holding the store's lock may be waiting for it.
        local_records = self.store.list()
        remote_records: dict[int, CheckpointInfo] = {}
        if remote is not None:
            remote_records = {info.step: info for info in self.remote.list()}
        merged = [self._merge(info, remote_records.pop(info.step, None)) for info in local_records]
        merged += [self._merge(None, info) for info in remote_records.values()]
        view = CheckpointIndex(self.store.config.metric_name, self.store.config.mode)
        view.extend(info for info in merged if info is not None)
        with self._view_lock:
            self._view, self._view_key = view, key
        return view

    def _emit(self, steps: Iterable[int]) -> None:
        changed = sorted(set(steps))
        if not changed:
            return
        for listener in list(self.listeners):
            try:
                listener(changed)
            except Exception:  # noqa: BLE001 - a listener's failure never fails an upload
                logger.exception("run %s: a tier listener failed", self.run_name)

    # -- remote retention ---------------------------------------------------------------------
    def retain_remote(self, protected: Iterable[int] = ()) -> list[int]:
        """Apply the run's retention rules on the remote tier; the deleted steps the local tier lacks.

        Ranked with the scores the local tier has (reported after an upload, they may not be on
        the remote copy yet); leases on either tier protect a step.
        """
        remote = self.remote
        records = remote.list()
        local = self.store.index
        ranked = CheckpointIndex(remote.config.metric_name, remote.config.mode)
        ranked.extend(
            dataclasses.replace(info, metrics={**info.metrics, **found.metrics})
            if (found := local.get(info.step)) is not None
            else info
            for info in records
        )
        self._remote_leased = frozenset(remote.leases.leased_steps())
        keep = set(protected) | self._remote_leased | self.store.leases.leased_steps()
        _, doomed = plan(ranked, policy_from_config(remote.config, keep))
        deleted = [step for step in doomed if remote.leases.retire(step, remote.delete)]
        if deleted:
            logger.info("retention deleted steps %s of %s on %s", deleted, self.run_name, remote.uri)
        self._emit(deleted)
        return [step for step in deleted if step not in local]

    # -- the queue ----------------------------------------------------------------------------
    def _push(self, kind: str, step: int, delay: float = 0.0) -> None:
        with self._cond:
            if (kind, step) in self._queued:
                return
            self._queued.add((kind, step))
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), kind, step))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ray-ckpt-upload")
                self._thread.start()
            self._cond.notify_all()

    def _enqueue_upload(self, step: int, delay: float = 0.0) -> concurrent.futures.Future[str]:
        with self._cond:
            future = self._futures.get(step)
            # a step re-committed (overwrite) while its upload runs gets a future of its own
            if future is None or future.done() or self._running == step:
                future = concurrent.futures.Future()
                self._futures[step] = future
                self._failed.pop(step, None)
                self._prune_futures()
        self._push("upload", step, delay)
        return future

    def _prune_futures(self, keep: int = 1000) -> None:
        """Forget the oldest finished uploads beyond ``keep`` (a long run's memory stays flat)."""
        if len(self._futures) <= keep:
            return
        for step in sorted(s for s, f in self._futures.items() if f.done())[: len(self._futures) - keep]:
            del self._futures[step]

    def _run(self) -> None:
        """The uploader thread: runs queued work until the queue is empty, then ends.

        It runs at the process's priority: a lower one would stall the threads it shares the GIL
        with (the checkpointer's event loop) whenever the kernel parks it while it holds the GIL.
        """
        while True:
            with self._cond:
                while True:
                    if self._closing.is_set() or not self._heap:
                        self._cancel_queued()
                        self._thread = None
                        self._cond.notify_all()
                        return
                    not_before, _, kind, step = self._heap[0]
                    wait_s = not_before - time.monotonic()
                    if wait_s <= 0:
                        heapq.heappop(self._heap)
                        self._queued.discard((kind, step))
                        self._busy = True
                        self._running = step if kind == "upload" else None
                        break
                    self._cond.wait(wait_s)
            try:
                self._do(kind, step)
            except Exception:  # noqa: BLE001 - the thread must go on with the next item
                logger.exception("run %s: uploader task %s of step %d failed", self.run_name, kind, step)
            finally:
                with self._cond:
                    self._busy = False
                    self._running = None
                    self._cond.notify_all()

    def _cancel_queued(self) -> None:
        for _, _, kind, step in self._heap:
            future = self._futures.get(step)
            if kind == "upload" and future is not None and not future.done():
                future.cancel()
        self._heap.clear()
        self._queued.clear()

    def _do(self, kind: str, step: int) -> None:
        if kind == "retain":
            self.retain_remote()
        elif kind == "eval":
            self._copy_eval_metrics(step)
            self.retain_remote()
        else:
            self._upload(step)

    def _upload(self, step: int) -> None:
        future = self._futures.get(step)
        try:
            uri = self._upload_once(step)
        except CheckpointNotFoundError as exc:  # the local copy is gone: nothing to upload
            logger.info("upload of step %d of %s dropped: %s", step, self.run_name, exc)
            self._settle(future, error=exc)
        except Exception as exc:  # noqa: BLE001 - any failure is retried, then reported
            attempt = self._attempts.get(step, 0) + 1
            self._attempts[step] = attempt
            if attempt > self.policy.retries or self._closing.is_set():
                logger.error(
                    "upload of step %d of %s failed for good (kept locally; retried after the next "
                    "commit or restart): %s",
                    step,
                    self.run_name,
                    exc,
                )
                error = UploadError(
                    f"step {step} of run {self.run_name!r}: upload to {self.remote.uri} failed after "
                    f"{attempt} attempts: {exc}"
                )
                error.__cause__ = exc
                self.observer.upload_failure(self.run_name)
                with self._cond:
                    self._failed[step] = error
                self._settle(future, error=error)
                return
            self.observer.upload_retry(self.run_name)
            delay = self.policy.delay(attempt)
            logger.warning(
                "upload of step %d of %s failed (attempt %d): %s; retrying in %.2fs",
                step,
                self.run_name,
                attempt,
                exc,
                delay,
            )
            self._push("upload", step, delay)
        else:
            self._attempts.pop(step, None)
            self._settle(future, result=uri)

    @staticmethod
    def _settle(
        future: concurrent.futures.Future[str] | None, *, result: str | None = None, error: BaseException | None = None
    ) -> None:
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    # -- one upload ---------------------------------------------------------------------------
    def _upload_once(self, step: int) -> str:
        """Copy one committed local step to the remote tier and commit it there; its remote URI.

        Then the upload record, and retention on both tiers (it may now drop the local copy).
        """
        local, remote = self.store, self.remote
        manifest = local.read_manifest(step)
        try:
            existing = remote.read_manifest(step)
        except CheckpointNotFoundError:
            existing = None
        if existing is not None and existing.files == manifest.files:
            try:  # a remote copy this uploader did not just write is proven before it counts
                remote.reader.verify(existing)
            except DAMAGE as exc:
                logger.warning(
                    "run %s: the remote copy of step %d is not intact (%s); uploading it again",
                    self.run_name,
                    step,
                    exc,
                )
                existing = None
        if existing is not None and existing.files == manifest.files:
            logger.info("step %d of %s is already committed on %s", step, self.run_name, remote.uri)
            uri, remote_created = remote.step_uri(step), existing.created
        else:
            started = time.perf_counter()
            info = self._copy_step(step, manifest)
            uri, remote_created = info.uri, info.created
            seconds = time.perf_counter() - started
            self.observer.upload(self.run_name, seconds, info.files_size)
            logger.info(
                "uploaded step %d of %s to %s: %d bytes in %.3fs", step, self.run_name, uri, info.files_size, seconds
            )
        self._copy_eval_metrics(step)
        try:
            current = local.read_manifest(step)
        except CheckpointNotFoundError:
            current = None
        if current is not None and (current.created, current.files) == (manifest.created, manifest.files):
            record = {
                "step": step,
                "uri": uri,
                "uploaded": time.time(),
                "created": manifest.created,
                "remote_created": remote_created,
            }
            local.storage.write_atomic(f"{step_dir(step)}/{UPLOADED_FILE}", json.dumps(record).encode())
            self._mark(step, True)
        # retention on both tiers: the local copy may go now, the remote tier keeps what the rules keep
        changed = [step]
        try:
            changed += self.retain_remote()
        except (OSError, CorruptCheckpointError) as exc:
            logger.warning(
                "run %s: retention on %s after the upload of step %d failed: %s", self.run_name, remote.uri, step, exc
            )
        changed += local.retain_after_commit(step)
        self._emit(changed)
        return uri

    def _copy_step(self, step: int, manifest: Any) -> CheckpointInfo:
        """Commit the local step into the remote store as it was committed here (the store's one step
        copy: every file checked against the local marker, the marker last); its remote record.

        Retention is left to :meth:`retain_remote` (it ranks with both tiers' scores and leases).
        """
        architecture: bytes | None = None
        if not self.remote.storage.exists(ARCHITECTURE_FILE):  # written once per run
            try:
                architecture = self.store.storage.read_bytes(ARCHITECTURE_FILE)
            except FileNotFoundError:
                pass
        try:
            return self.remote.copy_step(
                self.store.storage, step_dir(step), manifest, architecture=architecture, overwrite=True, retain=False
            )
        except FileNotFoundError as exc:
            if not self.store.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
                raise CheckpointNotFoundError(f"step {step} of {self.run_name!r}: deleted before its upload") from exc
            raise

    def _copy_eval_metrics(self, step: int) -> None:
        metrics = self.store.eval_metrics(step)
        if metrics and self.remote.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            # the remote tier's retention is retain_remote's (both tiers' leases and scores)
            self.remote.report_eval(step, metrics, retain=False)

    # -- waiting and closing ------------------------------------------------------------------
    def upload_future(self, step: int) -> concurrent.futures.Future[str]:
        """A Future of ``step``'s remote URI: its queued upload, or a new one for a local-only step."""
        with self._cond:
            future = self._futures.get(step)
            if future is not None and not (future.done() and future.exception() is not None):
                return future
        if self._uploaded_record(step) and self.remote.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            done: concurrent.futures.Future[str] = concurrent.futures.Future()
            done.set_result(self.remote.step_uri(step))
            return done
        self._attempts.pop(step, None)
        return self._enqueue_upload(step)

    def pending_uploads(self) -> list[int]:
        """Steps whose upload is queued, waiting for a retry or running."""
        with self._cond:
            return sorted(s for s, f in self._futures.items() if not f.done())

    def failed_uploads(self) -> list[int]:
        """Steps whose upload failed for good (kept locally; queued again by the next commit)."""
        with self._cond:
            return sorted(self._failed)

    def stats(self) -> dict[str, Any]:
        """Pending and failed uploads, and how many local steps still lack a remote copy."""
        return {
            "remote_uri": self.remote.uri,
            "pending": self.pending_uploads(),
            "failed": self.failed_uploads(),
            "not_uploaded": sorted(self.not_uploaded_steps()),
        }

    def wait_for_uploads(self, timeout: float | None = None, *, raise_on_error: bool = True) -> dict[int, str]:
        """Block until every queued upload (and the retention after it) is done; ``{step: remote URI}``.

        Raises UploadError naming the steps whose upload failed (their local copies are kept)
        unless ``raise_on_error=False``, and TimeoutError when ``timeout`` passes first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            futures = dict(self._futures)
        concurrent.futures.wait(list(futures.values()), timeout=timeout)
        with self._cond:
            while self._heap or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
        done: dict[int, str] = {}
        failed: dict[int, BaseException] = {}
        for step, future in sorted(futures.items()):
            if not future.done():
                raise TimeoutError(f"upload of step {step} of {self.run_name!r} still running after {timeout}s")
            if future.cancelled():
                failed[step] = UploadError(f"step {step}: upload cancelled (the store was closed)")
            elif future.exception() is not None:
                failed[step] = future.exception()  # type: ignore[assignment]
            else:
                done[step] = future.result()
        if failed and raise_on_error:
            raise UploadError(f"run {self.run_name!r}: uploads failed for steps {sorted(failed)}: {failed}")
        return done

    def close(self, *, wait: bool = True) -> None:
        """Finish the queued uploads (``wait``) or cut them short (queued ones are cancelled)."""
        if not wait:
            self._closing.set()
        with self._cond:
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
