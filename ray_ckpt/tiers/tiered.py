"""Tiered saves: commit to local disk first (training resumes at disk speed), then upload to a
remote prefix in the background.

:class:`TieredCheckpointStore` is the one :class:`~ray_ckpt.core.store.CheckpointStore` with its
remote tier plug-in (:mod:`ray_ckpt.tiers.remote`) wired from the config, plus the upload helpers of
that plug-in; every store method keeps its signature and meaning (:class:`~ray_ckpt.core.runstore.RunStore`).
Both tiers have the same layout (``<local>/<run>/checkpoints/step_N/`` and
``<remote_uri>/<run>/checkpoints/step_N/``) and the same commit protocol: the marker is written
last, so a reader of the remote prefix never sees a partial checkpoint. A failed upload is
retried with exponential backoff; retention runs with the same rules on both tiers, and a local
copy is dropped only once its remote copy is committed (``uploaded.json`` beside it records
that, also across restarts: the uploads of local steps without it resume on construction).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping
from typing import Any

from ray_ckpt.core.config import CheckpointConfig
from ray_ckpt.core.errors import CheckpointNotFoundError
from ray_ckpt.core.layout import MARKER_FILE, step_dir
from ray_ckpt.core.store import CheckpointStore
from ray_ckpt.tiers.remote import LOCAL, REMOTE, UPLOADED_FILE, RemoteTier, UploadError, UploadPolicy

__all__ = ["LOCAL", "REMOTE", "UPLOADED_FILE", "TieredCheckpointStore", "UploadError", "UploadPolicy"]


class TieredCheckpointStore(CheckpointStore):
    """A :class:`CheckpointStore` on local disk with a remote tier fed by a background uploader.

    ``TieredCheckpointStore(CheckpointConfig(storage_uri="/nvme/ckpt", remote_uri="s3://b/p"))``.
    Without ``remote_uri`` it is just the local store (every checkpoint is ``["local"]``).
    ``remote_storage_options`` default to the config's ``storage_options``; ``upload_retries``,
    ``upload_backoff_s`` and ``max_backoff_s`` are the uploader's :class:`UploadPolicy`.
    """

    def __init__(
        self,
        config: CheckpointConfig | None = None,
        *,
        remote_storage_options: dict[str, Any] | None = None,
        upload_retries: int = 5,
        upload_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        resume_uploads: bool = True,
        **options: Any,
    ) -> None:
        if remote_storage_options is not None:
            options["remote_storage_options"] = remote_storage_options
        cfg = config or CheckpointConfig()
        super().__init__(
            config=cfg.replace(**options) if options else cfg,
            upload_policy=UploadPolicy(upload_retries, upload_backoff_s, max_backoff_s),
        )
        if resume_uploads and self.tiering is not None:
            self.tiering.resume()

    def __repr__(self) -> str:
        return f"TieredCheckpointStore({self.uri!r} -> {self.remote.uri if self.remote else None!r})"

    @property
    def remote_checkpoints_enabled(self) -> bool:
        """Whether a remote tier is configured."""
        return self.tiering is not None

    @property
    def local(self) -> CheckpointStore:
        """The local tier alone (same run and index; its queries and deletions see local copies only)."""
        return self if self.tiering is None else self.tiering.local

    @property
    def remote(self) -> CheckpointStore | None:
        """The remote tier: a plain store of the same run on ``remote_uri`` (None without one)."""
        return None if self.tiering is None else self.tiering.remote

    def _tier(self) -> RemoteTier:
        if self.tiering is None:
            raise RuntimeError(f"run {self.run_name!r} has no remote tier (remote_uri is not set)")
        return self.tiering

    # -- the uploader ---------------------------------------------------------------------------
    def save_and_upload(
        self, step: int, state_dict: Mapping[str, Any], **kwargs: Any
    ) -> concurrent.futures.Future[str]:
        """:meth:`save`, returning a Future of the remote URI (resolved once the remote commit is done)."""
        self.save(step, state_dict, **kwargs)
        return self.upload_future(step)

    def upload_future(self, step: int) -> concurrent.futures.Future[str]:
        """A Future of step's remote URI: the queued upload, or a new one for a local-only step."""
        return self._tier().upload_future(step)

    def pending_uploads(self) -> list[int]:
        """Steps whose upload is queued or running."""
        return [] if self.tiering is None else self.tiering.pending_uploads()

    def wait_for_uploads(self, timeout: float | None = None, *, raise_on_error: bool = True) -> dict[int, str]:
        """Block until every queued upload has finished; ``{step: remote URI}`` of the successful.

        Raises UploadError naming the failed steps (their local copies are kept) unless
        ``raise_on_error=False``.
        """
        return {} if self.tiering is None else self.tiering.wait_for_uploads(timeout, raise_on_error=raise_on_error)

    def not_uploaded_steps(self) -> set[int]:
        """Committed local steps whose remote copy was never committed (empty without a remote tier)."""
        return set() if self.tiering is None else self.tiering.not_uploaded_steps()

    def store_for(self, step: int) -> CheckpointStore:
        """The tier to read ``step`` from: the local copy when it exists, else the remote one."""
        if self.local.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            return self.local
        remote = self.remote
        if remote is not None and remote.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            return remote
        raise CheckpointNotFoundError(f"run {self.run_name!r} has no committed step {step} on any tier")

    def __enter__(self) -> TieredCheckpointStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
