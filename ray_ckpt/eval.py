"""The API used inside evaluation actors: query the run's top-k index, wait for new
checkpoints, lease and load them straight from storage, and report scores back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import ray
import torch

from ray_ckpt.checkpointer import CheckpointerHandle, get_checkpointer
from ray_ckpt.errors import CheckpointNotFoundError
from ray_ckpt.index import CheckpointInfo
from ray_ckpt.store import CheckpointStore, Selector

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Lease:
    """A lease on one checkpoint: retention will not delete it while the lease is renewed.

    Renewed by a background thread every ``ttl_s / 3``; if the holder dies the lease simply
    expires after ``ttl_s``.
    """

    def __init__(self, store: CheckpointStore, step: int, ttl_s: float, holder: str) -> None:
        self.store = store
        self.step = step
        self.ttl_s = ttl_s
        self.holder = holder
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

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()


class EvalClient:
    """An evaluation worker's view of a run.

    Queries go to the checkpointer (served from memory); loads read storage directly.
    Queries retry for up to ``retry_s`` while a restarting checkpointer comes back.
    """

    def __init__(
        self,
        run_name: str,
        namespace: str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        handle: CheckpointerHandle | None = None,
        retry_s: float = 60.0,
    ) -> None:
        self.run_name = run_name
        self.handle = handle or get_checkpointer(run_name, namespace)
        self.retry_s = retry_s
        config = self.handle.config
        if storage_options is not None:
            config = config.replace(storage_options=storage_options)
        self.config = config
        self.store = CheckpointStore(config=config)
        self.holder = f"{socket.gethostname()}:{os.getpid()}"

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

    # -- queries --------------------------------------------------------------------------------
    def top_k(self, k: int, metric: str | None = None, mode: str | None = None) -> list[CheckpointInfo]:
        """The k best checkpoints, best first."""
        return self._call("top_k", k, metric, mode)

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        return self._call("best", metric, mode)

    def latest(self) -> CheckpointInfo | None:
        return self._call("latest")

    def list(self) -> list[CheckpointInfo]:
        return self._call("list")

    def wait_for_checkpoint(self, after_step: int | None = None, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until a checkpoint newer than ``after_step`` commits (None on timeout)."""
        return self._call("wait_for_checkpoint", after_step, timeout)

    # -- loading --------------------------------------------------------------------------------
    def _resolve(self, step: Selector) -> int:
        if step in ("latest", "best"):
            info = self.latest() if step == "latest" else self.best()
            if info is None:
                raise CheckpointNotFoundError(f"run {self.run_name!r} has no {step} checkpoint")
            return info.step
        return self.store.resolve(step)

    def load(self, step: Selector = "latest", keys: Iterable[str] | None = None) -> dict[str, Any]:
        """Load a checkpoint's state dict from storage (not through the actor)."""
        return self.store.load(self._resolve(step), keys)

    def load_model(self, step: Selector = "best", strict: bool = True) -> torch.nn.Module:
        """Build the run's model from model_architecture.json with a checkpoint's weights."""
        if step == "best" and self.best() is None:
            step = "latest"
        return self.store.instantiate(self._resolve(step), strict=strict)

    def lease(self, step: Selector, ttl_s: float | None = None) -> Lease:
        """Lease a checkpoint (use as ``with ev.lease(step): ...``)."""
        return Lease(self.store, self._resolve(step), ttl_s or self.config.lease_ttl_s, self.holder)

    @contextlib.contextmanager
    def leased(self, step: Selector = "latest") -> Iterator[tuple[int, dict[str, Any]]]:
        """Lease a checkpoint and load it: ``with ev.leased("best") as (step, state): ...``."""
        with self.lease(step) as lease:
            yield lease.step, self.store.load(lease.step)

    def report_eval(self, step: int, metrics: dict[str, float]) -> CheckpointInfo:
        """Join evaluation metrics to a checkpoint's record; they can rank top_k and retention."""
        return self._call("report_eval", step, dict(metrics))

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
