"""The hooks a plain store offers to what is composed around it, and the observer of transfers.

A :class:`~ray_ckpt.core.store.CheckpointStore` handles one storage. A tier (the remote tier of
:mod:`ray_ckpt.tiers`, a memory tier) is built around plain stores through these hooks only:

* ``store.listeners``: :class:`StoreListener` objects told when the store starts writing, commits a
  step, a step's scores change, or steps are deleted;
* ``store.keepers``: callables returning a retention policy of steps another tier needs kept;
* ``store.fallback``: another store a step is read from when this one does not hold it.

:class:`TransferObserver` is how a tier reports its transfers (an upload's seconds and bytes,
retries, failures); its methods do nothing. The Ray layer hands in one that exports Ray metrics
(its metrics module): nothing here or in the tiers imports Ray.
"""

from __future__ import annotations

from ray_ckpt.core.index import CheckpointInfo


class StoreListener:
    """Told of a store's changes (subclass and override what you need; every method does nothing).

    Called on the thread that made the change, after it is recorded in the store's index; an
    exception is logged by the store and never fails the change.
    """

    def writer_started(self) -> None:
        """The store is about to write its first step (after collecting a crashed writer's leftovers)."""

    def committed(self, info: CheckpointInfo) -> None:
        """``info.step`` was committed (saved, copied, or begun and committed)."""

    def scored(self, step: int) -> None:
        """Evaluation scores joined ``step``'s record."""

    def deleted(self, steps: list[int]) -> None:
        """These steps were deleted from the store (by ``delete`` or retention)."""


class TransferObserver:
    """Observations of a tier's transfers; every method does nothing (the Ray layer's export them)."""

    def upload(self, run: str, seconds: float, nbytes: int) -> None:
        """One step was uploaded in ``seconds`` (``nbytes`` of files)."""

    def upload_retry(self, run: str) -> None:
        """An upload attempt failed and is retried."""

    def upload_failure(self, run: str) -> None:
        """An upload failed for good (the local copy is kept)."""


NO_OBSERVER = TransferObserver()

__all__ = ["NO_OBSERVER", "StoreListener", "TransferObserver"]
