"""The API used inside worker actors (plain Ray actors, Ray Train workers, Tune trials).

Tensors never travel pickled: in gather mode a rank puts its tensors into the object store as
uint8 numpy views (one memcpy, then zero-copy to the checkpointer); in direct mode it writes its
own shards to storage. ``save(blocking=False)`` returns once the state is snapshotted.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
import xxhash

from ray_ckpt.checkpointer import (
    CheckpointerHandle,
    RankReport,
    RankState,
    TensorMeta,
    get_checkpointer,
    note_index_position,
)
from ray_ckpt.errors import SaveAbortedError
from ray_ckpt.format import FlatState, TensorBuffer, flatten_state
from ray_ckpt.index import CheckpointInfo
from ray_ckpt.layout import validate_metrics
from ray_ckpt.store import CheckpointStore
from ray_ckpt.writer import write_shard_file, write_trainer_state_files

logger = logging.getLogger(__name__)


def _train_context() -> tuple[int, int] | None:
    """(rank, world_size) from Ray Train's context when running inside a Train worker."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return int(ctx.get_world_rank()), int(ctx.get_world_size())
    except Exception:
        return None


def _describe(flat: FlatState, with_digests: bool) -> RankState:
    tensors = {
        key: TensorMeta(
            buf.dtype, tuple(buf.shape), buf.nbytes, xxhash.xxh3_64_hexdigest(buf.data) if with_digests else None
        )
        for key, buf in flat.tensors.items()
    }
    return RankState(tensors, dict(flat.aliases), flat.structure)


def _digests(flat: FlatState) -> dict[str, str]:
    """xxh3 of each tensor's bytes: ranks that hold the same key must hold the same bytes."""
    return {key: xxhash.xxh3_64_hexdigest(buf.data) for key, buf in flat.tensors.items()}


def _set_digests(state: RankState, digests: Mapping[str, str]) -> None:
    for key, digest in digests.items():
        state.tensors[key].digest = digest


def _copy(flat: FlatState, into: FlatState | None = None) -> FlatState:
    """A private copy of ``flat``'s bytes, written into ``into``'s buffers when their sizes match.

    Copying into buffers that were used before costs a memcpy; fresh ones also cost a page fault
    per 4 KiB page, which is most of the time a non-blocking save holds the training loop.
    """
    spare = into.tensors if into is not None and _same_sizes(into, flat) else None
    tensors = {}
    for key, buf in flat.tensors.items():
        if spare is None:
            data = buf.data.copy()
        else:
            data = spare[key].data
            np.copyto(data, buf.data)
        tensors[key] = TensorBuffer(buf.dtype, buf.shape, data)
    return FlatState(tensors, flat.aliases, flat.structure)


def _same_sizes(a: FlatState, b: FlatState) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(a.tensors[k].nbytes == b.tensors[k].nbytes for k in b.tensors)


