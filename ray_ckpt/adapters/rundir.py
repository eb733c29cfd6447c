"""A run directory for single-process users: ``runs/<run_id>/{config.json, checkpoints/, best}``.

The checkpoints are an ordinary ray-ckpt run (``root`` is the storage, ``run_id`` the run name),
so every reader and the CLI see them. ``best`` points at the best checkpoint's directory: on a
local disk a relative symlink (``best -> checkpoints/step_N``) replaced atomically (a new
symlink under a temporary name, then ``os.replace``); on object stores, which have no links, a
small JSON pointer file of the same name, written in one PUT.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray_ckpt.core.byo import plain_config
from ray_ckpt.core.errors import CheckpointNotFoundError, CorruptCheckpointError
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.layout import MARKER_FILE, Selector, parse_step_dir, step_dir
from ray_ckpt.core.safejson import JsonObject
from ray_ckpt.core.storage.base import temp_name
from ray_ckpt.core.store import CheckpointStore

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
BEST_POINTER = "best"


def new_run_id() -> str:
    """A sortable, unique run id: ``YYYYmmdd-HHMMSS-<6 hex>``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class RunDir:
    """``<root>/<run_id>/`` with the run's config, its checkpoints and a pointer to the best one.

    ``RunDir("exp1", root="runs", metric_name="val_loss")``; store options (``keep_top_k``,
    ``mode``...) pass through to the :class:`CheckpointStore`.
    """

    def __init__(
        self,
        run_id: str | None = None,
        root: str | os.PathLike[str] = "runs",
        *,
        config: Any = None,
        storage_options: dict[str, Any] | None = None,
        **store_options: Any,
    ) -> None:
        self.run_id = run_id or new_run_id()
        self.store = CheckpointStore(os.fspath(root), self.run_id, storage_options, **store_options)
        self.storage = self.store.storage
        self.storage.makedirs("")
        if config is not None:
            self.write_config(config)

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    @property
    def uri(self) -> str:
        """The run directory's URI."""
        return self.store.uri

    @property
    def path(self) -> Path | None:
        """The run directory on local disk (None on object stores)."""
        local = self.storage.local_path("")
        return Path(local) if local else None

    @property
    def checkpoints_uri(self) -> str:
        """The URI of the run's ``checkpoints/`` directory."""
        return self.storage.url("checkpoints")

    # -- config -------------------------------------------------------------------------------
    def write_config(self, config: Any) -> None:
        """Write config.json atomically (a mapping, dataclass or pydantic model)."""
        data = plain_config(config)
        self.storage.write_atomic(CONFIG_FILE, json.dumps(data, indent=2, sort_keys=True).encode())

    def read_config(self) -> dict[str, Any] | None:
        """The run's config.json (None when none was written)."""
        try:
            return JsonObject.parse(self.storage.read_bytes(CONFIG_FILE), name=CONFIG_FILE).raw
        except FileNotFoundError:
            return None

    # -- checkpoints --------------------------------------------------------------------------
    def save(
        self, step: int, state_dict: Mapping[str, Any], metrics: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> CheckpointInfo:
        """Save a checkpoint (store retention applies), then repoint ``best``."""
        info = self.store.save(step, state_dict, metrics, **kwargs)
        self.update_best()
        return info

    def load(self, step: Selector = "latest", **kwargs: Any) -> dict[str, Any]:
        """Load a checkpoint of the run (``latest`` by default)."""
        return self.store.load(step, **kwargs)

    def update_best(self) -> int | None:
        """Point ``best`` at the best committed checkpoint by the run's metric; returns its step.

        Without a metric, or with no ranked checkpoint, the pointer is removed.
        """
        best = self.store.best()  # None without a metric
        if best is None:
            self._remove_pointer()
            return None
        target = step_dir(best.step)
        if self.storage.is_local:
            root = self.storage.full_path("")
            tmp = os.path.join(root, temp_name(BEST_POINTER))
            os.symlink(target, tmp)
            try:
                os.replace(tmp, os.path.join(root, BEST_POINTER))
            except OSError:
                os.unlink(tmp)
                raise
            self.storage.fsync_dir("")
        else:
            pointer = {"step": best.step, "path": target, "uri": best.uri, "metrics": best.metrics}
            self.storage.write_atomic(BEST_POINTER, json.dumps(pointer, indent=2).encode())
        logger.info("best of %s -> step %d", self.run_id, best.step)
        return best.step

    def _remove_pointer(self) -> None:
        if self.storage.is_local:
            try:
                os.unlink(self.storage.full_path(BEST_POINTER))
            except FileNotFoundError:
                pass
        else:
            self.storage.rm(BEST_POINTER, missing_ok=True)

    def best_step(self) -> int | None:
        """The step ``best`` points at, if that checkpoint is still committed (else None)."""
        try:
            if self.storage.is_local:
                target = os.readlink(self.storage.full_path(BEST_POINTER))
            else:
                target = JsonObject.parse(self.storage.read_bytes(BEST_POINTER), name=BEST_POINTER).str("path")
        except (FileNotFoundError, OSError, CorruptCheckpointError):
            return None
        step = parse_step_dir(target.rstrip("/").rsplit("/", 1)[-1])
        if step is None or not self.storage.exists(f"{step_dir(step)}/{MARKER_FILE}"):
            return None
        return step

    def best_path(self) -> str | None:
        """The best checkpoint's directory: the ``best`` link's path on local disk, its URI elsewhere."""
        step = self.best_step()
        if step is None:
            return None
        if self.storage.is_local:
            return self.storage.full_path(BEST_POINTER)
        return self.store.step_uri(step)

    def load_best(self, **kwargs: Any) -> dict[str, Any]:
        """Load the checkpoint ``best`` points at."""
        step = self.best_step()
        if step is None:
            raise CheckpointNotFoundError(f"run {self.run_id!r} has no best checkpoint")
        return self.store.load(step, **kwargs)
