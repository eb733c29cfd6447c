"""The API used inside evaluation actors: query the run's top-k index, wait for new
checkpoints, lease and load them straight from storage, and report scores back.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import ray
import torch

from ray_ckpt.core.errors import CheckpointNotFoundError
from ray_ckpt.core.index import CheckpointIndex, CheckpointInfo, IndexReplica, position_reached
from ray_ckpt.core.layout import Selector, validate_metrics
from ray_ckpt.core.runstore import RunStore
from ray_ckpt.distributed import metrics
from ray_ckpt.distributed.handle import CheckpointerHandle, get_checkpointer, seen_index_position
from ray_ckpt.distributed.memory import MemoryStep, MemoryStepLost, read_cached_state, read_memory_state
from ray_ckpt.tiers.tiered import open_store

logger = logging.getLogger(__name__)
T = TypeVar("T")

# How long a follower's thread waits inside one Ray call before it looks at its stop flag: the
# longest a close() waits for the thread to be out of Ray.
_STOP_CHECK_S = 0.2
# The followers of this process whose threads may still call into Ray (see close_all_followers).
_FOLLOWERS: set[IndexFollower] = set()
_FOLLOWERS_LOCK = threading.Lock()


class Lease:
    """A lease on one checkpoint: retention will not delete it while the lease is renewed.

    Renewed by a background thread every ``ttl_s / 3``; if the holder dies the lease simply
    expires after ``ttl_s``. ``on_release(step)`` runs once the lease is released (an
    EvalClient tells the checkpointer, whose retention may now delete the step).
    """

    def __init__(
        self,
        store: RunStore,
        step: int,
        ttl_s: float,
        holder: str,
        on_release: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.step = step
        self.ttl_s = ttl_s
        self.holder = holder
        self._on_release = on_release
        self.lease_id = store.acquire_lease(step, ttl_s, holder)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"ray-ckpt-lease-{step}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.store.renew_lease(self.step, self.lease_id, self.ttl_s, self.holder)
            except Exception as exc:  # keep trying until released; the lease may lapse meanwhile
                logger.warning("lease renewal of step %d failed: %s", self.step, exc)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.store.release_lease(self.step, self.lease_id)
        if self._on_release is not None:
            self._on_release(self.step)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()


class IndexFollower:
    """A live copy of the checkpointer's index inside an evaluation process.

    A daemon thread long-polls ``watch_index`` and applies each delta, so a commit or a reported
    score reaches the copy one round trip later and queries are answered in-process: they cost
    the master nothing and never queue behind other processes for CPU. While the master is
    unreachable (restarting) the copy reports itself disconnected and callers go to the master.
    """

    def __init__(self, actor: Any, metric_name: str | None, mode: str, poll_s: float = 10.0) -> None:
        self.actor = actor
        self.poll_s = poll_s
        self.replica = IndexReplica(metric_name, mode)
        self.connected = False
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self.sync()  # the first copy on the caller's thread; raises if the master is unreachable
        self._thread = threading.Thread(target=self._follow, name="ray-ckpt-index-follower", daemon=True)
        with _FOLLOWERS_LOCK:
            _FOLLOWERS.add(self)
        self._thread.start()

    def _apply(self, delta: Any) -> None:
        with self._changed:
            self.replica.apply(delta)
            self.connected = not self._stop.is_set()  # a poll that returns after close() connects nothing
            self._changed.notify_all()

    def _fetch(self, timeout_s: float, *, stoppable: bool = False) -> Any:
        """One ``watch_index`` call; ``stoppable``: None as soon as close() is called meanwhile.

        A stoppable call waits in slices of ``_STOP_CHECK_S`` so that close() (and so
        :func:`close_all_followers`, which runs before ``ray.shutdown`` at exit) can be sure the
        thread has left Ray before Ray goes away.
        """
        with self._changed:
            epoch, version = self.replica.epoch, self.replica.version
        ref = self.actor.watch_index.remote(epoch, version, timeout_s)
        if stoppable:
            while not ray.wait([ref], timeout=_STOP_CHECK_S)[0]:
                if self._stop.is_set():
                    return None
        return ray.get(ref)

    def sync(self) -> None:
        """Bring the copy up to date now (after this process changed the index, say)."""
        self._apply(self._fetch(0.0))

    def _follow(self) -> None:
        try:
            self._follow_until_stopped()
        finally:
            with _FOLLOWERS_LOCK:
                _FOLLOWERS.discard(self)

    def _follow_until_stopped(self) -> None:
        while not self._stop.is_set():
            if not ray.is_initialized():  # Ray shut down: a call now would start a new local cluster
                with self._changed:
                    self.connected = False
                    self._changed.notify_all()
                return
            try:
                delta = self._fetch(self.poll_s, stoppable=True)
                if delta is not None:
                    self._apply(delta)
            except ValueError as exc:  # a delta that does not fit the copy: start over from a full one
                logger.warning("index follower: %s; fetching a full copy", exc)
                with self._changed:
                    self.replica.epoch = None
            except Exception as exc:  # the master restarting, or gone: callers fall back to it meanwhile
                with self._changed:
                    self.connected = False
                    self._changed.notify_all()
                if not isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
                    logger.warning("index follower: %s: %s", type(exc).__name__, exc)
                self._stop.wait(0.5)

    def read(
        self, query: Callable[[CheckpointIndex], T], at_least: tuple[str, int] | None = None, wait_s: float = 5.0
    ) -> tuple[bool, T | None]:
        """``(True, query(index))`` on the copy, once it includes position ``at_least`` (waiting up
        to ``wait_s`` for it); ``(False, None)`` while disconnected or still behind."""
        deadline = time.monotonic() + wait_s
        with self._changed:
            while self.connected and at_least is not None:
                if position_reached((self.replica.epoch, self.replica.version), at_least):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False, None
                self._changed.wait(remaining)
            if not self.connected:
                return False, None
            return True, query(self.replica.index)

    def wait_for(self, ready: Callable[[CheckpointIndex], T | None], timeout: float | None) -> tuple[bool, T | None]:
        """Wait until ``ready(index)`` is not None: ``(True, value)``, ``(True, None)`` on timeout,
        or ``(False, None)`` as soon as the copy is disconnected."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self.connected:
                value = ready(self.replica.index)
                if value is not None:
                    return True, value
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return True, None
                self._changed.wait(remaining)
            return False, None

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop following and wait up to ``timeout_s`` for the thread to leave Ray.

        Once it returns (with the thread ended) the follower makes no more Ray calls, so Ray can
        be shut down: a thread still inside a Ray call while ``ray.shutdown()`` tears the core
        worker down kills the process (``_exit(1)`` or a segfault in ``_raylet.so``).
        """
        self._stop.set()
        with self._changed:
            self.connected = False
            self._changed.notify_all()
        thread = self._thread
        if thread is threading.current_thread() or not thread.is_alive():
            return
        thread.join(timeout_s)
        if thread.is_alive() and timeout_s > 0:
            logger.warning("index follower: thread still in a Ray call %.1fs after close()", timeout_s)


def close_all_followers(timeout_s: float = 5.0) -> int:
    """Stop every :class:`IndexFollower` of this process and wait for their threads to end.

    Call it before ``ray.shutdown()`` in a process that used :class:`EvalClient` queries (their
    followers are daemon threads blocked in Ray calls). It also runs at interpreter exit, before
    Ray's own exit hook shuts Ray down (atexit hooks run last-registered first, and this module
    registers after importing Ray). Returns how many followers were running.
    """
    with _FOLLOWERS_LOCK:
        followers = list(_FOLLOWERS)
    for follower in followers:  # all stop flags first: the joins below then overlap
        follower._stop.set()
    deadline = time.monotonic() + timeout_s
    for follower in followers:
        follower.close(max(0.0, deadline - time.monotonic()))
    if followers:
        logger.debug("closed %d index followers", len(followers))
    return len(followers)


atexit.register(close_all_followers)


class EvalClient:
    """An evaluation worker's view of a run.

    Queries are answered from an :class:`IndexFollower` (a live in-process copy of the
    checkpointer's index) when ``follow_index`` is on, else by the checkpointer; loads read
    storage directly, through a store built from the config the checkpointer serves: with
    ``remote_uri`` set there, a step is read from whichever tier holds it (the local copy first,
    the remote one when the local copy is gone or this node never had it), and a step only the
    remote tier holds is leased there. Calls retry for up to ``retry_s`` while a restarting
    checkpointer comes back.
    """

    def __init__(
        self,
        run_name: str,
        namespace: str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        handle: CheckpointerHandle | None = None,
        retry_s: float = 60.0,
        follow_index: bool = True,
    ) -> None:
        self.run_name = run_name
        self.follow_index = follow_index
        self._follower: IndexFollower | None = None
        self._follower_lock = threading.Lock()
        self.handle = handle or get_checkpointer(run_name, namespace)
        self.retry_s = retry_s
        config = self.handle.config
        if storage_options is not None:
            config = config.replace(storage_options=storage_options)
        self.config = config
        self.store = open_store(config)  # with remote_uri: reads either tier
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._holder: Any = None  # this node's memory holder (memory tier, eval cache)

    def _call(self, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                return ray.get(getattr(self.handle.actor, method).remote(*args))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                if time.monotonic() >= deadline:
                    raise
                logger.info("checkpointer unavailable (%s); retrying %s", exc.__class__.__name__, method)
                time.sleep(0.5)
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None

    def follower(self) -> IndexFollower | None:
        """The live index copy (started on first use), or None when off or the master is unreachable."""
        if not self.follow_index:
            return None
        with self._follower_lock:
            if self._follower is None:
                try:
                    self._follower = IndexFollower(self.handle.actor, self.config.metric_name, self.config.mode)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                    logger.info("index follower not started (%s); asking the checkpointer", type(exc).__name__)
                    return None
                # a client dropped without close() stops its follower's thread (which does not
                # keep the client alive); no join there: a finalizer may run on any thread
                weakref.finalize(self, self._follower.close, 0.0).atexit = False
            return self._follower

    def _query(self, method: str, *args: Any) -> Any:
        started = time.perf_counter()
        follower = self.follower()
        if follower is not None:
            # a commit this process saw acknowledged is in the answer (read your own writes)
            at_least = seen_index_position(self.handle.actor)
            answered, value = follower.read(lambda index: getattr(index, method)(*args), at_least)
            if answered:
                metrics.observe_eval_query(self.run_name, time.perf_counter() - started)
                return value
        value = self._call(method, *args)
        metrics.observe_eval_query(self.run_name, time.perf_counter() - started)
        return value

    def close(self) -> None:
        """Stop following the index: later queries go to the checkpointer.

        Waits for the follower's thread to leave Ray, so ``ray.shutdown()`` may follow.
        """
        with self._follower_lock:
            self.follow_index = False
            if self._follower is not None:
                self._follower.close()
                self._follower = None

    # -- queries --------------------------------------------------------------------------------
    def top_k(self, k: int, metric: str | None = None, mode: str | None = None) -> list[CheckpointInfo]:
        """The k best checkpoints, best first."""
        return self._query("top_k", k, metric, mode)

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        return self._query("best", metric, mode)

    def latest(self) -> CheckpointInfo | None:
        return self._query("latest")

    def list(self) -> list[CheckpointInfo]:
        return self._query("list")

    def wait_for_checkpoint(self, after_step: int | None = None, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until a checkpoint newer than ``after_step`` commits (None on timeout)."""
        follower = self.follower()
        if follower is not None:
            started = time.monotonic()

            def newer(index: CheckpointIndex) -> CheckpointInfo | None:
                latest = index.latest()
                return latest if latest is not None and (after_step is None or latest.step > after_step) else None

            answered, info = follower.wait_for(newer, timeout)
            if answered:
                return info
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - started))
        return self._call("wait_for_checkpoint", after_step, timeout)

    # -- loading --------------------------------------------------------------------------------
    def _resolve(self, step: Selector) -> int:
        if step in ("latest", "best"):
            info = self.latest() if step == "latest" else self.best()
            if info is None:
                raise CheckpointNotFoundError(f"run {self.run_name!r} has no {step} checkpoint")
            return info.step
        if self.config.memory_replicas and isinstance(step, int) and not isinstance(step, bool):
            return step  # a step only memory holds is not in storage's index
        return self.store.resolve(step)

    def load(
        self, step: Selector = "latest", keys: Iterable[str] | None = None, *, mmap: bool = False
    ) -> dict[str, Any]:
        """Load a checkpoint's state dict from storage (not through the actor), from whichever tier
        holds it; ``mmap`` as in :meth:`CheckpointStore.load` (local storage: tensors map the
        files, nothing copied; a step read from an object-store tier is read into memory)."""
        resolved = self._resolve(step)
        started = time.perf_counter()
        state = self._from_memory(resolved)
        if state is None:
            state = self.store.load(resolved, keys, mmap=mmap)
        elif keys is not None:
            wanted = list(keys)
            missing = [k for k in wanted if k not in state]
            if missing:
                raise KeyError(f"step {resolved}: no tensors named {missing[:5]}")
            state = {k: state[k] for k in wanted}
        metrics.observe_eval_load(self.run_name, time.perf_counter() - started)
        return state

    def _from_memory(self, step: int) -> dict[str, Any] | None:
        """A step's state from this node's memory: a memory step from the nearest holder, or (with
        ``eval_cache_bytes``) a persisted step that this node's holder read from storage once for
        every evaluator on the node. None: read storage as usual."""
        if not (self.config.memory_replicas or self.config.eval_cache_bytes):
            return None
        node = ray.get_runtime_context().get_node_id()
        if self.config.memory_replicas:
            target = self._call("memory_step", step)
            if isinstance(target, MemoryStep):
                try:
                    return read_memory_state(target, node)
                except MemoryStepLost as exc:
                    logger.warning("%s; reading it from storage", exc)
                    self.handle.actor.memory_lost.remote(step)
                    return None
        if self.config.eval_cache_bytes:
            if self._holder is None:
                self._holder = self._call("holder_for", node)
            wrapped = ray.get(self._holder.cached.remote(step, self.config, self.config.save_timeout_s))
            return read_cached_state(wrapped[0])
        return None

    def load_model(self, step: Selector = "best", strict: bool = True) -> torch.nn.Module:
        """Build the run's model from model_architecture.json with a checkpoint's weights.

        Through :meth:`CheckpointStore.instantiate`, under the rules of
        :mod:`ray_ckpt.core.architecture`. With ``allowed_architecture_prefixes=None`` the allow-list
        is asked of the checkpointer again first: a ``register`` of a live class after this
        client started makes the master serve the defaults plus that class's module.
        """
        if step == "best" and self.best() is None:
            step = "latest"
        if self.store.config.allowed_architecture_prefixes is None:
            self._adopt_served_architectures()
        resolved = self._resolve(step)
        started = time.perf_counter()
        if self.config.memory_replicas or self.config.eval_cache_bytes:
            prefixes = self.store.config.allowed_architecture_prefixes
            arch = self.store.read_architecture()
            arch.resolve(prefixes)  # the class is checked before any weights are read
            state = self._from_memory(resolved)
            if state is None:
                state = self.store.load(resolved)
            model = arch.build(prefixes)
            model.load_state_dict(state, strict=strict)
        else:
            model = self.store.instantiate(resolved, strict=strict)
        metrics.observe_eval_load(self.run_name, time.perf_counter() - started)
        return model

    def _adopt_served_architectures(self) -> None:
        """Take the architecture allow-list the checkpointer serves now (kept as is if unreachable)."""
        try:
            served = ray.get(self.handle.actor.get_config.remote(), timeout=10).allowed_architecture_prefixes
        except Exception as exc:  # the master restarting: the allow-list stays the defaults
            logger.info("architecture allow-list not refreshed (%s)", type(exc).__name__)
            return
        if served is not None and served != self.config.allowed_architecture_prefixes:
            self.config = self.config.replace(allowed_architecture_prefixes=served)
            self.store = open_store(self.config)  # a store under the served allow-list

    def lease(self, step: Selector, ttl_s: float | None = None) -> Lease:
        """Lease a checkpoint (use as ``with ev.lease(step): ...``).

        Releasing it tells the checkpointer, whose retention then runs: a step that only this
        lease kept (e.g. scored out of the top k meanwhile) goes at once.
        """
        ttl = ttl_s or self.config.lease_ttl_s
        return Lease(self.store, self._resolve(step), ttl, self.holder, on_release=self._lease_released)

    def _lease_released(self, step: int) -> None:
        """Tell the checkpointer a lease ended (waits for its retention, at most 10 s)."""
        try:
            ray.get(self.handle.actor.lease_released.remote(step), timeout=10)
        except Exception as exc:  # noqa: BLE001 - the periodic check or the next commit retains instead
            logger.info("retention after releasing step %d is left to the checkpointer (%s)", step, type(exc).__name__)

    @contextlib.contextmanager
    def leased(self, step: Selector = "latest") -> Iterator[tuple[int, dict[str, Any]]]:
        """Lease a checkpoint and load it: ``with ev.leased("best") as (step, state): ...``."""
        with self.lease(step) as lease:
            started = time.perf_counter()
            state = self.store.load(lease.step)
            metrics.observe_eval_load(self.run_name, time.perf_counter() - started)
            yield lease.step, state

    def report_eval(self, step: int, metrics: dict[str, float]) -> CheckpointInfo:
        """Join evaluation metrics to a checkpoint's record; they can rank top_k and retention.

        numpy and one-element torch scalars are taken as floats (as the store takes them); a value
        that is not a number raises TypeError here, before anything is sent. This client's next
        query sees them (its index copy is synced before returning).
        """
        checked = validate_metrics(metrics, what=f"report_eval(step {step})")
        info = self._call("report_eval", step, checked)
        follower = self.follower()
        if follower is not None:
            with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                follower.sync()
        return info

    def follow(
        self,
        evaluate: Callable[[int, dict[str, Any]], dict[str, float]],
        *,
        max_checkpoints: int,
        timeout: float = 60.0,
    ) -> list[int]:
        """Evaluate each new checkpoint as it commits (lease, load, evaluate, report)."""
        seen: int | None = None
        evaluated: list[int] = []
        while len(evaluated) < max_checkpoints:
            info = self.wait_for_checkpoint(seen, timeout)
            if info is None:
                break
            seen = info.step
            try:
                with self.leased(info.step) as (step, state):
                    self.report_eval(step, evaluate(step, state))
                    evaluated.append(step)
            except CheckpointNotFoundError:
                continue  # retention removed it before we could lease it
        return evaluated
