"""Every metric ray-ckpt exports, defined once: the checkpointer, workers, eval clients and uploads.

Ray's ``ray.util.metrics`` prefixes each name with ``ray_`` when it exports it (Ray 2.60:
``ray._private.telemetry.open_telemetry_metric_recorder.NAMESPACE``; the older OpenCensus exporter
used the same ``ray`` namespace), so the names here start with ``ckpt_`` and Prometheus sees
``ray_ckpt_*``; counters get Prometheus' ``_total`` suffix as well, e.g.
``ray_ckpt_committed_bytes_total``. :data:`EXPORTED_NAMES` lists what a scrape shows.

Each observation is one call, e.g. ``metrics.observe_commit(run, seconds, nbytes)``. Metrics are
created lazily, once per process, on their first observation in a process connected to Ray
(``ray.is_initialized()``); without Ray, or before ``ray.init``, an observation does nothing.
An observation never raises: metrics must not fail a save or a query. Every metric is tagged
with the run name (``run``); nothing per rank or per step, so the number of series stays small.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ray_ckpt.core.hooks import TransferObserver

logger = logging.getLogger(__name__)

#: What Ray puts before a metric's name when it exports it.
RAY_EXPORT_PREFIX = "ray_"

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
_QUERY_SECONDS = (0.00001, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its Ray name (exported with :data:`RAY_EXPORT_PREFIX`), kind and help text."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    boundaries: tuple[float, ...] = ()

    @property
    def exported_name(self) -> str:
        """The metric family's name as Prometheus shows it (counters end in ``_total``)."""
        suffix = "_total" if self.kind == "counter" else ""
        return f"{RAY_EXPORT_PREFIX}{self.name}{suffix}"


SPECS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        # the checkpointer (master rank)
        MetricSpec("ckpt_save_seconds", "histogram", "Seconds from a step's first rank report to its commit", _SECONDS),
        MetricSpec("ckpt_committed_bytes", "counter", "Bytes of committed checkpoints (model and trainer state)"),
        MetricSpec("ckpt_commits", "counter", "Committed checkpoints"),
        MetricSpec("ckpt_pending_saves", "gauge", "Steps waiting for ranks or being written by the checkpointer"),
        MetricSpec("ckpt_query_seconds", "histogram", "Index query latency inside the checkpointer", _QUERY_SECONDS),
        # workers (WorkerClient.save)
        MetricSpec("ckpt_worker_blocked_seconds", "histogram", "Seconds a save() held the training loop", _SECONDS),
        MetricSpec("ckpt_worker_snapshot_bytes", "counter", "Bytes a worker snapshotted for saves"),
        # eval clients (EvalClient)
        MetricSpec("ckpt_eval_load_seconds", "histogram", "Seconds an eval client took to load a checkpoint", _SECONDS),
        MetricSpec(
            "ckpt_eval_query_seconds",
            "histogram",
            "Index query latency seen by an eval client (its live copy, else the checkpointer)",
            _QUERY_SECONDS,
        ),
        # the memory tier
        MetricSpec("ckpt_memory_bytes", "gauge", "Bytes of memory steps held in the holders (every copy)"),
        MetricSpec("ckpt_memory_steps", "gauge", "Steps committed in memory and kept"),
        MetricSpec(
            "ckpt_memory_commit_seconds",
            "histogram",
            "Replica lag: seconds from a step's first rank joining to its commit in memory (every copy made)",
            _SECONDS,
        ),
        MetricSpec(
            "ckpt_recovery_memory_seconds", "histogram", "Seconds a WorkerClient.load took from memory", _SECONDS
        ),
        MetricSpec(
            "ckpt_recovery_storage_seconds", "histogram", "Seconds a WorkerClient.load took from storage", _SECONDS
        ),
        # uploads to the remote tier
        MetricSpec("ckpt_upload_bytes", "counter", "Bytes of checkpoints uploaded to the remote tier"),
        MetricSpec("ckpt_upload_seconds", "histogram", "Seconds one checkpoint upload took", _SECONDS),
        MetricSpec("ckpt_upload_retries", "counter", "Failed upload attempts that are retried"),
        MetricSpec("ckpt_upload_failures", "counter", "Uploads that failed for good (kept locally)"),
    )
}

#: Every metric family name a Prometheus scrape of a Ray node shows for ray-ckpt.
EXPORTED_NAMES: tuple[str, ...] = tuple(spec.exported_name for spec in SPECS.values())

_LOCK = threading.Lock()
_CREATED: dict[str, Any] = {}
_warned = False


def _ray() -> Any | None:
    """The ``ray`` module when this process is connected to Ray, else None (never imports Ray:
    a process that has not imported it is not connected)."""
    ray = sys.modules.get("ray")
    if ray is None or not hasattr(ray, "is_initialized"):
        return None
    return ray if ray.is_initialized() else None


def _metric(name: str) -> Any | None:
    """The process's Ray metric ``name`` (created on first use), or None when Ray is not connected.

    Checked on every call: after ``ray.shutdown()`` nothing is recorded into the old session.
    """
    ray = _ray()
    if ray is None:
        return None
    metric = _CREATED.get(name)
    if metric is not None:
        return metric
    from ray.util import metrics as ray_metrics

    spec = SPECS[name]
    with _LOCK:
        metric = _CREATED.get(name)
        if metric is None:
            if spec.kind == "counter":
                metric = ray_metrics.Counter(spec.name, spec.description, tag_keys=("run",))
            elif spec.kind == "gauge":
                metric = ray_metrics.Gauge(spec.name, spec.description, tag_keys=("run",))
            else:
                metric = ray_metrics.Histogram(
                    spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=("run",)
                )
            _CREATED[name] = metric
    return metric


