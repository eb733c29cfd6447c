"""The checkpointer: a named async Ray actor that acts as the master rank of a run.

A save follows one protocol (:mod:`ray_ckpt.core.planner`): every rank joins with a description of
its state (whole tensors, or shards of global tensors); once all are in, the actor plans the
step (who writes which byte ranges of which file) and hands each rank its share; the ranks write
it (direct mode) or have the master write everything from their object-store views (gather
mode); the actor then commits through :class:`~ray_ckpt.core.store.CheckpointStore` (marker last),
applies retention and serves a top-k index from memory. Call order for a rank:
:meth:`Checkpointer.report` (gather: join with the bytes) or :meth:`Checkpointer.plan` (direct),
then :meth:`Checkpointer.finish_rank` unless the plan gives it nothing to do; a rank whose write
fails calls :meth:`Checkpointer.abort_step` with its exception. Queries run on the event loop and
never wait behind a save's I/O, which runs on a writer thread. Everything that must survive a restart lives in storage.

Retention runs whenever what it keeps may change: after each commit, after an eval score joins
(:meth:`Checkpointer.report_eval`), when an eval client releases a lease
(:meth:`Checkpointer.lease_released`) and, for leases that simply expire (a holder that died),
every ``lease_ttl_s / 2`` seconds while some step is doomed. Each run is serialised with the
commits on the writer thread, and every step it deletes leaves the served index at once.

With ``remote_uri`` (and ``remote_storage_options``) in the config the store has a remote tier
(:mod:`ray_ckpt.tiers.remote`): a step commits on local disk, the workers are acknowledged, and the
upload runs in the background with retries; a restarted checkpointer resumes the uploads its
predecessor left unfinished. The served index covers both tiers (``durability`` per step).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import xxhash

from ray_ckpt.core.config import CheckpointConfig
from ray_ckpt.core.errors import CheckpointExistsError, SaveAbortedError
from ray_ckpt.core.format.digests import merge_files
from ray_ckpt.core.index import CheckpointIndex, CheckpointInfo, IndexDelta, IndexFeed
from ray_ckpt.core.layout import validate_metrics, validate_step
from ray_ckpt.core.planner import MODEL, TRAINER, SavePlan, plan_save
from ray_ckpt.core.retention import plan, policy_from_config
from ray_ckpt.core.writer import StepWriter
from ray_ckpt.distributed import metrics as telemetry
from ray_ckpt.distributed.drain import DrainWatcher
from ray_ckpt.distributed.memory import (
    MemoryStep,
    MemoryTier,
    check_replicas,
    memory_info,
    ring_peers,
    storage_info,
)
from ray_ckpt.distributed.wire import RankReport, RankResult, check_rank_bytes, check_rank_report
from ray_ckpt.tiers.tiered import open_store, uploader_of

logger = logging.getLogger(__name__)

LOG_LEVEL_ENV = "RAY_CKPT_LOG_LEVEL"  # the checkpointer's log level (default INFO: one line per commit)


def _log_to_stderr() -> None:
    """Lines of the ``ray_ckpt`` loggers on stderr (Ray shows an actor's stderr in the driver), from
    ``$RAY_CKPT_LOG_LEVEL`` up (default INFO; a driver that prints its own progress, as the demo
    does, sets WARNING for its actors so that no commit is reported twice)."""
    package = logging.getLogger("ray_ckpt")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        package.addHandler(handler)
        level = logging.getLevelName(os.environ.get(LOG_LEVEL_ENV, "INFO").upper())  # an int for a known name
        package.setLevel(level if isinstance(level, int) else logging.INFO)
        package.propagate = False


@dataclass
class _PendingStep:
    step: int
    world_size: int
    mode: str
    overwrite: bool
    started: float = field(default_factory=time.monotonic)
    reports: dict[int, RankReport] = field(default_factory=dict)  # ranks that joined
    results: dict[int, RankResult] = field(default_factory=dict)  # ranks done with their share
    failures: dict[int, BaseException] = field(default_factory=dict)
    plan: SavePlan | None = None
    writer: StepWriter | None = None
    plan_ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_event_loop().create_future())
    timeout_task: asyncio.Task | None = None
    slot_held: bool = False

    def finished(self) -> set[int]:
        """Ranks with nothing left to do: done with their share, or given none by the plan."""
        if self.plan is None:
            return set()
        return set(self.results) | {r for r in self.reports if self.plan.idle(r)}


@dataclass
class _MemoryPending:
    """A step being committed in memory: the ranks' routes, reports and receipts so far."""

    step: int
    world_size: int
    persist: bool = False
    started: float = field(default_factory=time.monotonic)
    nodes: dict[int, str] = field(default_factory=dict)  # rank -> its node (routes)
    routed: asyncio.Event = field(default_factory=asyncio.Event)
    reports: dict[int, RankReport] = field(default_factory=dict)
    copies: dict[int, dict[str, list[Any]]] = field(default_factory=dict)
    digests: dict[int, dict[str, dict[str, str]]] = field(default_factory=dict)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_event_loop().create_future())
    timeout_task: asyncio.Task | None = None


async def _first_alive(refs: list[ray.ObjectRef]) -> Any:
    """The value of the first of ``refs`` that is still there (a memory step's copies on several
    nodes are alternatives; a gather-mode rank sends one)."""
    for ref in refs[:-1]:
        try:
            return await ref
        except ray.exceptions.ObjectLostError:
            continue
    return await refs[-1]


def _bad_report(step: int, rank: Any, exc: Exception) -> SaveAbortedError:
    error = SaveAbortedError(
        f"step {step}: rank {rank}'s report is invalid: {exc}; the step was aborted and nothing was committed"
    )
    error.failures = {rank: exc} if isinstance(rank, int) else {}
    return error


def _rank_failed(step: int, failures: dict[int, BaseException]) -> SaveAbortedError:
    """The abort error of a step that ranks failed to write: every failing rank's exception."""
    detail = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(failures.items()))
    error = SaveAbortedError(f"step {step}: aborted, nothing was committed ({detail})")
    error.failures = dict(failures)
    return error


def compare_replicas(plan: SavePlan, digest: Any) -> None:
    """Every replica of a chunk held by several ranks must equal its writer's: ValueError names key and ranks.

    ``digest(part, key, rank)`` gives a rank's xxh3 of its chunk (computed from the bytes in gather
    mode, reported by the ranks in direct mode); only replicated chunks are compared.
    """
    for part in plan.parts.values():
        for key, layout in part.tensors.items():
            for chunk in layout.chunks:
                if len(chunk.ranks) < 2:
                    continue
                first = digest(part.part, key, chunk.writer)
                for rank in chunk.ranks[1:]:
                    if digest(part.part, key, rank) != first:
                        raise ValueError(
                            f"key {key!r}: ranks {chunk.writer} and {rank} both hold it with different contents "
                            "(the bytes differ)"
                        )


