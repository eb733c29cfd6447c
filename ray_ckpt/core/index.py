"""In-memory queries over checkpoint records (latest, best, top-k by any metric) and their
Parquet snapshot. Knows nothing of the storage layout: records in, records out.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import io
import json
import math
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class CheckpointInfo:
    """What is known of one committed checkpoint."""

    step: int
    uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    created: float = 0.0
    total_size: int = 0  # tensor bytes of the model state
    files_size: int = 0  # bytes of every file of the checkpoint
    world_size: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)
    durability: list[str] = field(default_factory=lambda: ["local"])

    def metric(self, name: str) -> float | None:
        """The finite value of a metric, or None when it is missing, NaN or inf."""
        return rankable(self.metrics.get(name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointInfo:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


MAX_INT64 = 2**63 - 1  # the snapshot's step and size columns
MAX_INT32 = 2**31 - 1  # its world_size column
# A snapshot's rows are bounded by its size before it is decoded: a real row holds at least a
# distinct int64 step and float64 creation time, so a file of n bytes holds at most n / 8 rows
# (a dictionary/RLE-encoded bomb claims millions of rows in kilobytes), and at most
# SNAPSHOT_VALUES_PER_BYTE values (metrics, durability entries) per byte.
SNAPSHOT_MIN_ROW_BYTES = 8
SNAPSHOT_VALUES_PER_BYTE = 64


def check_record(record: CheckpointInfo) -> None:
    """ValueError naming the field unless the snapshot can store ``record`` as it is.

    The one check of a record on its way into an index from storage (a marker, a log entry, a
    snapshot): what is accepted can always be written back (int64 steps and sizes, an int32
    world size, UTF-8 names), so a compaction never fails on a value a reader took.
    """
    for name, lo, hi in (
        ("step", 0, MAX_INT64),
        ("total_size", 0, MAX_INT64),
        ("files_size", 0, MAX_INT64),
        ("world_size", 1, MAX_INT32),
    ):
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"step {record.step!r}: {name} {value!r} is outside [{lo}, {hi}]")
    if not isinstance(record.created, float):
        raise ValueError(f"step {record.step}: created {record.created!r} is not a number")
    if not isinstance(record.metadata, dict) or not isinstance(record.metrics, dict):
        raise ValueError(f"step {record.step}: metadata and metrics must be objects")
    for key, value in record.metrics.items():
        check_name(key, f"step {record.step}: metric")
        if not isinstance(value, float):
            raise ValueError(f"step {record.step}: metric {key!r} is not a number")
    if not isinstance(record.durability, list):
        raise ValueError(f"step {record.step}: durability must be a list")
    for tier in record.durability:
        check_name(tier, f"step {record.step}: durability")
    check_name(record.uri, f"step {record.step}: uri")


def check_name(name: Any, what: str) -> None:
    """ValueError unless ``name`` is a string that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(name, str):
        raise ValueError(f"{what} {name!r} is not a string")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {name!r} is not valid Unicode (a lone surrogate)") from None


