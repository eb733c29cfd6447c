"""The API used inside worker actors (plain Ray actors, Ray Train workers, Tune trials).

Tensors never travel pickled: in gather mode a rank puts its tensors into the object store as
uint8 numpy views (one memcpy, then zero-copy to the checkpointer); in direct mode it writes its
share of the step's plan to storage itself. Sharded state (DTensors, :class:`~ray_ckpt.Shard`)
is saved shard by shard, and :meth:`WorkerClient.load` reshards into any world size.
``save(blocking=False)`` returns once the state is snapshotted.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import pickle
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
import torch
import xxhash

from ray_ckpt.core.background import BackgroundSaves
from ray_ckpt.core.errors import SaveAbortedError
from ray_ckpt.core.format.buffers import TensorBuffer, to_buffer, to_tensor
from ray_ckpt.core.format.tree import FlatState, flatten_state
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.layout import Selector, validate_metrics
from ray_ckpt.core.planner import MODEL, TRAINER, SavePlan, describe
from ray_ckpt.core.shard import local_part
from ray_ckpt.core.storage.storage import Storage
from ray_ckpt.core.writer import write_share
from ray_ckpt.distributed import metrics as telemetry
from ray_ckpt.distributed.handle import CheckpointerHandle, get_checkpointer, note_index_position
from ray_ckpt.distributed.memory import MemoryStep, MemoryStepLost, read_memory_into
from ray_ckpt.distributed.wire import RankReport, RankResult
from ray_ckpt.tiers.tiered import open_store

logger = logging.getLogger(__name__)


def _train_context() -> tuple[int, int] | None:
    """(rank, world_size) from Ray Train's context when running inside a Train worker."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return int(ctx.get_world_rank()), int(ctx.get_world_size())
    except Exception:
        return None


class Snapshot:
    """Private copies of a rank's state in buffers reused from one save to the next.

    A non-blocking save holds the training loop only for this copy. Buffers used before cost a
    memcpy; fresh ones also cost a page fault per 4 KiB page (most of the time such a save held the
    loop). Accelerator tensors go into pinned host buffers on a side stream, and :meth:`take`
    returns once their device-to-host copies are done.
    """

    def __init__(self) -> None:
        self._spare: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._streams: dict[Any, Any] = {}
        self._in_use: dict[int, tuple[str, dict[str, torch.Tensor]]] = {}

    def take(self, part: str, state: Mapping[str, Any], what: str) -> FlatState:
        """A flattened private copy of ``state`` (DTensors and Shards keep their global placement)."""
        raw = flatten_state(state, what=what, convert=False)
        with self._lock:
            spare = self._spare.pop(part, {})
        copies: dict[str, TensorBuffer] = {}
        synced = []
        for key, value in raw.tensors.items():
            local, global_shape, offsets = local_part(value, key=key)
            tensor = torch.from_numpy(np.ascontiguousarray(local)) if isinstance(local, np.ndarray) else local
            if isinstance(tensor, TensorBuffer):
                tensor = to_tensor(tensor)
            tensor = tensor.detach()
            buf = spare.get(key)
            accelerated = tensor.device.type not in ("cpu", "meta") and torch.accelerator.is_available()
            if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
                buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=accelerated)
            if accelerated:
                stream = self._stream(tensor.device)
                stream.wait_stream(torch.accelerator.current_stream(tensor.device))  # see the loop's writes
                with stream:
                    buf.copy_(tensor, non_blocking=True)
                synced.append(stream)
            else:
                buf.copy_(tensor)
            copy = to_buffer(buf, key=key)
            copy.global_shape, copy.offsets = global_shape, offsets
            copies[key] = copy
            spare[key] = buf
        for stream in synced:
            stream.synchronize()  # the device-to-host copies are done: training may go on
        flat = FlatState(copies, raw.aliases, raw.structure)
        with self._lock:
            self._in_use[id(flat)] = (part, spare)
        return flat

    def give_back(self, flat: FlatState) -> None:
        """A finished save's buffers serve the next snapshot of the same part."""
        with self._lock:
            part, buffers = self._in_use.pop(id(flat))
            self._spare[part] = buffers

    def _stream(self, device: Any) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.Stream(device=device)
        return self._streams[device]


