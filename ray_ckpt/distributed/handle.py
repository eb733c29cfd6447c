"""Reaching a run's checkpointer: start or find the named actor, and a handle with blocking calls.

:func:`start_checkpointer` starts (or finds) the actor of :mod:`ray_ckpt.distributed.checkpointer`
for a config; :func:`get_checkpointer` finds it by run name from any process. The handle's calls
are plain ``ray.get`` wrappers; ``handle.actor`` is the raw actor for ``.remote()`` calls. This
module also remembers, per process, the newest index position a commit acknowledged, so an index
follower in the same process never answers with an index older than a save it saw finish.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from ray_ckpt.core.config import CheckpointConfig, register_consumer
from ray_ckpt.core.errors import ConfigError
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.distributed.checkpointer import Checkpointer

ACTOR_NAME_PREFIX = "ray_ckpt:"
MAX_CONCURRENT_CALLS = 100_000  # open calls the master serves at once (~65 KB of its memory each)
# Ray collects a named, non-detached actor once no handle is left; the process that started a
# checkpointer keeps one here so the run's master lives as long as its driver (or until shutdown).
_STARTED: dict[tuple[str | None, str], Any] = {}


# Per checkpointer actor, the newest index position (epoch, version) a call from this process
# saw acknowledged (a commit): an index follower in this process answers only once it has it.
_SEEN_POSITIONS: dict[Any, tuple[str, int]] = {}
_SEEN_LOCK = threading.Lock()


def note_index_position(actor: Any, position: tuple[str, int] | None) -> None:
    """Remember that this process saw ``actor``'s index reach ``position``."""
    if position is None:
        return
    with _SEEN_LOCK:
        seen = _SEEN_POSITIONS.get(actor)
        if seen is None or tuple(position) > seen:
            _SEEN_POSITIONS[actor] = (position[0], position[1])


def seen_index_position(actor: Any) -> tuple[str, int] | None:
    """The newest index position of ``actor`` this process saw acknowledged (None: none yet)."""
    with _SEEN_LOCK:
        return _SEEN_POSITIONS.get(actor)


def actor_name(run_name: str) -> str:
    """The registered name of a run's checkpointer actor."""
    return f"{ACTOR_NAME_PREFIX}{run_name}"


# What start_checkpointer reads of a config (check_consumed(by='start_checkpointer')).
# The loop that drives the checkpointer reads save_interval_steps (the demo does); the clients
# (WorkerClient, EvalClient) receive the checkpointer's config and are not checked.
register_consumer(
    "start_checkpointer", {"store", "retention", "checkpointer", "tiering", "memory", "save_interval_steps"}
)