def rankable(value: Any) -> float | None:
    """A metric value usable for ranking: a finite real number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class CheckpointIndex:
    """Checkpoint records keyed by step, with O(k) top-k queries.

    A sorted list per (metric, mode) is built on first use and kept up to date by every
    add/remove, so queries never sort the whole run.
    """

    def __init__(self, metric_name: str | None = None, mode: str = "min") -> None:
        self.metric_name = metric_name
        self.mode = mode
        self._records: dict[int, CheckpointInfo] = {}
        self._steps: list[int] = []
        self._rankings: dict[tuple[str, str], list[tuple[float, int]]] = {}
        # Counts changes, so a view derived from this index (a tiered store's union of tiers)
        # knows when to rebuild itself without comparing records.
        self.changes = 0

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, step: object) -> bool:
        return step in self._records

    # -- updates ------------------------------------------------------------------------------
    def add(self, info: CheckpointInfo) -> None:
        """Insert or replace the record of ``info.step``."""
        if info.step in self._records:
            self.remove(info.step)
        self.changes += 1
        self._records[info.step] = info
        bisect.insort(self._steps, info.step)
        for (metric, mode), ranking in self._rankings.items():
            entry = _ranking_entry(info, metric, mode)
            if entry is not None:
                bisect.insort(ranking, entry)

    def remove(self, step: int) -> CheckpointInfo | None:
        """Drop a step's record; returns it (None if absent)."""
        info = self._records.pop(step, None)
        if info is None:
            return None
        self.changes += 1
        del self._steps[bisect.bisect_left(self._steps, step)]
        for (metric, mode), ranking in self._rankings.items():
            entry = _ranking_entry(info, metric, mode)
            if entry is not None:
                i = bisect.bisect_left(ranking, entry)
                if i < len(ranking) and ranking[i] == entry:
                    del ranking[i]
        return info

    def update_metrics(self, step: int, metrics: dict[str, float]) -> CheckpointInfo:
        """Merge metrics (e.g. eval scores) into a step's record; KeyError if unknown."""
        info = self._records[step]
        updated = CheckpointInfo.from_dict({**info.to_dict(), "metrics": {**info.metrics, **metrics}})
        self.add(updated)
        return updated

    def clear(self) -> None:
        self.changes += 1
        self._records.clear()
        self._steps.clear()
        self._rankings.clear()

    # -- queries ------------------------------------------------------------------------------
    def get(self, step: int) -> CheckpointInfo | None:
        return self._records.get(step)

    def steps(self) -> list[int]:
        """All steps, oldest first."""
        return list(self._steps)

    def list(self) -> list[CheckpointInfo]:
        """All records, oldest first."""
        return [self._records[s] for s in self._steps]

    def latest(self) -> CheckpointInfo | None:
        return self._records[self._steps[-1]] if self._steps else None

    def top_k(self, k: int, metric: str | None = None, mode: str | None = None) -> list[CheckpointInfo]:
        """The ``k`` best records by ``metric`` (default: the run's), best first.

        Records whose metric is missing, NaN or inf are never ranked. Ties go to the newer step.
        """
        metric = metric or self.metric_name
        mode = mode or self.mode
        if metric is None:
            raise ValueError("top_k: no metric given and the run has no metric_name")
        if mode not in ("max", "min"):
            raise ValueError(f"top_k: mode must be 'max' or 'min', got {mode!r}")
        if k <= 0:
            return []
        ranking = self._rankings.get((metric, mode))
        if ranking is None:
            ranking = self._build_ranking(metric, mode)
            self._rankings[(metric, mode)] = ranking
        return [self._records[-neg_step] for _, neg_step in ranking[:k]]

    def _build_ranking(self, metric: str, mode: str) -> list[tuple[float, int]]:
        """The sorted (key, -step) entries of every rankable record (one pass, floats on a fast path)."""
        sign = 1.0 if mode == "min" else -1.0
        entries = []
        with _gc_paused():
            for step, info in self._records.items():
                value = info.metrics.get(metric)
                if type(value) is float:
                    if value - value == 0.0:  # finite: NaN and +-inf give NaN
                        entries.append((sign * value, -step))
                    continue
                entry = _ranking_entry(info, metric, mode)
                if entry is not None:
                    entries.append(entry)
            entries.sort()
        return entries

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        found = self.top_k(1, metric, mode)
        return found[0] if found else None

    # -- snapshot -----------------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        """The records as an Arrow table (one row per checkpoint), built column by column."""
        records = self.list()
        keys: list[str] = []
        values: list[float] = []
        offsets = [0]
        for r in records:
            for k, v in r.metrics.items():
                if type(v) is float or _is_number(v):  # the common case first: _is_number costs 2 calls
                    keys.append(k)
                    values.append(float(v))
            offsets.append(len(keys))
        encode = json.JSONEncoder(default=str).encode  # one encoder: json.dumps builds one per call
        return pa.table(
            {
                "step": pa.array([r.step for r in records], pa.int64()),
                "uri": pa.array([r.uri for r in records], pa.string()),
                "created": pa.array([r.created for r in records], pa.float64()),
                "total_size": pa.array([r.total_size for r in records], pa.int64()),
                "files_size": pa.array([r.files_size for r in records], pa.int64()),
                "world_size": pa.array([r.world_size for r in records], pa.int32()),
                "metrics": pa.MapArray.from_arrays(
                    pa.array(offsets, pa.int32()), pa.array(keys, pa.string()), pa.array(values, pa.float64())
                ),
                "metadata": pa.array([encode(r.metadata) if r.metadata else "{}" for r in records], pa.string()),
                "durability": pa.array([r.durability for r in records], pa.list_(pa.string())),
            }
        )

    def to_parquet_bytes(self, metadata: dict[str, str] | None = None) -> bytes:
        """The Parquet snapshot of the records; ``metadata`` goes into the file's key-value metadata."""
        table = self.to_table()
        if metadata:
            table = table.replace_schema_metadata(metadata)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()

    @classmethod
    def records_from_parquet_bytes(cls, data: bytes) -> list[CheckpointInfo]:
        """Parse a snapshot written by :meth:`to_parquet_bytes` (its records only)."""
        return cls.read_parquet_bytes(data)[0]

    @classmethod
    def read_parquet_bytes(cls, data: bytes) -> tuple[list[CheckpointInfo], dict[str, str]]:
        """Parse a snapshot written by :meth:`to_parquet_bytes`: its records and its metadata.

        Column by column, with the cyclic GC paused and the metadata column decoded in one
        ``json.loads``: a restarted checkpointer restores a million records in seconds, not a minute.
        """
        # Read from an Arrow-owned copy: Arrow's worker threads must never hold the last reference
        # to a Python object (bytes/BytesIO), or releasing it at interpreter exit takes the GIL
        # during finalisation and the process aborts ("terminate called without an active exception").
        owned = pa.allocate_buffer(len(data))
        memoryview(owned).cast("B")[:] = data
        _check_snapshot_size(pq.ParquetFile(pa.BufferReader(owned)).metadata, len(data))
        table = pq.read_table(pa.BufferReader(owned))
        file_metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if table.num_rows == 0:
            return [], file_metadata

        def column(name: str) -> pa.Array:
            return table.column(name).combine_chunks()  # one chunk whose offsets start at 0

        def bounds(array: pa.Array) -> Iterator[tuple[int, int]]:
            offsets = array.offsets.to_pylist()
            return zip(offsets, offsets[1:], strict=False)

        with _gc_paused():
            metrics_col, durability_col = column("metrics"), column("durability")
            keys, values = metrics_col.keys.to_pylist(), metrics_col.items.to_pylist()
            metrics = [dict(zip(keys[a:b], values[a:b], strict=True)) for a, b in bounds(metrics_col)]
            flat = durability_col.values.to_pylist()
            durability = [flat[a:b] for a, b in bounds(durability_col)]
            metadata = _json_column(column("metadata").to_pylist())
            records = [
                CheckpointInfo(
                    step=int(step),
                    uri=uri,
                    metrics=m,
                    created=float(created),
                    total_size=int(total_size),
                    files_size=int(files_size),
                    world_size=int(world_size),
                    metadata=meta,
                    durability=durable,
                )
                for step, uri, m, created, total_size, files_size, world_size, meta, durable in zip(
                    column("step").to_pylist(),
                    column("uri").to_pylist(),
                    metrics,
                    column("created").to_pylist(),
                    column("total_size").to_pylist(),
                    column("files_size").to_pylist(),
                    column("world_size").to_pylist(),
                    metadata,
                    durability,
                    strict=True,
                )
            ]
        return records, file_metadata

    def extend(self, records: Iterable[CheckpointInfo]) -> None:
        """Add many records; into an empty index (a restart) in bulk: one sort, not n insertions."""
        if self._records:
            for record in records:
                self.add(record)
            return
        self.changes += 1
        with _gc_paused():
            for record in records:
                self._records[record.step] = record  # a later duplicate replaces, as add() does
            self._steps = sorted(self._records)
            self._rankings.clear()  # rebuilt on the next query