class SaveFuture:
    """The outcome of one ``WorkerClient.save``: ``result()`` gives the committed CheckpointInfo."""

    def __init__(
        self, step: int, *, ref: Any = None, future: concurrent.futures.Future | None = None, actor: Any = None
    ) -> None:
        self.step = step
        self._ref = ref  # of the checkpointer's wait_committed_at
        self._future = future
        self._actor = actor

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """Wait for the commit; raises SaveAbortedError (or the rank's error) if it failed."""
        try:
            if self._future is not None:
                return self._future.result(timeout)
            return _committed(self._actor, ray.get(self._ref, timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"step {self.step}: not committed within {timeout}s") from None
        except ray.exceptions.RayActorError as exc:
            raise SaveAbortedError(
                f"step {self.step}: the checkpointer died during the save ({exc.__class__.__name__}); retry the save"
            ) from exc
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            raise cause from None

    def done(self) -> bool:
        if self._future is not None:
            return self._future.done()
        ready, _ = ray.wait([self._ref], timeout=0)
        return bool(ready)


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
        self._background: concurrent.futures.ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(self.config.max_pending_saves)
        self._storage = None
        # The snapshot buffers of the last finished non-blocking direct save, reused by the next one
        # (same tensor sizes): one copy of this rank's state stays allocated between such saves.
        self._spare: dict[str, FlatState | None] = {}
        self._spare_lock = threading.Lock()

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
    ) -> SaveFuture:
        """Hand this rank's state for ``step`` to the checkpointer.

        Returns once the state is snapshotted (training may then change the tensors); with
        ``blocking=True`` only after the step has committed. Blocks while ``max_pending_saves``
        saves are in flight (back-pressure).
        """
        flat = flatten_state(state_dict, what=f"state_dict (rank {self.rank})")
        if not flat.tensors:
            raise ValueError(f"state_dict (rank {self.rank}): empty (no tensors to save)")
        if self.world_size > 1 and flat.structure is not None:
            raise TypeError(
                f"state_dict (rank {self.rank}): with world_size > 1 each rank must pass a flat "
                "{name: tensor} dict (put nested state in trainer_state)"
            )
        trainer_flat = None
        if trainer_state is not None:
            if self.rank == 0:
                trainer_flat = flatten_state(trainer_state, what="trainer_state")
            else:
                logger.debug("rank %d: trainer_state is taken from rank 0 only; ignoring this rank's", self.rank)
        report = RankReport(
            rank=self.rank,
            world_size=self.world_size,
            model=_describe(flat, with_digests=False),  # digests (world_size > 1) off the critical path below
            trainer=_describe(trainer_flat, False) if trainer_flat is not None else None,
            metrics=validate_metrics(metrics),
            metadata=dict(metadata or {}),
        )
        if self.config.write_mode == "direct":
            future = self._save_direct(step, flat, trainer_flat, report, overwrite, blocking)
        else:
            future = self._save_gather(step, flat, trainer_flat, report, overwrite)
        self._futures = [f for f in self._futures if not f.done()] + [future]
        if blocking:
            future.result()
        return future

    def _save_gather(
        self, step: int, flat: FlatState, trainer_flat: FlatState | None, report: RankReport, overwrite: bool
    ) -> SaveFuture:
        # ray.put is the snapshot (one copy into the object store); replicated keys are compared
        # by the checkpointer, which has every rank's bytes: nothing else holds the training loop.
        report.model_ref = [ray.put({k: b.data for k, b in flat.tensors.items()})]
        if trainer_flat is not None:
            report.trainer_ref = [ray.put({k: b.data for k, b in trainer_flat.tensors.items()})]
        actor = self.handle.actor
        _get(actor.report.remote(step, report, overwrite), step)  # waits here under back-pressure
        return SaveFuture(step, ref=actor.wait_committed_at.remote(step), actor=actor)

    def _save_direct(
        self,
        step: int,
        flat: FlatState,
        trainer_flat: FlatState | None,
        report: RankReport,
        overwrite: bool,
        blocking: bool,
    ) -> SaveFuture:
        if blocking:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            try:
                fut.set_result(self._write_direct(step, flat, trainer_flat, report, overwrite))
            except BaseException as exc:
                fut.set_exception(exc)
            return SaveFuture(step, future=fut)
        with self._spare_lock:
            spare_model, spare_trainer = self._spare.pop("model", None), self._spare.pop("trainer", None)
        # snapshot: training may change the tensors once we return
        flat = _copy(flat, into=spare_model)
        trainer_flat = _copy(trainer_flat, into=spare_trainer) if trainer_flat is not None else None
        if self._background is None:
            self._background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ray-ckpt-direct")
        self._slots.acquire()
        future = self._background.submit(self._write_direct, step, flat, trainer_flat, report, overwrite)

        def finished(_: concurrent.futures.Future) -> None:
            with self._spare_lock:
                self._spare = {"model": flat, "trainer": trainer_flat}
            self._slots.release()

        future.add_done_callback(finished)
        return SaveFuture(step, future=future)

    def _write_direct(
        self, step: int, flat: FlatState, trainer_flat: FlatState | None, report: RankReport, overwrite: bool
    ) -> CheckpointInfo:
        actor = self.handle.actor
        if self.world_size > 1:  # of the snapshot when not blocking: the loop does not wait for them
            _set_digests(report.model, _digests(flat))
        plan = _get(actor.plan_direct.remote(step, self.rank, self.world_size, report.model, overwrite), step)
        try:
            if self._storage is None:
                self._storage = CheckpointStore(config=self.config).storage
            directory, shards = plan.directory, plan.shards
            files = {
                s.name: write_shard_file(
                    self._storage,
                    directory,
                    s,
                    flat.tensors,
                    self.config.checkpoint_format,
                    direct_io=self.config.direct_io,
                )
                for s in shards
            }
            if trainer_flat is not None:
                files.update(write_trainer_state_files(self._storage, directory, trainer_flat))
        except Exception as exc:
            actor.abort_step.remote(step, f"rank {self.rank} failed to write its shards: {exc}")
            raise
        report.files = files
        _get(actor.report_direct.remote(step, report), step)
        return _committed(actor, _get(actor.wait_committed_at.remote(step), step))

    def wait(self, timeout: float | None = None) -> list[CheckpointInfo]:
        """Wait for every pending save of this worker; returns their CheckpointInfos."""
        results = [f.result(timeout) for f in self._futures]
        self._futures = []
        return results


def _committed(actor: Any, result: tuple[CheckpointInfo, tuple[str, int] | None]) -> CheckpointInfo:
    """A commit's info; its index position is noted so this process's queries will include it."""
    info, position = result
    note_index_position(actor, position)
    return info


def _get(ref: Any, step: int) -> Any:
    """ray.get that re-raises the actor's own exception type and names the step on actor death."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        raise SaveAbortedError(f"step {step}: the checkpointer died during the save; retry the save") from exc
    except ray.exceptions.RayTaskError as exc:
        raise exc.as_instanceof_cause() from None