class SaveFuture:
    """The outcome of one ``WorkerClient.save``: ``result()`` gives the committed CheckpointInfo."""

    def __init__(self, step: int, future: concurrent.futures.Future, handed_over: threading.Event) -> None:
        self.step = step
        self._future = future
        self._handed_over = handed_over

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """Wait for the commit; raises SaveAbortedError (or the rank's error) if it failed."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"step {self.step}: not committed within {timeout}s") from None

    def done(self) -> bool:
        return self._future.done()

    def handed_over(self, timeout: float | None = None) -> bool:
        """Wait until this rank's share is with the checkpointer (gather: its report and bytes
        accepted; direct: its share written and reported); False if the save failed first or
        ``timeout`` passed. After this the step no longer needs this rank's buffers."""
        self._handed_over.wait(timeout)
        return self._handed_over.is_set() and not (self._future.done() and self._future.exception() is not None)


class WorkerClient:
    """One rank's connection to the run's checkpointer.

    ``rank``/``world_size`` default to Ray Train's context when inside a Train worker, else 0/1.
    """

    def __init__(
        self,
        run_name: str,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        namespace: str | None = None,
        handle: CheckpointerHandle | None = None,
    ) -> None:
        if rank is None or world_size is None:
            ctx = _train_context()
            rank = ctx[0] if rank is None and ctx else (rank or 0)
            world_size = ctx[1] if world_size is None and ctx else (world_size or 1)
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: must be a positive integer, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank!r} is outside [0, {world_size})")
        self.run_name = run_name
        self.rank = rank
        self.world_size = world_size
        self.handle = handle or get_checkpointer(run_name, namespace)
        self.config = self.handle.config
        self._futures: list[SaveFuture] = []
        self._saves = BackgroundSaves(self.config.max_pending_saves)  # non-blocking saves (back-pressure)
        self._storage: Storage | None = None
        self._snapshot = Snapshot()
        self.last_load_source: str | None = None  # "memory" or "storage": where load() read from

    def save(
        self,
        step: int,
        state_dict: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        trainer_state: Mapping[str, Any] | None = None,
        blocking: bool = False,
        *,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        persist: bool | None = None,
    ) -> SaveFuture:
        """Hand this rank's state for ``step`` to the checkpointer.

        ``state_dict`` and ``trainer_state`` may hold DTensors (FSDP2, tensor parallel, any mesh
        and placement) or :class:`~ray_ckpt.Shard` values: each rank hands over only its local
        shard, with no collective, and the step commits full tensors in Hugging Face layout.
        Every rank's ``trainer_state`` is kept (sharded optimizer state is merged like the model;
        its non-tensor values must be the same on every rank).

        Returns once the state is snapshotted (training may then change the tensors); with
        ``blocking=True`` only after the step has committed. Blocks while ``max_pending_saves``
        saves are in flight (back-pressure).

        With the memory tier on (``memory_replicas >= 1``) the step commits in the holders' memory
        first; ``persist=True`` also writes it to storage whatever ``persist_interval_steps`` says,
        and ``blocking=True`` then waits for that too.
        """
        if persist is not None and not self.config.memory_replicas:
            raise ValueError("persist: only the memory tier (memory_replicas >= 1) saves steps it does not persist")
        started = time.perf_counter()
        if blocking:
            flat = flatten_state(state_dict, what=f"state_dict (rank {self.rank})")
            trainer_flat = flatten_state(trainer_state, what="trainer_state") if trainer_state is not None else None
        else:
            flat = self._snapshot.take(MODEL, state_dict, f"state_dict (rank {self.rank})")
            trainer_flat = (
                self._snapshot.take(TRAINER, trainer_state, "trainer_state") if trainer_state is not None else None
            )
        if not flat.tensors:
            raise ValueError(f"state_dict (rank {self.rank}): empty (no tensors to save)")
        if self.world_size > 1 and flat.structure is not None:
            raise TypeError(
                f"state_dict (rank {self.rank}): with world_size > 1 each rank must pass a flat "
                "{name: tensor} dict (put nested state in trainer_state)"
            )
        report = RankReport(
            rank=self.rank,
            world_size=self.world_size,
            model=describe(flat),
            trainer=describe(trainer_flat) if trainer_flat is not None else None,
            metrics=validate_metrics(metrics),
            metadata=dict(metadata or {}),
        )
        flats = {MODEL: flat, TRAINER: trainer_flat}
        handed_over = threading.Event()
        run = self._run
        if self.config.memory_replicas:
            run = functools.partial(self._run_memory, persist=persist, wait_persisted=blocking)
        if blocking:
            future: concurrent.futures.Future = concurrent.futures.Future()
            try:
                future.set_result(run(step, flats, report, overwrite, handed_over))
            except BaseException as exc:
                future.set_exception(exc)
        else:

            def give_back() -> None:
                for part_flat in flats.values():
                    if part_flat is not None:
                        self._snapshot.give_back(part_flat)

            future = self._saves.submit(run, step, flats, report, overwrite, handed_over, on_done=give_back)
        future.add_done_callback(lambda _: handed_over.set())  # a failed save wakes its waiters too
        save = SaveFuture(step, future, handed_over)
        self._futures = [f for f in self._futures if not f.done()] + [save]
        if blocking:
            save.result()
        snapshot = 0 if blocking else sum(f.total_size for f in flats.values() if f is not None)
        telemetry.observe_worker_save(self.run_name, time.perf_counter() - started, snapshot)
        return save

    def _run(
        self,
        step: int,
        flats: dict[str, FlatState | None],
        report: RankReport,
        overwrite: bool,
        handed_over: threading.Event,
    ) -> CheckpointInfo:
        """This rank's part of the save protocol (see :mod:`ray_ckpt.core.planner`): join, write its share, finish."""
        actor = self.handle.actor
        if self.config.write_mode == "gather":
            # ray.put copies into the object store; the master writes every file from there.
            report.model_ref = [_put(flats[MODEL])]
            if flats[TRAINER] is not None:
                report.trainer_ref = [_put(flats[TRAINER])]
            _get(actor.report.remote(step, report, overwrite), step)  # waits here under back-pressure
            handed_over.set()
            return _committed(actor, _get(actor.wait_committed_at.remote(step), step))
        plan: SavePlan = _get(actor.plan.remote(step, report, overwrite, "direct"), step)
        if not plan.idle(self.rank):
            try:
                result = self._write_share(plan, flats)
            except Exception as exc:
                actor.abort_step.remote(step, _sendable(exc), self.rank)
                raise _root_cause(actor, step, self.rank) or exc from exc
            _get(actor.finish_rank.remote(step, result), step)
        handed_over.set()
        return _committed(actor, _get(actor.wait_committed_at.remote(step), step))

    def _run_memory(
        self,
        step: int,
        flats: dict[str, FlatState | None],
        report: RankReport,
        overwrite: bool,
        handed_over: threading.Event,
        *,
        persist: bool | None,
        wait_persisted: bool,
    ) -> CheckpointInfo:
        """This rank's part of a memory save: its route, its node's holder takes (and replicates) a
        copy, then its report; a persisted step's storage commit is waited for with ``wait_persisted``."""
        actor = self.handle.actor
        node = ray.get_runtime_context().get_node_id()
        route = _get(actor.memory_route.remote(step, self.rank, self.world_size, node, overwrite), step)
        refs = [_put(flats[MODEL]), _put(flats[TRAINER]) if flats[TRAINER] is not None else None]
        nbytes = sum(f.total_size for f in flats.values() if f is not None)
        try:
            receipt = ray.get(
                route["holder"].keep.remote(step, self.rank, refs, nbytes, route["peers"], route["timeout_s"])
            )
        except Exception as exc:
            cause = exc.as_instanceof_cause() if isinstance(exc, ray.exceptions.RayTaskError) else exc
            actor.abort_step.remote(step, _sendable(cause), self.rank)
            raise cause from None
        del refs  # the holders own their copies now
        handed_over.set()
        reply = _get(actor.memory_report.remote(step, report, receipt, persist), step)
        info = _committed(actor, (reply["info"], reply["position"]))
        if wait_persisted and reply["persisting"]:
            info = _committed(actor, _get(actor.wait_committed_at.remote(step), step))
        return info

    def _write_share(self, plan: SavePlan, flats: dict[str, FlatState | None]) -> RankResult:
        """Write what the plan gives this rank: its files, its ranges of shared files; hash its replicas."""

        def source(part: str, key: str, rank: int) -> np.ndarray:
            return flats[part].tensors[key].data  # type: ignore[union-attr]

        if self._storage is None:
            self._storage = open_store(self.config).storage  # the local tier of a tiered run
        result = RankResult(self.rank)
        result.files = write_share(self._storage, plan, self.rank, source, direct_io=self.config.direct_io)
        result.digests = {
            (p, k): xxhash.xxh3_64_hexdigest(source(p, k, self.rank)) for p, k in plan.replicas(self.rank)
        }
        sends = plan.sends(self.rank)
        for part in (MODEL, TRAINER):
            keys = [k for p, k in sends if p == part]
            if keys:
                ref = [ray.put({k: source(part, k, self.rank) for k in keys})]
                if part == MODEL:
                    result.model_ref = ref
                else:
                    result.trainer_ref = ref
        return result

    def load(
        self, step: Selector = "latest", *, into: Mapping[str, Any], trainer_into: Mapping[str, Any] | None = None
    ) -> int:
        """Fill this rank's tensors in place from a committed step; the step loaded.

        ``into`` is this rank's state dict (tensors, DTensors of any mesh and placement, Shards):
        each value gets only its own box of the saved tensor, read straight from storage (positioned
        reads locally, ranged reads on an object store), whatever world size saved the step. With
        the memory tier, a step held in memory is read from the nearest holder instead (this node
        first), checked against its digests; if some rank's state has no surviving copy, one
        warning names the step and its nodes, and the newest persisted step is loaded instead.
        ``last_load_source`` then says ``"memory"`` or ``"storage"``.
        ``trainer_into`` (e.g. the optimizer state from ``get_state_dict``) is filled the same way.
        """
        started = time.perf_counter()
        if self.config.memory_replicas:
            target = _ask(lambda: self.handle.actor.memory_step.remote(step), self.config.save_timeout_s)
            if isinstance(target, MemoryStep):
                node = ray.get_runtime_context().get_node_id()
                try:
                    read_memory_into(target, MODEL, into, node)
                    if trainer_into is not None:
                        read_memory_into(target, TRAINER, trainer_into, node)
                    self.last_load_source = "memory"
                    telemetry.observe_recovery(self.run_name, "memory", time.perf_counter() - started)
                    return target.step
                except MemoryStepLost as exc:
                    logger.warning("%s; loading the newest persisted step instead", exc)
                    self.handle.actor.memory_lost.remote(target.step)
                    step = "latest"  # never a partial or mixed step: every target is filled again from storage
            else:
                step = target
        store = open_store(self.config)
        resolved = store.resolve(step)
        store.load(resolved, into=into)
        if trainer_into is not None:
            store.load_trainer_state(resolved, into=trainer_into)
        self.last_load_source = "storage"
        telemetry.observe_recovery(self.run_name, "storage", time.perf_counter() - started)
        return resolved

    def wait(self, timeout: float | None = None) -> list[CheckpointInfo]:
        """Wait for every pending save of this worker; returns their CheckpointInfos."""
        results = [f.result(timeout) for f in self._futures]
        self._futures = []
        return results


