"""Background saves, one mechanism for every way of asking for one.

``CheckpointStore.save_async`` (and the Orbax-style manager's ``async_save`` option, which calls
it) and ``WorkerClient.save(blocking=False)`` all submit their work here: one writer thread, at
most ``max_pending`` saves in flight, and a caller that asks for more blocks until one finishes
(back-pressure instead of growing memory).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any


class BackgroundSaves:
    """One writer thread (started on first use) and at most ``max_pending`` saves in flight."""

    def __init__(self, max_pending: int, thread_name: str = "ray-ckpt-save") -> None:
        self._slots = threading.BoundedSemaphore(max_pending)
        self._thread_name = thread_name
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(
        self, fn: Callable[..., Any], *args: Any, on_done: Callable[[], None] | None = None, **kwargs: Any
    ) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` on the writer thread once a slot is free; its Future.

        ``on_done`` runs when it has finished (succeeded or not), before its slot is freed.
        """
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self._thread_name)
            executor = self._executor
        self._slots.acquire()
        try:
            future = executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise

        def finished(_: concurrent.futures.Future) -> None:
            try:
                if on_done is not None:
                    on_done()
            finally:
                self._slots.release()

        future.add_done_callback(finished)
        return future

    def wait(self) -> None:
        """Block until every save submitted so far has finished."""
        with self._lock:
            executor = self._executor
        if executor is not None:
            executor.submit(lambda: None).result()

    def shutdown(self) -> None:
        """Finish the submitted saves and end the writer thread (a later submit starts a new one)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


__all__ = ["BackgroundSaves"]