@dataclass
class IndexDelta:
    """What a follower needs to catch up with an :class:`IndexFeed`.

    Either every record (``reset``: a new follower, one too far behind, or a restarted master) or
    the current record of each step changed after version ``base``, and the steps removed since.
    """

    epoch: str
    base: int
    version: int
    upserts: list[CheckpointInfo]
    removed: list[int]
    reset: bool = False


def new_epoch() -> str:
    """A feed epoch: unique, and later epochs sort after earlier ones (time first)."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


def position_reached(have: tuple[str | None, int], want: tuple[str, int]) -> bool:
    """Whether a replica at ``have`` (epoch, version) includes every change up to ``want``.

    A later epoch (a master restarted since) was read whole from storage: it includes ``want``.
    """
    if have[0] is None or have[0] < want[0]:
        return False
    return have[0] > want[0] or have[1] >= want[1]


class IndexFeed:
    """Numbers every change to a :class:`CheckpointIndex` so followers can keep a replica by deltas.

    Changes go through the feed (``add``, ``remove``, ``update_metrics``, ``reset``); a follower
    asks for :meth:`changes_since` its (epoch, version). The log keeps the last ``history``
    changed steps; a follower further behind gets every record instead.
    """

    def __init__(self, index: CheckpointIndex, history: int = 10_000) -> None:
        self.index = index
        self.epoch = new_epoch()
        self.version = 0
        self._log: deque[tuple[int, int]] = deque(maxlen=max(1, history))  # (version, step changed)

    def _changed(self, step: int) -> None:
        self.version += 1
        self._log.append((self.version, step))

    def add(self, info: CheckpointInfo) -> None:
        self.index.add(info)
        self._changed(info.step)

    def remove(self, step: int) -> CheckpointInfo | None:
        removed = self.index.remove(step)
        if removed is not None:
            self._changed(step)
        return removed

    def update_metrics(self, step: int, metrics: dict[str, float]) -> CheckpointInfo:
        info = self.index.update_metrics(step, metrics)
        self._changed(step)
        return info

    def reset(self, records: Iterable[CheckpointInfo]) -> None:
        """Replace every record (a re-read from storage): followers start over from a full copy."""
        self.index.clear()
        self.index.extend(records)
        self.epoch = new_epoch()
        self.version = 0
        self._log.clear()

    def changes_since(self, epoch: str | None, version: int) -> IndexDelta:
        """The delta that brings a follower at (``epoch``, ``version``) up to date."""
        oldest = self._log[0][0] if self._log else self.version + 1
        if epoch != self.epoch or version > self.version or version < oldest - 1:
            return IndexDelta(self.epoch, version, self.version, self.index.list(), [], reset=True)
        changed: set[int] = set()
        for logged_version, step in reversed(self._log):
            if logged_version <= version:
                break
            changed.add(step)
        upserts = [info for info in (self.index.get(s) for s in sorted(changed)) if info is not None]
        removed = sorted(s for s in changed if s not in self.index)
        return IndexDelta(self.epoch, version, self.version, upserts, removed)


class IndexReplica:
    """A follower's copy of a master's index, kept current by applying :class:`IndexDelta` s."""

    def __init__(self, metric_name: str | None = None, mode: str = "min") -> None:
        self.index = CheckpointIndex(metric_name, mode)
        self.epoch: str | None = None
        self.version = -1

    def apply(self, delta: IndexDelta) -> bool:
        """Apply a delta; False (and nothing changed) when it is older than what the replica has."""
        if delta.reset:
            if delta.epoch == self.epoch and delta.version <= self.version:
                return False
            self.index.clear()
            self.index.extend(delta.upserts)
        else:
            if delta.epoch != self.epoch or delta.version <= self.version:
                return False
            if delta.base > self.version:
                raise ValueError(
                    f"index delta from version {delta.base} cannot apply to a replica at version {self.version}"
                )
            for step in delta.removed:
                self.index.remove(step)
            for info in delta.upserts:
                self.index.add(info)
        self.epoch, self.version = delta.epoch, delta.version
        return True


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many objects (it would rescan the heap over and over)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _check_snapshot_size(meta: pq.FileMetaData, size: int) -> None:
    """ValueError unless a snapshot's rows and values fit its size (checked before decoding)."""
    if meta.num_rows > max(size // SNAPSHOT_MIN_ROW_BYTES, 1):
        raise ValueError(f"{meta.num_rows} rows in {size} bytes: not a snapshot this index wrote (refused undecoded)")
    values = sum(
        meta.row_group(g).column(c).num_values for g in range(meta.num_row_groups) for c in range(meta.num_columns)
    )
    if values > SNAPSHOT_VALUES_PER_BYTE * size:
        raise ValueError(f"{values} values in {size} bytes: not a snapshot this index wrote (refused undecoded)")


def _json_column(texts: list[str | None]) -> list[Any]:
    """Decode a column of JSON texts (null/empty -> {}): one json.loads over all rows, else row by row."""
    texts = [text or "{}" for text in texts]
    try:
        decoded = json.loads("[" + ",".join(texts) + "]")
        if len(decoded) == len(texts):
            return decoded
    except ValueError:
        pass
    return [json.loads(text) for text in texts]  # raises on the malformed row


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ranking_entry(info: CheckpointInfo, metric: str, mode: str) -> tuple[float, int] | None:
    value = info.metric(metric)
    if value is None:
        return None
    return (value if mode == "min" else -value, -info.step)
