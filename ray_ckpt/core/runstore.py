"""The one interface of a run's store, whether or not it has a remote tier.

:class:`RunStore` lists what :class:`~ray_ckpt.core.store.CheckpointStore` and
:class:`~ray_ckpt.tiers.tiered.TieredCheckpointStore` share, with the same signatures (a test compares
them with ``inspect.signature``). A tiered store is composed of two plain stores and an uploader
(:mod:`ray_ckpt.tiers`), so code written against a plain store runs unchanged on a tiered one
(:func:`ray_ckpt.open_store` opens either from a config). Their meanings with a remote tier:

* ``save``/``save_async`` commit on the local tier; the upload follows in the background.
* queries (``list``, ``latest``, ``best``, ``top_k``, ``info``, ``resolve``) answer over the union
  of both tiers, each record's ``durability`` naming the tiers that hold the step;
* reads (``load``, ``load_trainer_state``, ``read_architecture``, ``instantiate``, ``store_for``)
  use the local copy and fall back to the remote one; ``verify`` checks every copy;
* ``apply_retention`` applies the rules on the local tier, where a step not yet uploaded is kept,
  and has the uploader apply them on the remote tier right after (so no caller waits for the
  remote storage); it returns the steps no tier holds any more. ``delete`` removes every copy.
* ``durable_uri``, ``wait_for_uploads`` and ``not_uploaded_steps`` answer about the upload (a
  plain store has none: its step URI, ``{}``, no steps), so callers need not ask which they hold.

No I/O and no Ray here.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ray_ckpt.core.architecture import Architecture
from ray_ckpt.core.index import CheckpointIndex, CheckpointInfo
from ray_ckpt.core.layout import Selector

if TYPE_CHECKING:
    from ray_ckpt.core.store import CheckpointStore


@runtime_checkable
class RunStore(Protocol):
    """The store of one run: save, query, load, verify, retain, lease, score, build the model.

    Implementations may take further keyword-only options with defaults (the protocol names
    what every caller may rely on).
    """

    def save(
        self,
        step: int,
        state_dict: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        trainer_state: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> CheckpointInfo:
        """Write a checkpoint and commit it atomically, then apply retention."""
        ...

    def save_async(self, step: int, state_dict: Mapping[str, Any], **kwargs: Any) -> concurrent.futures.Future:
        """Snapshot the state and write it on a background thread; a Future of the CheckpointInfo."""
        ...

    def wait(self) -> None:
        """Block until every async save has finished."""
        ...

    def close(self, *, wait: bool = True) -> None:
        """Finish pending saves (and, with ``wait``, uploads) and release the threads."""
        ...

    def list(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first."""
        ...

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint."""
        ...

    def best(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo | None:
        """The best checkpoint by the run's metric (or ``metric``/``mode``)."""
        ...

    def top_k(self, k: int, metric: str | None = None, mode: str | None = None) -> list[CheckpointInfo]:
        """The ``k`` best checkpoints, best first."""
        ...

    def info(self, step: Selector = "latest") -> CheckpointInfo:
        """The record of one committed checkpoint."""
        ...

    def resolve(self, selector: Selector, *, fallback_to_latest: bool = False) -> int:
        """Turn ``"latest"``, ``"best"``, ``"step_12"``, ``"v12"`` or ``12`` into a committed step."""
        ...

    def load(
        self,
        step: Selector = "latest",
        keys: Iterable[str] | None = None,
        *,
        verify: bool | None = None,
        mmap: bool = False,
    ) -> dict[str, Any]:
        """A checkpoint's state dict (tensors on CPU), or only ``keys`` of it."""
        ...

    def load_trainer_state(self, step: Selector = "latest") -> Any:
        """The trainer state saved with a checkpoint (None if it had none)."""
        ...

    def verify(self, step: Selector = "latest") -> CheckpointInfo:
        """Check a checkpoint's files as strictly as ``load`` does, plus every checksum."""
        ...

    def delete(self, step: int) -> None:
        """Delete a checkpoint (every copy of it)."""
        ...

    def retention_plan(self, protected: Iterable[int] = ()) -> tuple[list[int], list[int]]:
        """Which steps retention keeps and which it would delete: ``(keep, delete)``."""
        ...

    def apply_retention(self, protected: Iterable[int] | None = None) -> list[int]:
        """Delete what no rule keeps; the steps no tier holds any more."""
        ...

    def gc(self, *, dry_run: bool = False, older_than_s: float = 0.0) -> list[str]:
        """Remove the leftovers of crashed saves; the removed paths."""
        ...

    def acquire_lease(self, step: int, ttl_s: float, holder: str = "") -> str:
        """Protect a committed step from retention for ``ttl_s`` seconds; the lease id."""
        ...

    def renew_lease(self, step: int, lease_id: str, ttl_s: float, holder: str = "") -> None:
        """Push a lease's expiry ``ttl_s`` seconds into the future."""
        ...

    def release_lease(self, step: int, lease_id: str) -> None:
        """End a lease."""
        ...

    def leased_steps(self) -> set[int]:
        """The steps some unexpired lease protects."""
        ...

    def report_eval(self, step: int, metrics: Mapping[str, Any]) -> CheckpointInfo:
        """Merge evaluation metrics into a committed checkpoint's record."""
        ...

    def write_architecture(self, model_or_class_path: Any, config: Any = None) -> Architecture:
        """Write the run's model_architecture.json once."""
        ...

    def read_architecture(self) -> Architecture:
        """The run's recorded architecture (validated, not imported)."""
        ...

    def instantiate(self, step: Selector = "best", strict: bool = True) -> torch.nn.Module:
        """Build the model from model_architecture.json with a checkpoint's weights."""
        ...

    def reload(self) -> CheckpointIndex:
        """Read the run's index from storage again; the index queries answer from."""
        ...

    def step_uri(self, step: int) -> str:
        """Where a step lives on the store (its local tier, with a remote tier)."""
        ...

    def store_for(self, step: int) -> CheckpointStore:
        """The plain store ``step`` is read from (this one, or the tier/fallback that holds it)."""
        ...

    def durable_uri(self, step: int, *, wait: bool = False) -> str:
        """The URI of a step's most durable copy (the remote one once uploaded; ``wait`` for it)."""
        ...

    def wait_for_uploads(self, timeout: float | None = None, *, raise_on_error: bool = True) -> dict[int, str]:
        """Block until queued uploads finish; ``{step: remote URI}`` of the successful (``{}``: no tier)."""
        ...

    def not_uploaded_steps(self) -> set[int]:
        """Committed local steps without a remote copy yet, which pruning must keep (none: no tier)."""
        ...


# The members every implementation must have with compatible signatures (tests/tiers/test_tiered.py).
RUN_STORE_METHODS: tuple[str, ...] = tuple(
    name for name in RunStore.__dict__ if not name.startswith("_") and callable(RunStore.__dict__[name])
)
