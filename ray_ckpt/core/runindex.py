"""The run's index on storage: ``index.parquet`` (a snapshot) plus ``index_log/`` (changes since).

:meth:`RunIndex.load` reads the snapshot, the log entries written after it and one listing of
``checkpoints/``; it reads a marker (and its eval sidecar) only for a step that neither the
snapshot nor the log knows, and drops steps that are gone. From then on the writer's in-memory
index is the truth: each change (a commit, a deletion, eval scores) appends one small log entry,
and every ``COMPACT_EVERY`` entries the snapshot is rewritten (naming the entries it folded in)
and those entries removed. Entries are named by time and a random id, so another process (an
evaluator reporting scores) may append too; the writer picks such entries up with one listing
per save (:meth:`RunIndex.sync`). So a save or a query costs the same storage requests at step
10 and at step 10,000; opening a run costs one snapshot read, the entry reads since the last
compaction and one listing.

Everything read goes through the validating reader: a damaged snapshot or entry is skipped with
one warning (the listing and the markers still find every committed step).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from ray_ckpt.core.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from ray_ckpt.core.index import CheckpointIndex, CheckpointInfo, check_name, check_record
from ray_ckpt.core.layout import (
    CHECKPOINTS_DIR,
    EVAL_FILE,
    INDEX_LOG_DIR,
    INDEX_SNAPSHOT,
    MARKER_FILE,
    REPLACE_RE,
    Manifest,
    metrics_from_json,
    metrics_to_json,
    parse_step_dir,
    read_metrics_file,
    step_dir,
)
from ray_ckpt.core.reader import StepReader
from ray_ckpt.core.safejson import DAMAGE, MAX_STEP, DamageLog, JsonObject
from ray_ckpt.core.storage.storage import Storage

logger = logging.getLogger(__name__)

COMPACT_EVERY = 32  # log entries between snapshot rewrites
FOLDED_KEY = "ray_ckpt.folded"  # the snapshot's metadata: the log entries it includes (a JSON list)
_ENTRY_RE = re.compile(r"^\d{20}-[0-9a-f]{8}\.json$")
_RECORD_FIELDS = ("created", "total_size", "files_size", "world_size", "metadata")


def _new_entry_name() -> str:
    """A log entry's name: sortable by time, unique across processes."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"


