"""NeMo RL-style checkpoint manager over ray-ckpt's bring-your-own-files checkpoints.

The trainer keeps calling what it calls today::

    manager = NeMoCheckpointManager({"enabled": True, "checkpoint_dir": "results/grpo",
                                     "metric_name": "val_reward", "higher_is_better": True,
                                     "keep_top_k": 3, "save_period": 10})
    path = manager.init_tmp_checkpoint(step, training_info, run_config)   # write files under path
    manager.finalize_checkpoint(path)                                      # commit + retention
    manager.get_best_checkpoint_path(); manager.load_training_info(path)

Only names are translated: the files go through :class:`~ray_ckpt.core.byo.PendingCheckpoint`
(checksums, ``checkpoint.json`` last), the layout is ray-ckpt's
(``<checkpoint_dir>/<run_name>/checkpoints/step_N``) and retention is the store's. As in NeMo
RL, ranking uses the numeric entries of ``training_info`` (``metric_name`` looked up there), and
``keep_top_k`` without a ``metric_name`` keeps the most recent ``k``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray_ckpt.adapters.nemo_config  # noqa: F401 - registers NeMo RL's field names with the config
from ray_ckpt.core.byo import TRAINING_INFO_FILE, PendingCheckpoint, read_training_info
from ray_ckpt.core.config import CheckpointConfig, register_consumer
from ray_ckpt.core.errors import CheckpointNotFoundError
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.layout import parse_step_dir, step_dir
from ray_ckpt.core.safejson import JsonObject
from ray_ckpt.tiers.tiered import open_store

logger = logging.getLogger(__name__)

# NeMo RL options that steer the trainer, not the checkpoint store: accepted and left to it.
TRAINER_SIDE_KEYS = frozenset(
    {
        "save_optimizer",
        "checkpoint_must_save_by",
        "save_data_plane",
        "load_replay_buffer",
        "pretrained_checkpoint",
        "ft_save_period",
        "model_save_format",
        "save_consolidated",
        "is_peft",
        "peft_config",
        "model_cache_dir",
        "model_repo_id",
        "is_async",
    }
)


def config_from_nemo(config: Mapping[str, Any], **overrides: Any) -> CheckpointConfig:
    """A CheckpointConfig from a NeMo RL ``checkpointing`` dict (names translated, nothing else)."""
    data = {k: v for k, v in dict(config).items() if k not in TRAINER_SIDE_KEYS}
    ignored = sorted(set(config) & TRAINER_SIDE_KEYS)
    if ignored:
        logger.info("NeMo checkpointing keys left to the trainer: %s", ignored)
    if "checkpoint_dir" in data:
        data["checkpoint_dir"] = os.fspath(data["checkpoint_dir"])
    ft_keep = data.pop("ft_keep_latest_k", None)
    if data.get("metric_name") is None and data.get("keep_top_k") is not None:
        # NeMo RL: keep_top_k without a metric keeps the most recent k.
        data["keep_last_n"] = data.pop("keep_top_k")
    if ft_keep is not None:
        data["keep_last_n"] = max(int(ft_keep), int(data.get("keep_last_n") or 0))
    data.update(overrides)
    return CheckpointConfig.from_dict(data)


# What NeMoCheckpointManager reads of a config (check_consumed(by='NeMoCheckpointManager')).
register_consumer("NeMoCheckpointManager", {"store", "retention", "tiering", "save_interval_steps", "enabled"})


class NeMoCheckpointManager:
    """NeMo RL's ``CheckpointManager`` API on a ray-ckpt store (local disk or an object store)."""

    def __init__(
        self,
        config: Mapping[str, Any] | CheckpointConfig,
        *,
        run_name: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        overrides: dict[str, Any] = {}
        if run_name is not None:
            overrides["run_name"] = run_name
        if storage_options is not None:
            overrides["storage_options"] = storage_options
        if isinstance(config, CheckpointConfig):
            cfg = config.replace(**overrides) if overrides else config
        else:
            cfg = config_from_nemo(config, **overrides)
        self.config = cfg
        self.store = open_store(cfg)  # with remote_uri: tiered (queries and reads cover both tiers)
        self._pending: dict[str, PendingCheckpoint] = {}

    def __repr__(self) -> str:
        return f"NeMoCheckpointManager({self.store.uri!r})"

    @property
    def enabled(self) -> bool:
        """NeMo's ``enabled``: whether the trainer should checkpoint at all."""
        return self.config.enabled

    @property
    def metric_name(self) -> str | None:
        """The training_info entry checkpoints are ranked by."""
        return self.config.metric_name

    @property
    def higher_is_better(self) -> bool:
        """NeMo's name for ``mode == 'max'``."""
        return self.config.mode == "max"

    @property
    def keep_top_k(self) -> int | None:
        """How many best checkpoints retention keeps."""
        return self.config.keep_top_k

    @property
    def save_period(self) -> int:
        """NeMo's name for ``save_interval_steps``."""
        return self.config.save_interval_steps

    def should_save(self, step: int) -> bool:
        """Whether checkpointing is enabled and ``step`` falls on ``save_period``."""
        return self.enabled and step % self.save_period == 0

    # -- writing ------------------------------------------------------------------------------
    def begin(
        self, step: int, training_info: Mapping[str, Any] | None = None, run_config: Any = None
    ) -> PendingCheckpoint:
        """A pending checkpoint (``.path``, ``.commit()``, ``.abort()``)."""
        pending = self.store.begin(step, training_info, run_config)
        self._pending[str(pending.path)] = pending
        return pending

    def init_tmp_checkpoint(self, step: int, training_info: Mapping[str, Any], run_config: Any = None) -> Path:
        """NeMo name of :meth:`begin`: the directory to write the checkpoint's files into."""
        return self.begin(step, training_info, run_config).path

    def finalize_checkpoint(
        self, checkpoint_path: str | os.PathLike[str], metrics: Mapping[str, Any] | None = None
    ) -> CheckpointInfo:
        """Commit the checkpoint begun at ``checkpoint_path`` (checksums, marker last), then retention."""
        pending = self._pending.pop(str(Path(checkpoint_path)), None)
        if pending is None:
            raise KeyError(f"{checkpoint_path}: no checkpoint was begun there by this manager")
        try:
            return pending.commit(metrics)
        except BaseException:
            self._pending[str(pending.path)] = pending  # still pending: retry or abort
            raise

    def abort_checkpoint(self, checkpoint_path: str | os.PathLike[str]) -> None:
        """Discard a begun checkpoint; it never becomes visible."""
        pending = self._pending.pop(str(Path(checkpoint_path)), None)
        if pending is not None:
            pending.abort()

    def remove_old_checkpoints(self, exclude_latest: bool = True) -> list[int]:
        """Apply the store's retention now; returns the deleted steps.

        The store never deletes the latest checkpoint (the resume point), so
        ``exclude_latest=False`` is accepted for compatibility and changes nothing.
        """
        if not exclude_latest:
            logger.debug("remove_old_checkpoints(exclude_latest=False): ray-ckpt always keeps the latest")
        return self.store.apply_retention()

    # -- reading ------------------------------------------------------------------------------
    def _step_path(self, step: int) -> str:
        """A step's directory, on the tier it is read from: an OS path on local disk, else its URI."""
        try:
            tier = self.store.store_for(step)
        except CheckpointNotFoundError:
            return self.store.storage.local_path(step_dir(step)) or self.store.step_uri(step)
        return tier.storage.local_path(step_dir(step)) or tier.step_uri(step)

    def _path(self, info: CheckpointInfo | None) -> str | None:
        return None if info is None else self._step_path(info.step)

    def get_best_checkpoint_path(self) -> str | None:
        """The best checkpoint's directory (a URI on object stores); the latest when none is ranked."""
        if self.metric_name and self.store.best() is None and self.store.latest() is not None:
            logger.warning("no checkpoint has a finite %r; returning the latest", self.metric_name)
        try:
            return self._step_path(self.store.resolve("best", fallback_to_latest=True))
        except CheckpointNotFoundError:
            return None

    def get_latest_checkpoint_path(self) -> str | None:
        """The latest committed checkpoint's directory (a URI on object stores), or None."""
        return self._path(self.store.latest())

    def load_training_info(self, checkpoint_path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
        """The training_info.json of a checkpoint path (None when ``checkpoint_path`` is None)."""
        if checkpoint_path is None:
            return None
        text = os.fspath(checkpoint_path).rstrip("/")
        step = parse_step_dir(text.rsplit("/", 1)[-1])
        if step is not None and text in (self._step_path(step), self.store.step_uri(step)):
            try:
                return read_training_info(self.store, step)
            except CheckpointNotFoundError:
                pass
        path = Path(text) / TRAINING_INFO_FILE  # a directory outside this run
        return JsonObject.parse(path.read_bytes(), name=str(path)).raw

    def close(self) -> None:
        """Abort checkpoints begun but never finalized; finish background uploads."""
        for pending in list(self._pending.values()):
            pending.abort()
        self._pending.clear()
        self.store.close()
