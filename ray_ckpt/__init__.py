"""ray-ckpt: checkpointing for distributed training on Ray.

Sharded safetensors with atomic commits, retention and a top-k index, on local disks or S3.
"""

from __future__ import annotations

from ray_ckpt.architecture import Architecture
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
from ray_ckpt.store import CheckpointStore, StepWriter

__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "ArchitectureNotAllowedError",
    "CheckpointConfig",
    "CheckpointExistsError",
    "CheckpointIndex",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "ConfigError",
    "CorruptCheckpointError",
    "RayCkptError",
    "SaveAbortedError",
    "StepWriter",
    "StorageError",
    "__version__",
]