class RunIndex:
    """A run's index as the writer keeps it: in memory, persisted as a snapshot plus a log."""

    def __init__(
        self,
        storage: Storage,
        reader: StepReader,
        index: CheckpointIndex,
        damaged: DamageLog,
        info_from_manifest: Callable[[Manifest], CheckpointInfo],
    ) -> None:
        self.storage = storage
        self.reader = reader
        self.index = index
        self.damaged = damaged
        self._info_from_manifest = info_from_manifest
        self.loaded = False
        self.markers_read = 0  # markers read at the last load (a snapshot is then worth writing)
        self._known: set[str] = set()  # log entries applied or folded into the snapshot
        self._pending: list[str] = []  # log entries not yet folded into a snapshot we wrote
        self._logged: dict[int, str] = {}  # steps a log entry committed, not yet checked against markers

    # -- opening ------------------------------------------------------------------------------
    def load(self) -> None:
        """(Re)read the index from storage: snapshot, then the log after it, then the listing."""
        self.index.clear()
        folded = self._read_snapshot()
        self._known, self._pending = set(folded), []
        names = self._log_names()
        self._pending = [n for n in names if n in folded]  # folded already; a compaction died before removing it
        self._apply_new(names)
        self.markers_read = self._reconcile()
        self.loaded = True

    def sync(self) -> int:
        """Apply log entries other processes appended since (one listing); how many."""
        names = self._log_names()
        self._known &= set(names) | set(self._pending)
        applied = self._apply_new(names)
        self._check_logged()
        return applied

    def _apply_new(self, names: list[str]) -> int:
        new = [n for n in names if n not in self._known]
        for name in new:
            self._apply_entry(name)
            self._known.add(name)
            self._pending.append(name)
        return len(new)

    def _read_snapshot(self) -> set[str]:
        """Load the snapshot's records; the log entries it folded in."""
        try:
            data = self.storage.read_bytes(INDEX_SNAPSHOT)
        except FileNotFoundError:
            return set()
        except StorageError as exc:
            self.damaged.skip(exc, "rebuilding the index from the checkpoint.json files")
            return set()
        try:
            records, metadata = CheckpointIndex.read_parquet_bytes(data)
            for record in records:
                check_record(record)
            folded = json.loads(metadata.get(FOLDED_KEY, "[]"))
            if not isinstance(folded, list) or not all(isinstance(n, str) for n in folded):
                raise ValueError(f"{FOLDED_KEY} is not a list of names")
        except Exception as exc:  # noqa: BLE001 - any damage: the markers rebuild it
            self.damaged.skip(
                CorruptCheckpointError(f"{INDEX_SNAPSHOT}: unreadable ({exc})", path=INDEX_SNAPSHOT),
                "rebuilding the index from the checkpoint.json files",
            )
            return set()
        for record in records:  # the run may have been copied or moved since the snapshot was written
            record.uri = self.storage.url(step_dir(record.step))
        self.index.extend(records)
        return set(folded)

    def _log_names(self) -> list[str]:
        return sorted(n for n in self.storage.list_names(INDEX_LOG_DIR) if _ENTRY_RE.match(n))

    def _apply_entry(self, name: str) -> None:
        path = f"{INDEX_LOG_DIR}/{name}"
        try:
            doc = JsonObject.parse(self.storage.read_bytes(path), name=path)
            op = doc.str("op")
            step = doc.int("step", lo=0, hi=MAX_STEP)
            if op == "commit":
                record = doc.obj("record")
                info = CheckpointInfo(
                    step=step,
                    uri=self.storage.url(step_dir(step)),
                    metrics=metrics_from_json(record.any("metrics") or {}, name=path, where="record.metrics"),
                    created=record.float("created"),
                    total_size=record.int("total_size", lo=0),
                    files_size=record.int("files_size", lo=0),
                    world_size=record.int("world_size", lo=1),
                    metadata=record.dict("metadata", {}),
                    durability=[str(d) for d in record.list("durability", [])],
                )
                self._checked(info, path)
                self.index.add(info)
                self._logged[step] = path
            elif op == "delete":
                self.index.remove(step)
                self._logged.pop(step, None)
            elif op == "metrics":
                metrics = metrics_from_json(doc.any("metrics") or {}, name=path)
                for key in metrics:
                    self._checked_name(key, path)
                if step in self.index:
                    self.index.update_metrics(step, metrics)
            else:
                raise doc.error("op", f"unknown operation {op!r}")
        except FileNotFoundError:
            return
        except DAMAGE as exc:
            self.damaged.skip(exc, "the change is ignored (the markers still list every commit)")

    def _reconcile(self) -> int:
        """Match the index to the step directories: read the markers of steps it lacks, drop the
        gone; how many markers it read."""
        names = self.storage.list_names(CHECKPOINTS_DIR)
        on_storage = {s for s in map(parse_step_dir, names) if s is not None}
        for step in [s for s in self.index.steps() if s not in on_storage]:
            self.index.remove(step)
        # A step being replaced (overwrite=True) may be between its old marker and its new one on an
        # object store: read those markers again (few: one per replacement in flight or cut short).
        replacing = {int(m.group(1)) for m in map(REPLACE_RE.match, names) if m is not None}
        for step in sorted(replacing & set(self.index.steps())):
            self.index.remove(step)
        self._check_logged()
        unknown = sorted(on_storage - set(self.index.steps()))
        for step in unknown:
            info = self.read_step(step)
            if info is not None:
                self.index.add(info)
        return len(unknown)

    def _check_logged(self) -> None:
        """Cross-check the steps log entries committed against their markers.

        A log entry is a claim, not a commit: only a marker commits a step. A ``commit`` entry
        for a directory without a marker (planted, or a deletion cut short) would list a phantom
        step, rank it, and let retention delete real ones for it. Each such step's marker is
        read once (the entries since the last compaction, not the run's steps); a step without
        one is dropped with one warning naming the entry, and a record that differs from its
        marker is replaced by the marker's.
        """
        logged, self._logged = self._logged, {}
        for step, entry in sorted(logged.items()):
            info = self.index.get(step)
            if info is None:
                continue
            try:
                manifest = self.reader.read_manifest(step)
            except CheckpointNotFoundError:
                self.index.remove(step)
                self.damaged.skip(
                    CorruptCheckpointError(f"{entry}: commits step {step}, which has no {MARKER_FILE}", path=entry),
                    "the step is not listed",
                )
                continue
            except DAMAGE as exc:
                self.index.remove(step)
                self.damaged.skip(exc, f"step {step} is skipped")
                continue
            if manifest.created != info.created:  # the entry is not this marker's: the marker wins
                self.index.remove(step)
                found = self.read_step(step)
                if found is not None:
                    self.index.add(found)

    def read_step(self, step: int) -> CheckpointInfo | None:
        """A step's record from its marker and eval sidecar; None when it is not committed or damaged."""
        marker = f"{step_dir(step)}/{MARKER_FILE}"
        try:
            info = self._checked(self._info_from_manifest(self.reader.read_manifest(step)), marker)
        except (CheckpointNotFoundError, FileNotFoundError):
            return None  # no marker: a save in flight or a crash's leftover
        except DAMAGE as exc:
            self.damaged.skip(exc, f"step {step} is skipped")
            return None
        info.metrics.update(self.read_eval_metrics(step))
        return info

    @staticmethod
    def _checked(info: CheckpointInfo, path: str) -> CheckpointInfo:
        """``info`` if the snapshot can store it (:func:`check_record`), else damage naming ``path``."""
        try:
            check_record(info)
        except ValueError as exc:
            raise CorruptCheckpointError(f"{path}: {exc}", path=path) from None
        return info

    @staticmethod
    def _checked_name(name: str, path: str) -> None:
        try:
            check_name(name, "metric")
        except ValueError as exc:
            raise CorruptCheckpointError(f"{path}: {exc}", path=path) from None

    def read_eval_metrics(self, step: int) -> dict[str, float]:
        """A step's eval_metrics.json ({} when absent; a damaged one is ignored with a warning)."""
        path = f"{step_dir(step)}/{EVAL_FILE}"
        try:
            metrics = read_metrics_file(self.storage.read_bytes(path), name=path)
            for key in metrics:
                self._checked_name(key, path)
            return metrics
        except FileNotFoundError:
            return {}
        except DAMAGE as exc:
            self.damaged.skip(exc, "its scores are ignored")
            return {}

    # -- changes ------------------------------------------------------------------------------
    def commit(self, info: CheckpointInfo) -> None:
        """A step committed (or was replaced)."""
        self.index.add(info)
        record = {k: getattr(info, k) for k in _RECORD_FIELDS}
        record.update(metrics=metrics_to_json(info.metrics), durability=list(info.durability))
        self._append({"op": "commit", "step": info.step, "record": record})

    def delete(self, step: int) -> None:
        """A step was deleted."""
        if self.index.remove(step) is not None:
            self._append({"op": "delete", "step": step})

    def update_metrics(self, step: int, metrics: dict[str, float]) -> CheckpointInfo | None:
        """Eval scores joined a step's record; the updated record (None for an unknown step)."""
        if step not in self.index:
            return None
        info = self.index.update_metrics(step, metrics)
        self._append({"op": "metrics", "step": step, "metrics": metrics_to_json(metrics)})
        return info

    def _append(self, entry: dict[str, Any]) -> None:
        """One log entry (one small write); every COMPACT_EVERY entries, a new snapshot."""
        name = _new_entry_name()
        try:
            self.storage.write_atomic(f"{INDEX_LOG_DIR}/{name}", json.dumps(entry, default=str).encode())
        except (OSError, StorageError) as exc:  # the log is an optimisation: the markers are the truth
            logger.warning("could not write %s/%s: %s (the next open reads the markers)", INDEX_LOG_DIR, name, exc)
            return
        self._known.add(name)
        self._pending.append(name)
        if len(self._pending) >= COMPACT_EVERY:
            self.compact()

    def forget(self) -> None:
        """Remove the snapshot and every log entry (the next load reads the markers)."""
        self.storage.rm(INDEX_SNAPSHOT, missing_ok=True)
        for name in self._log_names():
            self.storage.rm(f"{INDEX_LOG_DIR}/{name}", missing_ok=True)
        self._known, self._pending, self.loaded = set(), [], False

    def compact(self) -> None:
        """Rewrite the snapshot to include every change so far, then remove the folded log entries."""
        folded = list(self._pending)
        try:
            data = self.index.to_parquet_bytes({FOLDED_KEY: json.dumps(folded)})
            self.storage.write_atomic(INDEX_SNAPSHOT, data)
        except Exception as exc:  # noqa: BLE001 - the snapshot is an optimisation: never a commit's error
            logger.warning("could not write %s: %s (the log entries stay)", INDEX_SNAPSHOT, exc)
            return
        self._pending = []
        for name in folded:
            try:
                self.storage.rm(f"{INDEX_LOG_DIR}/{name}", missing_ok=True)
            except (OSError, StorageError) as exc:  # named again by the next snapshot, removed then
                logger.warning("could not remove %s/%s: %s", INDEX_LOG_DIR, name, exc)
                self._pending.append(name)
        self.markers_read = 0