class CheckpointerHandle:
    """A picklable handle on a run's checkpointer with blocking convenience methods.

    ``handle.actor`` is the raw Ray actor handle for ``.remote()`` calls.
    """

    def __init__(self, actor: Any, run_name: str, config: CheckpointConfig | None = None) -> None:
        self.actor = actor
        self.run_name = run_name
        self._config = config

    def __repr__(self) -> str:
        return f"CheckpointerHandle(run={self.run_name!r})"

    @property
    def config(self) -> CheckpointConfig:
        if self._config is None:
            self._config = ray.get(self.actor.get_config.remote())
        return self._config

    def register(self, model_or_class_path: Any, config: Any = None) -> dict[str, Any]:
        """Record the run's model_architecture.json (once per run).

        The cached config is dropped: the actor may now serve a wider architecture allow-list.
        """
        recorded = ray.get(self.actor.register.remote(model_or_class_path, config))
        self._config = None
        return recorded

    def top_k(self, k: int, metric: str | None = None, mode: str | None = None) -> list[CheckpointInfo]:
        return ray.get(self.actor.top_k.remote(k, metric, mode))

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        return ray.get(self.actor.best.remote(metric, mode))

    def latest(self) -> CheckpointInfo | None:
        return ray.get(self.actor.latest.remote())

    def list(self) -> list[CheckpointInfo]:
        return ray.get(self.actor.list.remote())

    def wait_for_checkpoint(self, after_step: int | None = None, timeout: float | None = None) -> CheckpointInfo | None:
        return ray.get(self.actor.wait_for_checkpoint.remote(after_step, timeout))

    def stats(self) -> dict[str, Any]:
        return ray.get(self.actor.stats.remote())

    def apply_retention(self) -> list[int]:
        """Apply the run's retention now (it also runs after commits, scores and lease releases)."""
        return ray.get(self.actor.apply_retention.remote())

    def wait_for_uploads(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Block until the checkpointer's background uploads are done (see ``Checkpointer.wait_for_uploads``)."""
        return ray.get(self.actor.wait_for_uploads.remote(timeout_s))

    def flush(self, timeout_s: float | None = None) -> int | None:
        """Persist the newest memory step now (memory tier); its step, None when memory holds none.

        What to call before a planned shutdown or a preemption; the checkpointer also calls it
        itself when Ray reports a training node draining.
        """
        return ray.get(self.actor.flush.remote(timeout_s))

    def shutdown(self) -> None:
        """Stop the actor for good (no restart), and the run's memory holders with it."""
        try:
            ray.get(self.actor.stop_holders.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a dead checkpointer: its holders are found by name below
            pass
        for key, actor in list(_STARTED.items()):
            if actor == self.actor:
                del _STARTED[key]
        ray.kill(self.actor, no_restart=True)


def check_shared_storage(config: CheckpointConfig) -> None:
    """Refuse storage that other processes cannot read: ``memory://`` lives in one process.

    The checkpointer, its workers and its evaluators are separate processes; on ``memory://``
    each would see a storage of its own (a worker's shard or an evaluator's lease that the
    checkpointer never sees), so a run there could only fail later and obscurely.
    """
    for field_name in ("storage_uri", "remote_uri"):
        uri = getattr(config, field_name)
        if isinstance(uri, str) and uri.startswith("memory://"):
            raise ConfigError(
                f"{field_name}={uri!r}: memory:// storage lives in one process, and a checkpointer's run is "
                "read by other processes (the checkpointer actor, workers, evaluators); use a directory "
                "shared by them, file://... or s3://... (memory:// suits CheckpointStore in one process)"
            )


def start_checkpointer(
    config: CheckpointConfig,
    name: str | None = None,
    namespace: str | None = None,
    detached: bool = False,
    start_timeout_s: float = 120.0,
    **actor_options: Any,
) -> CheckpointerHandle:
    """Start (or find) the named checkpointer actor of ``config.run_name`` and wait until it is up.

    It restarts up to ``config.max_restarts`` times, rebuilding its index from storage. It is
    scheduled outside the caller's placement group (a Tune trial's group dies with the trial and
    would take the run's master with it). A non-detached checkpointer lives as long as the
    process that started it; use ``detached=True`` when that process may exit first.
    ``actor_options`` go to ``.options()`` (e.g. ``resources`` or a scheduling strategy).
    A field the checkpointer ignores (``async_save``: use ``save(blocking=False)``; NeMo's
    ``enabled``) is a ConfigError, raised before anything starts, and so is ``memory://`` storage
    (it lives in one process: the checkpointer, workers and evaluators would each see their own).
    """
    if not isinstance(config, CheckpointConfig):
        raise TypeError(f"config: expected CheckpointConfig, got {type(config).__name__}")
    config.check_consumed("start_checkpointer")
    check_shared_storage(config)
    options: dict[str, Any] = {
        "name": name or actor_name(config.run_name),
        "namespace": namespace,
        "get_if_exists": True,
        "max_restarts": config.max_restarts,
        "max_task_retries": 0,
        # Every rank keeps calls open on the master (plan_direct until all ranks joined, a
        # wait_committed per pending save): Ray's default of 1000 concurrent calls on an async
        # actor would stall every step of a ~1000-rank run until save_timeout_s aborted it.
        "max_concurrency": MAX_CONCURRENT_CALLS,
        "num_cpus": 0,
        "scheduling_strategy": "DEFAULT",
    }
    if detached:
        options["lifetime"] = "detached"
    options.update(actor_options)
    actor = ray.remote(Checkpointer).options(**options).remote(config)
    try:
        ray.get(actor.ping.remote(), timeout=start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"checkpointer {options['name']!r} did not come up within {start_timeout_s}s "
            "(no node can place it? check its resources / scheduling_strategy)"
        ) from None
    _STARTED[(namespace, options["name"])] = actor
    return CheckpointerHandle(actor, config.run_name, config)


def get_checkpointer(run_name: str, namespace: str | None = None, *, timeout_s: float = 30.0) -> CheckpointerHandle:
    """Find a run's checkpointer by name (from any process or actor), waiting up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            actor = ray.get_actor(actor_name(run_name), namespace=namespace)
            return CheckpointerHandle(actor, run_name)
        except ValueError:
            if time.monotonic() >= deadline:
                raise LookupError(
                    f"no checkpointer for run {run_name!r} (actor {actor_name(run_name)!r}) in namespace {namespace!r}"
                ) from None
            time.sleep(0.2)