def _put(flat: FlatState | None) -> Any:
    """One object-store copy of a flattened state's bytes ({key: uint8 numpy view}, never pickled)."""
    assert flat is not None
    return ray.put({k: b.data for k, b in flat.tensors.items()})


def _root_cause(actor: Any, step: int, rank: int) -> SaveAbortedError | None:
    """The step's abort when another rank's failure caused it (then this rank's error, e.g. its
    files removed under it, is a consequence); None when this rank's failure came first."""
    try:
        ray.get(actor.wait_committed_at.remote(step), timeout=30)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, SaveAbortedError) and rank not in getattr(cause, "failures", {}):
            return cause
    except Exception:  # noqa: BLE001 - the master is gone or slow: report this rank's own error
        return None
    return None


def _sendable(exc: BaseException) -> BaseException:
    """The exception itself when Ray can pass it to the master, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - anything unpicklable travels as text
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _committed(actor: Any, result: tuple[CheckpointInfo, tuple[str, int] | None]) -> CheckpointInfo:
    """A commit's info; its index position is noted so this process's queries will include it."""
    info, position = result
    note_index_position(actor, position)
    return info


def _ask(call: Any, timeout_s: float) -> Any:
    """A query of the checkpointer, retried while it restarts (up to ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(call())
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError) as exc:
            if isinstance(exc, ray.exceptions.ActorDiedError) or time.monotonic() >= deadline:
                raise
            logger.info("checkpointer unavailable (%s); retrying", type(exc).__name__)
            time.sleep(0.5)
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None


def _get(ref: Any, step: int) -> Any:
    """ray.get that re-raises the actor's own exception type and names the step on actor death."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        raise SaveAbortedError(f"step {step}: the checkpointer died during the save; retry the save") from exc
    except ray.exceptions.RayTaskError as exc:
        raise exc.as_instanceof_cause() from None