class Checkpointer:
    """Master rank of a run (use :func:`ray_ckpt.distributed.handle.start_checkpointer` to create it)."""

    def __init__(self, config: CheckpointConfig) -> None:
        _log_to_stderr()  # ray-ckpt's own logger only: the process's root logger is not ours to configure
        sys.setswitchinterval(0.001)  # keep the event loop responsive while the writer thread runs
        self.config = config
        self.store = open_store(config, observer=telemetry.OBSERVER)  # with remote_uri: a tiered store
        self.tiering = uploader_of(self.store)  # its uploader (None without a remote tier)
        started = time.perf_counter()
        removed = self.store.gc()
        self.store.reload()
        self.index = CheckpointIndex(config.metric_name, config.mode)
        self.index.extend(self.store.list())  # with a remote tier: the steps either tier holds
        if config.metric_name:
            self.index.top_k(1)  # sort the run's ranking now (1M records: ~1 s), not in the first query
        self.feed = IndexFeed(self.index)  # every index change goes through it: eval clients follow it
        self.memory: MemoryTier | None = None
        self._memory_pending: dict[int, _MemoryPending] = {}
        if config.memory_replicas:
            self.memory = MemoryTier(config, ray.get_runtime_context().namespace)
            for mstep in self.memory.rebuild():  # a restarted checkpointer: the steps the holders keep
                stored = self.index.get(mstep.step)
                mstep.persisted = stored is not None
                self.feed.add(memory_info(stored or mstep.info, persisted=stored is not None))
            if self.memory.steps:
                logger.info(
                    "run %s: memory steps %s rebuilt from the holders", config.run_name, sorted(self.memory.steps)
                )
        self._index_changed: asyncio.Future | None = None
        # The remote tier reports changed steps (uploaded, deleted on a tier) from its threads;
        # they are applied to the feed on the event loop, once it is known.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tier_changed: set[int] = set()
        self._tier_lock = threading.Lock()
        resumed: list[int] = []
        if self.tiering is not None:
            self.tiering.listeners.append(self._on_tier_change)
            resumed = self.tiering.resume()  # uploads a killed predecessor left unfinished
            logger.info(
                "run %s: uploading to %s in the background (resumed: %s)",
                config.run_name,
                self.tiering.remote.uri,
                resumed,
            )
        logger.info(
            "checkpointer for run %s up: %d checkpoints indexed from storage in %.3fs (gc removed %d leftovers)",
            config.run_name,
            len(self.index),
            time.perf_counter() - started,
            len(removed),
        )
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ray-ckpt-writer")
        self._meta = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ray-ckpt-meta")
        self._pending: dict[int, _PendingStep] = {}
        self._aborted: dict[int, SaveAbortedError] = {}
        # committed steps, even if retention dropped them, with the index position of their commit
        self._recent: dict[int, tuple[CheckpointInfo, tuple[str, int]]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._committed: asyncio.Condition | None = None
        self._architecture_written = False
        self._retention_task: asyncio.Task | None = None  # the periodic check (started on first call)
        self._memory_task: asyncio.Task | None = None  # the memory tier's node check
        self._drain_watcher: DrainWatcher | None = None  # Ray's drain signal for the memory tier's nodes
        # Ray runs gc.collect() in every worker when the object store fills up (big gathered saves
        # do that). A full collection of this process's startup heap (torch, ray, pyarrow: ~250k
        # objects) holds the GIL ~100 ms, stalling queries; frozen, it is not scanned again.
        gc.collect()
        gc.freeze()

    # -- observability ------------------------------------------------------------------------
    def _capture_loop(self) -> None:
        """Remember the actor's event loop (the remote tier's reports are applied there)."""
        if self._loop is None:
            with self._tier_lock:
                self._loop = asyncio.get_running_loop()
                backlog = bool(self._tier_changed)
            if backlog:
                self._loop.call_soon(self._apply_tier_changes)

    def _on_tier_change(self, steps: list[int]) -> None:
        """The remote tier changed these steps' records (called from its threads)."""
        with self._tier_lock:
            self._tier_changed.update(steps)
            loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._apply_tier_changes)

    def _apply_tier_changes(self) -> None:
        """On the event loop: the served records of the steps the remote tier changed (no I/O)."""
        with self._tier_lock:
            steps, self._tier_changed = sorted(self._tier_changed), set()
        tier = self.tiering
        if tier is None or not steps:
            return
        for step in steps:
            record = tier.record(step)
            if record is None:
                self.feed.remove(step)
            else:
                self.feed.add(record)
        self._notify_index_changed()

    def _indexed(self, info: CheckpointInfo) -> CheckpointInfo:
        """A committed step's record as served: with a remote tier, naming the tiers that hold it."""
        tier = self.tiering
        return info if tier is None else (tier.record(info.step) or info)

    def _loop_state(self) -> tuple[asyncio.Semaphore, asyncio.Condition]:
        self._capture_loop()
        if self._slots is None or self._committed is None:
            self._slots = asyncio.Semaphore(self.config.max_pending_saves)
            self._committed = asyncio.Condition()
        return self._slots, self._committed

    # -- configuration and architecture -------------------------------------------------------
    async def get_config(self) -> CheckpointConfig:
        return self.config

    async def ping(self) -> bool:
        self._start_background()
        self._capture_loop()
        return True

    async def register(self, model_or_class_path: Any, config: Any = None) -> dict[str, Any]:
        """Write model_architecture.json once per run (the master's job).

        A live model or class trusts its module here (see :mod:`ray_ckpt.core.architecture`). With
        ``allowed_architecture_prefixes=None`` the config this actor serves (``get_config``, which
        eval clients build their store from) then allows the defaults plus that module, so eval
        clients in other processes can build the registered class; a configured list is served
        unchanged. Only this actor's lifetime remembers it: after a restart, register again or
        configure the prefixes.
        """
        from ray_ckpt.core.architecture import served_prefixes

        loop = asyncio.get_running_loop()
        arch = await loop.run_in_executor(self._meta, self.store.write_architecture, model_or_class_path, config)
        served = served_prefixes(self.config.allowed_architecture_prefixes, arch)
        if served is not None and served != self.config.allowed_architecture_prefixes:
            logger.info("run %s: serving allowed_architecture_prefixes %s", self.config.run_name, served)
            self.config = self.config.replace(allowed_architecture_prefixes=served)
        return {"class_path": arch.class_path, "config": arch.config, "config_class": arch.config_class}

    # -- saving -------------------------------------------------------------------------------
    # -- the save protocol: plan -> write -> finish -------------------------------------------
    async def report(self, step: int, report: RankReport, overwrite: bool = False) -> dict[str, Any]:
        """Join a step without waiting for its plan (a gather-mode rank, whose bytes come with it).

        Blocks (back-pressure) while ``max_pending_saves`` steps are already in flight. A report
        whose description does not fit its bytes aborts the step with SaveAbortedError naming the
        rank and the key: nothing is committed, and the next step is unaffected.
        """
        await self._join_step(step, report, overwrite, "gather")
        return {"step": step, "accepted": True}

    async def plan(self, step: int, report: RankReport, overwrite: bool = False, mode: str = "direct") -> SavePlan:
        """Join a step and wait for every rank: the step's :class:`~ray_ckpt.core.planner.SavePlan`.

        The same frozen plan goes to every rank; each executes its share with
        :func:`ray_ckpt.core.writer.write_share` and calls :meth:`finish_rank` (a rank the plan gives
        nothing to do is done already). Bad descriptions abort the step naming the rank and key.
        """
        pending = await self._join_step(step, report, overwrite, mode)
        await pending.plan_ready.wait()
        if pending.done.done() and pending.done.exception() is not None:
            raise pending.done.exception()  # type: ignore[misc]
        assert pending.plan is not None
        return pending.plan.share(report.rank)

    async def _join_step(self, step: int, report: RankReport, overwrite: bool, mode: str) -> _PendingStep:
        if not isinstance(report, RankReport):
            raise TypeError(f"step {step}: expected a RankReport, got {type(report).__name__}")
        try:
            check_rank_report(report)
            if mode == "direct" and (report.model_ref or report.trainer_ref):
                raise ValueError("a direct-mode rank sends its bytes after planning, not with its report")
            problem = None
        except ValueError as exc:
            problem = _bad_report(step, report.rank, exc)
        pending = await self._join(step, report.rank, report.world_size, mode, overwrite)
        if problem is not None:
            self._abort(pending, problem)
            raise problem
        if report.rank in pending.reports:
            raise ValueError(
                f"step {step}: rank {report.rank} joined twice; two writers share run {self.config.run_name!r} "
                "(two Tune trials or jobs with one run_name?): give each its own run, e.g. "
                "run_name=f'{prefix}-{trial_id}' (docs/RAY.md, 'One run per trial')"
            )
        pending.reports[report.rank] = report
        if len(pending.reports) == pending.world_size:
            asyncio.get_running_loop().create_task(self._plan_step(pending))
        return pending

    async def _plan_step(self, pending: _PendingStep) -> None:
        """Every rank is in: open the step and plan it on the writer thread; commit when no rank has work."""
        states = {r: {MODEL: rep.model, TRAINER: rep.trainer} for r, rep in pending.reports.items()}
        loop = asyncio.get_running_loop()

        def open_and_plan() -> tuple[StepWriter, SavePlan]:
            writer = self.store.begin_step(pending.step, overwrite=pending.overwrite)
            pending.writer = writer
            return writer, writer.plan(states, mode=pending.mode)

        try:
            _, pending.plan = await loop.run_in_executor(self._writer, open_and_plan)
        except Exception as exc:
            if isinstance(exc, ValueError):  # the planner's: names the key and the ranks
                exc = SaveAbortedError(
                    f"step {pending.step}: the ranks' states do not fit together: {exc}; nothing was committed"
                )
            self._abort(pending, exc)
        pending.plan_ready.set()
        if not pending.done.done() and len(pending.finished()) == pending.world_size:
            await self._finish(pending)

    async def finish_rank(self, step: int, result: RankResult) -> dict[str, Any]:
        """A rank has written its share of the plan; the last one in starts the commit."""
        if not isinstance(result, RankResult):
            raise TypeError(f"step {step}: expected a RankResult, got {type(result).__name__}")
        pending = self._pending.get(step)
        if pending is None:
            raise self._aborted.get(step) or SaveAbortedError(f"step {step}: no save in progress")
        if pending.done.done():
            raise pending.done.exception() or SaveAbortedError(f"step {step}: already finished")
        rank = result.rank
        if pending.plan is None or rank not in pending.reports:
            problem = _bad_report(step, rank, ValueError("it finished without joining the step's plan"))
            self._abort(pending, problem)
            raise problem
        if rank in pending.results:
            raise ValueError(f"step {step}: rank {rank} finished twice")
        pending.results[rank] = result
        if len(pending.finished()) == pending.world_size:
            asyncio.get_running_loop().create_task(self._finish(pending))
        return {"step": step, "accepted": True}

    async def abort_step(self, step: int, reason: Any, rank: int | None = None) -> None:
        """Abort a step from outside: ``reason`` is a rank's exception (or a message)."""
        pending = self._pending.get(step)
        exc = reason if isinstance(reason, BaseException) else RuntimeError(str(reason))
        memory_pending = self._memory_pending.get(step)
        if memory_pending is not None:
            detail = f"rank {rank}: {type(exc).__name__}: {exc}" if rank is not None else str(exc)
            error = SaveAbortedError(f"step {step}: aborted, nothing was committed ({detail})")
            error.failures = {rank: exc} if rank is not None else {}
            self._memory_abort(memory_pending, error)
            return
        if pending is None:
            aborted = self._aborted.get(step)
            if aborted is not None and rank is not None:
                aborted.failures.setdefault(rank, exc)  # a later rank's failure joins the record
            return
        if rank is None:
            self._abort(pending, SaveAbortedError(f"step {step}: {reason}"))
            return
        pending.failures[rank] = exc
        self._abort(pending, _rank_failed(step, pending.failures))

    async def wait_committed(self, step: int) -> CheckpointInfo:
        """Wait for a step to commit; raises the abort reason when it was aborted."""
        info, _ = await self.wait_committed_at(step)
        return info

    async def wait_committed_at(self, step: int) -> tuple[CheckpointInfo, tuple[str, int] | None]:
        """:meth:`wait_committed`, plus the index position (epoch, version) that includes the commit.

        Clients note it so that a query from the same process reads its own commit.
        """
        pending = self._pending.get(step)
        if pending is not None:
            await asyncio.shield(pending.done)
        recent = self._recent.get(step)
        if recent is not None:
            return recent
        info = self.index.get(step)
        if info is not None:
            return info, (self.feed.epoch, self.feed.version)
        raise self._aborted.get(step) or SaveAbortedError(f"step {step}: no save in progress (checkpointer restarted?)")

    async def _join(self, step: int, rank: int, world_size: int, mode: str, overwrite: bool) -> _PendingStep:
        step = validate_step(step)  # before any comparison: a str or negative step is refused by name
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: must be a positive integer, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank!r} is outside [0, {world_size})")
        if step in self._aborted and step not in self._pending:
            raise self._aborted[step]
        pending = self._pending.get(step)
        if pending is None:
            self._start_background()
            latest = self.index.latest()
            if not overwrite and latest is not None and step <= latest.step:
                raise CheckpointExistsError(
                    f"step {step}: run {self.config.run_name!r} already has step {latest.step} committed; "
                    "pass overwrite=True to save an older or equal step"
                )
            slots, _ = self._loop_state()
            pending = _PendingStep(step, world_size, mode, overwrite)
            self._pending[step] = pending
            telemetry.set_pending_saves(self.config.run_name, len(self._pending))
            pending.timeout_task = asyncio.get_running_loop().create_task(self._expire(pending))
            await slots.acquire()
            pending.slot_held = True
            if pending.done.done():  # aborted while waiting for a slot
                self._release(pending)
        if pending.done.done():
            raise pending.done.exception() or SaveAbortedError(f"step {step}: already finished")
        if pending.world_size != world_size:
            exc = ValueError(
                f"step {step}: rank {rank} reports world_size {world_size}, but the step started with "
                f"{pending.world_size}; aborting the step"
            )
            self._abort(pending, exc)
            raise exc
        if pending.mode != mode:
            raise ValueError(f"step {step}: rank {rank} uses {mode} mode, the step started in {pending.mode} mode")
        return pending

    async def _expire(self, pending: _PendingStep) -> None:
        await asyncio.sleep(self.config.save_timeout_s)
        if pending.done.done():
            return
        arrived = pending.reports if pending.plan is None else pending.finished()
        missing = sorted(set(range(pending.world_size)) - set(arrived))
        if missing:
            what = "did not report" if pending.plan is None else "did not finish writing their share"
            problem = f"ranks {missing} {what}"
        else:  # every rank is done, the master's share is not: the deadline covers the whole step
            problem = "the master did not finish writing and committing it"
        self._abort(
            pending,
            SaveAbortedError(
                f"step {pending.step}: {problem} within save_timeout_s={self.config.save_timeout_s}; the step "
                "was aborted and nothing was committed"
            ),
        )

    def _abort(self, pending: _PendingStep, exc: BaseException) -> None:
        if pending.done.done():
            return
        logger.warning("aborting step %d of %s: %s", pending.step, self.config.run_name, exc)
        error = exc if isinstance(exc, SaveAbortedError) else SaveAbortedError(str(exc))
        if not error.failures:
            error.failures = dict(pending.failures)
        self._aborted[pending.step] = error
        while len(self._aborted) > 1000:
            self._aborted.pop(next(iter(self._aborted)))
        pending.done.set_exception(exc)
        pending.done.exception()  # mark retrieved
        pending.plan_ready.set()
        writer = pending.writer
        if writer is not None:
            self._writer.submit(writer.abort)
        self._release(pending)

    def _release(self, pending: _PendingStep) -> None:
        if self._pending.get(pending.step) is pending:
            del self._pending[pending.step]
        # Let the ranks' object-store buffers go now: the pending step sits in reference cycles
        # (its tasks and futures), so its refs would otherwise live until a garbage collection,
        # and a few big saves fill the object store (Ray then stalls the next ray.put for a GC).
        for holder in [*pending.reports.values(), *pending.results.values()]:
            holder.model_ref = holder.trainer_ref = None
        if pending.timeout_task is not None and pending.timeout_task is not asyncio.current_task():
            pending.timeout_task.cancel()
        if pending.slot_held:
            pending.slot_held = False
            assert self._slots is not None
            self._slots.release()
        telemetry.set_pending_saves(self.config.run_name, len(self._pending))

    async def _fetch(self, pending: _PendingStep) -> dict[int, dict[str, dict[str, Any]]]:
        """The bytes the ranks handed over (gather: all; direct: what the plan has them send), checked."""
        plan = pending.plan
        assert plan is not None
        arrays: dict[int, dict[str, dict[str, Any]]] = {}
        holders = pending.reports if pending.mode == "gather" else pending.results
        for rank, holder in holders.items():
            report = pending.reports[rank]
            try:
                model = await _first_alive(holder.model_ref) if holder.model_ref else {}
                trainer = await _first_alive(holder.trainer_ref) if holder.trainer_ref else {}
            except ray.exceptions.ObjectLostError as exc:  # incl. OwnerDiedError: its node died
                raise SaveAbortedError(
                    f"step {pending.step}: rank {rank}'s state was lost before the checkpointer fetched it "
                    f"({type(exc).__name__}: the rank's process or node died); nothing was committed"
                ) from exc
            sent = None if pending.mode == "gather" else plan.sends(rank)
            try:
                for part, state, got in ((MODEL, report.model, model), (TRAINER, report.trainer, trainer)):
                    if state is None:
                        continue
                    keys = None if sent is None else [k for p, k in sent if p == part]
                    check_rank_bytes(state, got, "model" if part == MODEL else "trainer_state", keys)
            except ValueError as exc:
                raise _bad_report(pending.step, rank, exc) from None
            arrays[rank] = {MODEL: model, TRAINER: trainer}
        return arrays

    async def _finish(self, pending: _PendingStep) -> None:
        if pending.done.done():
            return
        loop = asyncio.get_running_loop()
        try:
            arrays = await self._fetch(pending)
            info, deleted = await loop.run_in_executor(self._writer, self._write_and_commit, pending, arrays)
        except Exception as exc:
            self._abort(pending, exc)
            return
        info = self._served(self._indexed(info))  # as the index serves it (tiers, memory)
        self.feed.add(info)
        for step in deleted:
            self._forget_stored(step)
        self._notify_index_changed()
        self._persisted(info.step)
        self._recent[info.step] = (info, (self.feed.epoch, self.feed.version))
        while len(self._recent) > 1000:
            self._recent.pop(next(iter(self._recent)))
        if pending.done.done():  # aborted (timed out) while writing: the commit stands, report it
            self._aborted.pop(pending.step, None)
        else:
            pending.done.set_result(info)
        self._release(pending)
        telemetry.observe_commit(self.config.run_name, time.monotonic() - pending.started, info.files_size)
        logger.info(
            "commit run=%s step=%d world_size=%d mode=%s bytes=%d seconds=%.3f deleted=%s",
            self.config.run_name,
            info.step,
            info.world_size,
            pending.mode,
            info.files_size,
            time.monotonic() - pending.started,
            deleted,
        )
        _, committed = self._loop_state()
        async with committed:
            committed.notify_all()

    def _merged_metrics(self, pending: _PendingStep) -> tuple[dict[str, float], dict[str, Any]]:
        metrics: dict[str, float] = {}
        metadata: dict[str, Any] = {}
        for rank in sorted(pending.reports, reverse=True):  # rank 0 wins on conflicts
            metrics.update(pending.reports[rank].metrics)
            metadata.update(pending.reports[rank].metadata)
        return metrics, metadata

    def _write_and_commit(
        self, pending: _PendingStep, arrays: dict[int, dict[str, dict[str, Any]]]
    ) -> tuple[CheckpointInfo, list[int]]:
        """The master's share of the plan, the ranks' files checked, the indexes, the marker last."""
        writer, plan = pending.writer, pending.plan
        assert writer is not None and plan is not None
        with writer:
            if pending.mode == "gather":
                hashes: dict[tuple[str, str, int], int] = {}

                def digest(part: str, key: str, rank: int) -> int:
                    if (part, key, rank) not in hashes:
                        hashes[part, key, rank] = xxhash.xxh3_64_intdigest(arrays[rank][part][key])
                    return hashes[part, key, rank]

                compare_replicas(plan, digest)
            else:
                compare_replicas(plan, lambda part, key, rank: pending.results[rank].digests.get((part, key)))
            writer.write_share(plan, lambda part, key, rank: arrays[rank][part][key])
            writer.add_files(merge_files(res.files for res in pending.results.values()))
            try:  # what the ranks declared is what they wrote (and hashed), before any of it is read
                writer.check_planned(plan)
                writer.check_digests(plan)
            except ValueError as exc:
                raise SaveAbortedError(f"step {pending.step}: {exc}; nothing was committed") from None
            writer.seal_shared(plan)
            expected = {f.name for part in plan.parts.values() for f in part.files}
            missing = expected - set(writer.files)
            if missing:
                raise SaveAbortedError(f"step {pending.step}: files {sorted(missing)} were never written")
            writer.write_indexes(plan)
            return self._commit(writer, pending)

    def _commit(self, writer: StepWriter, pending: _PendingStep) -> tuple[CheckpointInfo, list[int]]:
        if pending.done.done():  # aborted meanwhile (save_timeout_s covers the whole step): never commit
            raise pending.done.exception() or SaveAbortedError(f"step {pending.step}: aborted")
        metrics, metadata = self._merged_metrics(pending)
        info = writer.commit(metrics=metrics, metadata=metadata, world_size=pending.world_size)
        protected = {s for s in self._pending if s != pending.step}
        return info, self.store.retain_after_commit(info.step, protected=protected)

    # -- the memory tier (memory_replicas >= 1; docs/MEMORY.md) --------------------------------
    def _served(self, info: CheckpointInfo) -> CheckpointInfo:
        """A stored step's record as served: naming memory too while the holders keep it."""
        if self.memory is not None and info.step in self.memory.steps:
            return memory_info(info, persisted=True)
        return info

    def _forget_stored(self, step: int) -> bool:
        """Storage no longer holds ``step``: it leaves the index unless memory still holds it."""
        if self.memory is not None and step in self.memory.steps:
            mstep = self.memory.steps[step]
            mstep.persisted = False
            self.feed.add(memory_info(mstep.info, persisted=False))
            return True
        return self.feed.remove(step) is not None

    def _persisted(self, step: int) -> None:
        """A memory step is on storage now; steps whose freeing waited for that go."""
        if self.memory is None:
            return
        mstep = self.memory.steps.get(step)
        if mstep is not None:
            mstep.persisted = True
        self._free_memory(self.memory.beyond_kept())

    def _free_memory(self, steps: list[int]) -> None:
        """Free memory steps beyond memory_keep_last, except those still being persisted."""
        assert self.memory is not None
        steps = [s for s in steps if s not in self._pending]
        records = {s: self.memory.steps[s] for s in steps if s in self.memory.steps}
        self.memory.free(steps)
        for step, mstep in records.items():
            stored = self.index.get(step)
            if mstep.persisted and stored is not None:
                self.feed.add(storage_info(stored))
            else:
                self.feed.remove(step)
        if records:
            self._notify_index_changed()
        telemetry.set_memory(self.config.run_name, self.memory.bytes_held(), len(self.memory.steps))

    def _memory_tier(self) -> MemoryTier:
        if self.memory is None:
            raise ValueError(
                f"run {self.config.run_name!r}: the memory tier is off (memory_replicas=0); start the checkpointer "
                "with memory_replicas >= 1"
            )
        return self.memory

    def _memory_join(self, step: int, world_size: int, overwrite: bool) -> _MemoryPending:
        step = validate_step(step)
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: must be a positive integer, got {world_size!r}")
        if step in self._aborted and step not in self._memory_pending:
            raise self._aborted[step]
        pending = self._memory_pending.get(step)
        if pending is None:
            latest = self.index.latest()
            if not overwrite and latest is not None and step <= latest.step:
                raise CheckpointExistsError(
                    f"step {step}: run {self.config.run_name!r} already has step {latest.step} committed; "
                    "pass overwrite=True to save an older or equal step"
                )
            self._start_background()
            pending = self._memory_pending[step] = _MemoryPending(step, world_size)
            pending.timeout_task = asyncio.get_running_loop().create_task(self._memory_expire(pending))
        if pending.done.done():
            raise pending.done.exception() or SaveAbortedError(f"step {step}: already finished")
        if pending.world_size != world_size:
            exc = SaveAbortedError(
                f"step {step}: a rank reports world_size {world_size}, the step started with {pending.world_size}"
            )
            self._memory_abort(pending, exc)
            raise exc
        return pending

    async def memory_route(
        self, step: int, rank: int, world_size: int, node_id: str, overwrite: bool = False
    ) -> dict[str, Any]:
        """Where a rank's copies of ``step`` go: its node's holder and ``memory_replicas`` peers.

        Waits until every rank of the step has said which node it runs on (the training nodes of
        the step); the peers are the next nodes around the sorted ring of those nodes.
        """
        memory = self._memory_tier()
        pending = self._memory_join(step, world_size, overwrite)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank!r} is outside [0, {world_size})")
        pending.nodes[rank] = node_id
        if len(pending.nodes) == world_size:
            pending.routed.set()
        try:
            await asyncio.wait_for(pending.routed.wait(), self.config.save_timeout_s)
        except asyncio.TimeoutError:
            raise SaveAbortedError(f"step {step}: not every rank joined within save_timeout_s") from None
        if pending.done.done():
            raise pending.done.exception() or SaveAbortedError(f"step {step}: already finished")
        try:
            peers = ring_peers(list(pending.nodes.values()), node_id, self.config.memory_replicas)
        except ValueError as exc:
            error = SaveAbortedError(f"step {step}: {exc}; nothing was committed")
            self._memory_abort(pending, error)
            raise error from None
        return {
            "holder": memory.holder(node_id),
            "peers": [memory.holder(n) for n in peers],
            "timeout_s": self.config.save_timeout_s,
        }

    async def memory_report(
        self, step: int, report: RankReport, receipt: dict[str, Any], persist: bool | None = None
    ) -> dict[str, Any]:
        """A rank's state of ``step`` is held (``receipt``: its copies by node, their digests).

        Once every rank is in and each has ``1 + memory_replicas`` copies on distinct nodes, the
        step is committed in memory: ``{"info", "position", "persisting"}``.
        """
        memory = self._memory_tier()
        pending = self._memory_pending.get(step)
        if pending is None:
            raise self._aborted.get(step) or SaveAbortedError(f"step {step}: no memory save in progress")
        if pending.done.done():
            raise pending.done.exception() or SaveAbortedError(f"step {step}: already finished")
        try:
            if not isinstance(report, RankReport):
                raise TypeError(f"expected a RankReport, got {type(report).__name__}")
            check_rank_report(report)
            if report.rank in pending.reports:
                raise ValueError(f"rank {report.rank} joined twice")
        except (TypeError, ValueError) as exc:
            problem = _bad_report(step, report.rank if isinstance(report, RankReport) else "?", exc)
            self._memory_abort(pending, problem)
            raise problem from None
        pending.reports[report.rank] = report
        pending.copies[report.rank] = dict(receipt["copies"])
        pending.digests[report.rank] = dict(receipt["digests"])
        pending.persist = pending.persist or bool(persist)
        if len(pending.reports) == pending.world_size:
            try:
                self._commit_memory(pending, memory)
            except Exception as exc:  # noqa: BLE001 - any failure aborts the step, named
                self._memory_abort(pending, exc)
        return await asyncio.shield(pending.done)

    def _commit_memory(self, pending: _MemoryPending, memory: MemoryTier) -> None:
        """Every rank is in: check the copies and the states, record the step, free old ones, persist."""
        step = pending.step
        check_replicas(step, pending.copies, self.config.memory_replicas)
        states = {r: {MODEL: rep.model, TRAINER: rep.trainer} for r, rep in pending.reports.items()}
        try:  # the ranks' states fit together (coverage, overlaps, dtypes), as a storage save checks
            plan_save(step, states, directory="", mode="gather", max_shard_size=int(self.config.max_shard_size))
        except ValueError as exc:
            raise SaveAbortedError(f"step {step}: the ranks' states do not fit together: {exc}") from None
        metrics: dict[str, float] = {}
        metadata: dict[str, Any] = {}
        for rank in sorted(pending.reports, reverse=True):  # rank 0 wins on conflicts
            metrics.update(pending.reports[rank].metrics)
            metadata.update(pending.reports[rank].metadata)
        model_bytes = sum(m.nbytes for rep in pending.reports.values() for m in rep.model.tensors.values())
        trainer_bytes = sum(
            m.nbytes for rep in pending.reports.values() if rep.trainer for m in rep.trainer.tensors.values()
        )
        info = CheckpointInfo(
            step=step,
            uri=f"memory://{self.config.run_name}/step_{step}",
            metrics=metrics,
            created=time.time(),
            total_size=model_bytes,
            files_size=model_bytes + trainer_bytes,
            world_size=pending.world_size,
            metadata=metadata,
            durability=["memory"],
        )
        reports = {
            r: RankReport(r, rep.world_size, rep.model, rep.trainer, rep.metrics, rep.metadata)
            for r, rep in pending.reports.items()
        }
        mstep = MemoryStep(step, pending.world_size, reports, pending.copies, pending.digests, info)
        for node in mstep.nodes():
            memory.holder(node).commit.remote(step, mstep)
        self.feed.add(info)
        self._notify_index_changed()
        persist = pending.persist or step % self.config.persist_interval_steps == 0
        if persist:
            self._start_persist(mstep)
        self._free_memory(memory.add(mstep))
        telemetry.observe_memory_commit(self.config.run_name, time.monotonic() - pending.started)
        logger.info(
            "memory commit run=%s step=%d world_size=%d bytes=%d nodes=%s persist=%s seconds=%.3f",
            self.config.run_name,
            step,
            pending.world_size,
            info.files_size,
            sorted(mstep.nodes()),
            persist,
            time.monotonic() - pending.started,
        )
        self._memory_release(pending)
        pending.done.set_result({"info": info, "position": (self.feed.epoch, self.feed.version), "persisting": persist})

    def _start_persist(self, mstep: MemoryStep) -> _PendingStep:
        """Write a memory step to storage in the background: the gather-mode plan -> write -> finish,
        from the holders' copies (each rank's copies are alternatives: the first live one is read)."""
        pending = _PendingStep(mstep.step, mstep.world_size, "gather", overwrite=False)
        for rank, rep in mstep.reports.items():
            copies = list(mstep.copies[rank].values())
            pending.reports[rank] = RankReport(
                rank,
                rep.world_size,
                rep.model,
                rep.trainer,
                rep.metrics,
                rep.metadata,
                model_ref=[refs[0] for refs in copies],
                trainer_ref=[refs[1] for refs in copies] if rep.trainer is not None else None,
            )
        self._pending[mstep.step] = pending
        loop = asyncio.get_running_loop()
        pending.timeout_task = loop.create_task(self._expire(pending))

        async def run() -> None:
            slots, _ = self._loop_state()
            await slots.acquire()  # back-pressure: at most max_pending_saves steps persist at once
            pending.slot_held = True
            if pending.done.done():
                self._release(pending)
                return
            await self._plan_step(pending)

        loop.create_task(run())
        return pending

    async def flush(self, timeout_s: float | None = None) -> int | None:
        """Persist the newest memory step now (if it is not on storage yet); its step, None if none.

        Called by :meth:`CheckpointerHandle.flush` and when Ray reports a training node draining.
        """
        memory = self._memory_tier()
        if not memory.steps:
            return None
        newest = memory.steps[max(memory.steps)]
        if not newest.persisted:
            pending = self._pending.get(newest.step) or self._start_persist(newest)
            await asyncio.wait_for(asyncio.shield(pending.done), timeout_s)
        return newest.step

    async def memory_step(self, selector: Any = "latest") -> MemoryStep | int:
        """What a loader reads for ``selector``: the :class:`MemoryStep` of a step held in memory, or
        the step number of one only storage holds."""
        self._start_background()
        step = self.store.resolve(selector, fallback_to_latest=True, over=self.index)
        if self.memory is not None and step in self.memory.steps:
            return self.memory.steps[step]
        return step

    async def memory_lost(self, step: int) -> None:
        """A loader found copies of ``step`` gone: check the nodes now."""
        await self._check_nodes()

    async def holder_for(self, node_id: str) -> Any:
        """The run's holder on ``node_id`` (evaluators' cache of persisted steps)."""
        if self.memory is None:
            self.memory = MemoryTier(self.config, ray.get_runtime_context().namespace)
        return self.memory.holder(node_id)

    async def _check_nodes(self) -> None:
        """Drop the copies on nodes Ray reports dead; steps missing a rank leave the index."""
        memory = self.memory
        if memory is None or not (memory.holders or memory.steps):
            return
        loop = asyncio.get_running_loop()
        nodes = await loop.run_in_executor(self._meta, ray.nodes)
        alive = {n["NodeID"] for n in nodes if n.get("Alive")}
        dead = (set(memory.holders) | {n for m in memory.steps.values() for n in m.nodes()}) - alive
        if not dead:
            return
        _, lost = memory.nodes_lost(dead)
        for step in lost:
            stored = self.index.get(step)
            if stored is not None and stored.durability != ["memory"]:
                self.feed.add(storage_info(stored))
            else:
                self.feed.remove(step)
        if lost:
            self._notify_index_changed()
        telemetry.set_memory(self.config.run_name, memory.bytes_held(), len(memory.steps))

    async def _memory_loop(self) -> None:
        """Every second: node losses (copies gone) while the memory tier is on."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._check_nodes()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad round
                logger.warning("run %s: memory node check failed: %s", self.config.run_name, exc)

    async def _prune_holders(self) -> None:
        """Forget holders that no longer answer (killed, or their node is gone): the next route to
        their node starts a new one."""
        memory = self.memory
        if memory is None:
            return
        for node, handle in list(memory.holders.items()):
            try:
                await asyncio.wait_for(handle.ping.remote(), 10)
            except ray.exceptions.RayActorError:
                if memory.holders.get(node) is handle:
                    del memory.holders[node]
            except Exception:  # noqa: BLE001 - slow, not dead: keep it
                continue
        await self._check_nodes()

    async def _on_drain(self, node_id: str, deadline: float | None) -> None:
        """Ray drains a node holding memory copies (preemption, scale-down): persist the newest
        memory step before the node goes (its copies go with it)."""
        left = None if deadline is None else deadline - time.time()
        logger.warning(
            "run %s: node %s is draining (deadline in %s s): flushing the newest memory step",
            self.config.run_name,
            node_id,
            "none" if left is None else f"{left:.0f}",
        )
        step = await self.flush(None if left is None else max(left, 1.0))
        logger.info("run %s: flushed memory step %s before node %s drains", self.config.run_name, step, node_id)

    async def _memory_expire(self, pending: _MemoryPending) -> None:
        await asyncio.sleep(self.config.save_timeout_s)
        if not pending.done.done():
            missing = sorted(set(range(pending.world_size)) - set(pending.reports))
            self._memory_abort(
                pending,
                SaveAbortedError(
                    f"step {pending.step}: ranks {missing} did not report their memory copies within "
                    f"save_timeout_s={self.config.save_timeout_s}; nothing was committed"
                ),
            )

    def _memory_abort(self, pending: _MemoryPending, exc: BaseException) -> None:
        if pending.done.done():
            return
        logger.warning("aborting memory step %d of %s: %s", pending.step, self.config.run_name, exc)
        error = exc if isinstance(exc, SaveAbortedError) else SaveAbortedError(f"step {pending.step}: {exc}")
        self._aborted[pending.step] = error
        pending.done.set_exception(error)
        pending.done.exception()
        pending.routed.set()
        if self.memory is not None:
            self.memory.free([pending.step])  # every holder drops what it took of the step
            asyncio.get_running_loop().create_task(self._prune_holders())  # a dead holder may be why
        self._memory_release(pending)

    def _memory_release(self, pending: _MemoryPending) -> None:
        if self._memory_pending.get(pending.step) is pending:
            del self._memory_pending[pending.step]
        if pending.timeout_task is not None and pending.timeout_task is not asyncio.current_task():
            pending.timeout_task.cancel()

    async def stop_holders(self) -> int:
        """Kill the run's holders (the run is shut down for good); how many there were."""
        if self.memory is None:
            return 0
        holders = self.memory.find_holders()
        for handle in holders.values():
            ray.kill(handle, no_restart=True)
        self.memory.holders.clear()
        self.memory.steps.clear()
        return len(holders)

    async def memory_stats(self) -> dict[str, Any]:
        """The memory tier as the holders report it (``{}`` when it is off)."""
        memory = self.memory
        if memory is None:
            return {}
        holders = {}
        for node, handle in list(memory.holders.items()):
            try:
                holders[node] = await asyncio.wait_for(handle.stats.remote(), 10)
            except Exception as exc:  # noqa: BLE001 - a dead holder is reported as such
                holders[node] = {"error": f"{type(exc).__name__}: {exc}"}
        return {
            "steps": sorted(memory.steps),
            "persisted": sorted(s for s, m in memory.steps.items() if m.persisted),
            "persisting": sorted(s for s in memory.steps if s in self._pending),
            "lost": list(memory.lost_steps),
            "bytes_held": {n: h.get("bytes_held") for n, h in holders.items()},
            "holders": holders,
        }

    # -- queries (memory only; never wait for I/O) --------------------------------------------
    def _timed(self, started: float) -> None:
        telemetry.observe_query(self.config.run_name, time.perf_counter() - started)

    async def top_k(self, k: int, metric: str | None = None, mode: str | None = None) -> list[CheckpointInfo]:
        started = time.perf_counter()
        try:
            return self.index.top_k(k, metric, mode)
        finally:
            self._timed(started)

    async def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        started = time.perf_counter()
        try:
            return self.index.best(metric, mode)
        finally:
            self._timed(started)

    async def latest(self) -> CheckpointInfo | None:
        started = time.perf_counter()
        try:
            return self.index.latest()
        finally:
            self._timed(started)

    async def list(self) -> list[CheckpointInfo]:
        return self.index.list()

    async def info(self, step: int) -> CheckpointInfo | None:
        return self.index.get(step)

    async def wait_for_checkpoint(
        self, after_step: int | None = None, timeout: float | None = None
    ) -> CheckpointInfo | None:
        """The latest checkpoint newer than ``after_step``, waiting up to ``timeout`` seconds for one."""
        _, committed = self._loop_state()

        def newer() -> bool:
            latest = self.index.latest()
            return latest is not None and (after_step is None or latest.step > after_step)

        async with committed:
            try:
                await asyncio.wait_for(committed.wait_for(newer), timeout)
            except asyncio.TimeoutError:
                return None
        return self.index.latest()

    async def report_eval(self, step: int, metrics: dict[str, float]) -> CheckpointInfo:
        """Join evaluation metrics to a checkpoint's record (persisted beside it), then apply retention.

        The values are taken as floats first (numpy and torch scalars too; TypeError for anything
        else), so the index served from memory ranks them exactly as the store does. The score
        reaches the served index (and every follower) as soon as it is persisted; the reply comes
        once retention has run (a step the new ranking drops, and no lease holds, is gone from
        storage and from the index by then).
        """
        self._start_background()
        checked = validate_metrics(metrics, what="eval metrics")
        loop = asyncio.get_running_loop()
        info = await loop.run_in_executor(
            self._meta, functools.partial(self.store.report_eval, step, checked, retain=False)
        )
        if step in self.index:
            info = self.feed.update_metrics(step, checked)
            self._notify_index_changed()
        await self._retain(f"the eval scores of step {step}")
        return info

    async def lease_released(self, step: int) -> list[int]:
        """An eval client released its lease on ``step``: apply retention now; the deleted steps.

        A lease may have been all that kept a step the ranking dropped; without this call the
        step would wait for the next commit, score or periodic check.
        """
        self._start_background()
        return await self._retain(f"the release of a lease on step {step}")

    async def apply_retention(self) -> list[int]:
        """Apply retention now (e.g. after an out-of-band change); the deleted steps."""
        return await self._retain("a request", force=True)

    async def _retain(self, event: str, *, force: bool = False) -> list[int]:
        """Apply retention on the writer thread (serialised with commits); drop the deleted steps
        from the served index.

        Costs nothing when the served index shows no doomed step (the plan is made in memory;
        protection only ever adds kept steps), else one listing of the leases.
        """
        protected = set(self._pending)  # steps being written or replaced are never deleted
        _, doomed = plan(self.index, policy_from_config(self.store.config, protected))
        if not doomed and not force:
            return []
        loop = asyncio.get_running_loop()
        deleted = await loop.run_in_executor(self._writer, self.store.retain_after, event, protected)
        removed = [s for s in deleted if self._forget_stored(s)]
        if removed:
            self._notify_index_changed()
            logger.info("run %s: retention after %s deleted steps %s", self.config.run_name, event, removed)
        return deleted

    def _start_background(self) -> None:
        """Start the periodic retention check once, on the actor's event loop."""
        if self._retention_task is None or self._retention_task.done():
            self._retention_task = asyncio.get_running_loop().create_task(self._retention_loop())
        if self.memory is not None and (self._memory_task is None or self._memory_task.done()):
            self._memory_task = asyncio.get_running_loop().create_task(self._memory_loop())
            memory = self.memory
            self._drain_watcher = DrainWatcher(
                lambda: {n for m in memory.steps.values() for n in m.nodes()}, self._on_drain
            )
            self._drain_watcher.start()

    async def _retention_loop(self) -> None:
        """Every ``lease_ttl_s / 2`` seconds, apply retention if some step is doomed.

        Catches what no call announces: a lease that expired because its holder died (its step
        is deleted at most ``lease_ttl_s / 2`` after the expiry), and the first check after a
        restart.
        """
        interval = max(self.config.lease_ttl_s / 2, 0.1)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._retain("the periodic lease check")
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad round
                logger.warning("run %s: periodic retention failed: %s", self.config.run_name, exc)

    async def watch_index(self, epoch: str | None, version: int, timeout_s: float = 10.0) -> IndexDelta:
        """Long poll for index followers: the changes after (``epoch``, ``version``).

        Waits up to ``timeout_s`` for a change when the follower is current, so an idle follower
        costs one open call, and a commit reaches every follower in one round trip.
        """
        self._capture_loop()
        self._start_background()  # after a restart: the periodic checks run while anyone follows
        if epoch == self.feed.epoch and version == self.feed.version and timeout_s > 0:
            if self._index_changed is None:
                self._index_changed = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._index_changed), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.feed.changes_since(epoch, version)

    def _notify_index_changed(self) -> None:
        if self._index_changed is not None and not self._index_changed.done():
            self._index_changed.set_result(None)
        self._index_changed = None

    async def stats(self) -> dict[str, Any]:
        """Pending steps and index size (for tests, benchmarks and operators).

        With a remote tier also ``uploads``: ``{"remote_uri", "pending", "failed", "not_uploaded"}``
        (steps queued or running, failed for good, and committed locally without a remote copy).
        """
        import resource

        self._capture_loop()
        self._start_background()
        stats: dict[str, Any] = {
            "pending": sorted(s for s, p in self._pending.items() if p.slot_held),
            "queued": sorted(s for s, p in self._pending.items() if not p.slot_held),
            "indexed": len(self.index),
            "latest": self.index.latest().step if len(self.index) else None,
            "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
        if self.tiering is not None:
            loop = asyncio.get_running_loop()
            stats["uploads"] = await loop.run_in_executor(self._meta, self.tiering.stats)
        if self.memory is not None:
            stats["memory"] = await self.memory_stats()
        return stats

    async def wait_for_uploads(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait until the queued uploads are done: ``{"uploaded": {step: remote URI}, "failed": [steps]}``
        (``{}`` of each without a remote tier). TimeoutError when ``timeout_s`` passes first."""
        tier = self.tiering
        if tier is None:
            return {"uploaded": {}, "failed": []}
        loop = asyncio.get_running_loop()
        wait = functools.partial(tier.wait_for_uploads, timeout_s, raise_on_error=False)
        uploaded = await loop.run_in_executor(None, wait)
        return {"uploaded": uploaded, "failed": tier.failed_uploads()}

    async def refresh(self) -> int:
        """Re-read the index from storage (e.g. after an out-of-band change)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._meta, self.store.reload)
        self.feed.reset(await loop.run_in_executor(self._meta, self.store.list))
        self._notify_index_changed()
        return len(self.index)
