"""ray-ckpt: checkpointing for distributed training on Ray.

Sharded safetensors with atomic commits, retention and a top-k index, on local disks or S3.
"""

from __future__ import annotations

from ray_ckpt.architecture import Architecture
from ray_ckpt.artifact import CheckpointArtifact, load_from_uri
from ray_ckpt.byo import PendingCheckpoint
from ray_ckpt.config import CheckpointConfig
from ray_ckpt.errors import (
    ArchitectureNotAllowedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    RayCkptError,
    SaveAbortedError,
    StorageError,
)
from ray_ckpt.index import CheckpointIndex, CheckpointInfo
from ray_ckpt.manager import CheckpointManager, initialize_run_dir
from ray_ckpt.oneshot import load_checkpoint, load_metadata, save_checkpoint
from ray_ckpt.rundir import RunDir
from ray_ckpt.runstore import RunStore
from ray_ckpt.shard import Shard
from ray_ckpt.store import CheckpointStore
from ray_ckpt.tiered import TieredCheckpointStore, UploadError
from ray_ckpt.uri import key_and_version, normalize_uri
from ray_ckpt.writer import StepWriter

__version__ = "0.1.0"

# Ray-facing names are imported on first use, so the store works without importing Ray.
_LAZY = {
    "start_checkpointer": "ray_ckpt.checkpointer",
    "get_checkpointer": "ray_ckpt.checkpointer",
    "CheckpointerHandle": "ray_ckpt.checkpointer",
    "WorkerClient": "ray_ckpt.worker",
    "SaveFuture": "ray_ckpt.worker",
    "EvalClient": "ray_ckpt.eval",
    "Lease": "ray_ckpt.eval",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ray_ckpt' has no attribute {name!r}")


__all__ = [
    "Architecture",
    "ArchitectureNotAllowedError",
    "CheckpointArtifact",
    "CheckpointConfig",
    "CheckpointExistsError",
    "CheckpointIndex",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "ConfigError",
    "CorruptCheckpointError",
    "PendingCheckpoint",
    "RayCkptError",
    "RunDir",
    "RunStore",
    "SaveAbortedError",
    "Shard",
    "StepWriter",
    "StorageError",
    "TieredCheckpointStore",
    "UploadError",
    "__version__",
    "initialize_run_dir",
    "key_and_version",
    "load_checkpoint",
    "load_from_uri",
    "load_metadata",
    "normalize_uri",
    "save_checkpoint",
    *_LAZY,
]