def _record(name: str, run: str, value: float) -> None:
    """Record one value of metric ``name`` for ``run``; never raises (a failure is logged once)."""
    global _warned
    try:
        metric = _metric(name)
        if metric is None:
            return
        tags = {"run": str(run)}
        kind = SPECS[name].kind
        if kind == "counter":
            if value > 0:
                metric.inc(float(value), tags=tags)
        elif kind == "gauge":
            metric.set(float(value), tags=tags)
        else:
            metric.observe(float(value), tags=tags)
    except Exception as exc:  # noqa: BLE001 - metrics never fail the caller
        if not _warned:
            _warned = True
            logger.warning("ray-ckpt metrics disabled in this process after an error: %s: %s", type(exc).__name__, exc)


# -- gauges: refreshed, or Ray drops them --------------------------------------------------------
# Ray's metrics agent drops a series not recorded within about two export intervals (10 s each by
# default): a gauge set only when it changes (no save for a minute) would vanish from Prometheus.
# Every gauge's last value is set again every GAUGE_REFRESH_S by one daemon thread per process.
GAUGE_REFRESH_S = 5.0
_GAUGES: dict[tuple[str, str], float] = {}
_refresher: threading.Thread | None = None


def _set_gauge(name: str, run: str, value: float) -> None:
    """Set a gauge now and keep it set (see GAUGE_REFRESH_S)."""
    global _refresher
    with _LOCK:
        _GAUGES[(name, str(run))] = float(value)
        if _refresher is None or not _refresher.is_alive():
            _refresher = threading.Thread(target=_refresh_gauges, name="ray-ckpt-gauges", daemon=True)
            _refresher.start()
    _record(name, run, value)


def _refresh_gauges() -> None:
    while True:
        time.sleep(GAUGE_REFRESH_S)
        with _LOCK:
            values = list(_GAUGES.items())
        for (name, run), value in values:
            _record(name, run, value)


# -- the checkpointer -------------------------------------------------------------------------
def observe_commit(run: str, seconds: float, nbytes: int) -> None:
    """A step committed: ``seconds`` from its first rank report, ``nbytes`` of files."""
    _record("ckpt_save_seconds", run, seconds)
    _record("ckpt_committed_bytes", run, nbytes)
    _record("ckpt_commits", run, 1)


def set_pending_saves(run: str, count: int) -> None:
    """How many steps the checkpointer is waiting for or writing now."""
    _set_gauge("ckpt_pending_saves", run, count)


def observe_query(run: str, seconds: float) -> None:
    """One index query answered inside the checkpointer."""
    _record("ckpt_query_seconds", run, seconds)


def set_memory(run: str, nbytes: int, steps: int) -> None:
    """What the memory tier holds now: bytes of every copy, and committed steps."""
    _set_gauge("ckpt_memory_bytes", run, nbytes)
    _set_gauge("ckpt_memory_steps", run, steps)


def observe_memory_commit(run: str, seconds: float) -> None:
    """A step committed in memory, ``seconds`` after its first rank joined (the replica lag)."""
    _record("ckpt_memory_commit_seconds", run, seconds)


def observe_recovery(run: str, source: str, seconds: float) -> None:
    """A worker loaded a step (``source``: ``"memory"`` or ``"storage"``) in ``seconds``."""
    _record("ckpt_recovery_memory_seconds" if source == "memory" else "ckpt_recovery_storage_seconds", run, seconds)


# -- workers ----------------------------------------------------------------------------------
def observe_worker_save(run: str, blocked_s: float, snapshot_bytes: int) -> None:
    """One ``WorkerClient.save``: how long it held the caller, how many bytes it snapshotted."""
    _record("ckpt_worker_blocked_seconds", run, blocked_s)
    _record("ckpt_worker_snapshot_bytes", run, snapshot_bytes)


# -- eval clients -----------------------------------------------------------------------------
def observe_eval_load(run: str, seconds: float) -> None:
    """An eval client loaded a checkpoint (state dict or model)."""
    _record("ckpt_eval_load_seconds", run, seconds)


def observe_eval_query(run: str, seconds: float) -> None:
    """An eval client answered one index query."""
    _record("ckpt_eval_query_seconds", run, seconds)


# -- uploads ----------------------------------------------------------------------------------
def observe_upload(run: str, seconds: float, nbytes: int) -> None:
    """One checkpoint was uploaded to the remote tier."""
    _record("ckpt_upload_seconds", run, seconds)
    _record("ckpt_upload_bytes", run, nbytes)


def count_upload_retry(run: str) -> None:
    """An upload attempt failed and will be retried."""
    _record("ckpt_upload_retries", run, 1)


def count_upload_failure(run: str) -> None:
    """An upload failed for good (the local copy is kept)."""
    _record("ckpt_upload_failures", run, 1)


class RayTransferObserver(TransferObserver):
    """A tier's transfer observations as Ray metrics (what the Ray layer hands to the tiers)."""

    def upload(self, run: str, seconds: float, nbytes: int) -> None:
        observe_upload(run, seconds, nbytes)

    def upload_retry(self, run: str) -> None:
        count_upload_retry(run)

    def upload_failure(self, run: str) -> None:
        count_upload_failure(run)


#: The observer the checkpointer (and any Ray-side opener of a tiered run) passes to ``open_store``.
OBSERVER = RayTransferObserver()
