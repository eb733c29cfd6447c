"""ray-ckpt: checkpointing for distributed training on Ray.

Sharded safetensors with atomic commits, retention and a top-k index, on local disks or S3.
"""

from __future__ import annotations

from ray_ckpt.core.errors import (
    ArchitectureNotAllowedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    RayCkptError,
    SaveAbortedError,
    StorageError,
)

__version__ = "0.1.0"

# Every other name is imported on first use: the store works without importing Ray, and a
# process that never touches a tensor (``ray-ckpt --help``, ``ray-ckpt ls``) never imports torch.
_LAZY = {
    "Architecture": "ray_ckpt.core.architecture",
    "CheckpointArtifact": "ray_ckpt.interop.artifact",
    "load_from_uri": "ray_ckpt.interop.artifact",
    "PendingCheckpoint": "ray_ckpt.core.byo",
    "CheckpointConfig": "ray_ckpt.core.config",
    "CheckpointIndex": "ray_ckpt.core.index",
    "CheckpointInfo": "ray_ckpt.core.index",
    "CheckpointManager": "ray_ckpt.adapters.manager",
    "initialize_run_dir": "ray_ckpt.adapters.manager",
    "load_checkpoint": "ray_ckpt.adapters.oneshot",
    "load_metadata": "ray_ckpt.adapters.oneshot",
    "save_checkpoint": "ray_ckpt.adapters.oneshot",
    "RunDir": "ray_ckpt.adapters.rundir",
    "RunStore": "ray_ckpt.core.runstore",
    "Shard": "ray_ckpt.core.shard",
    "CheckpointStore": "ray_ckpt.core.store",
    "TieredCheckpointStore": "ray_ckpt.tiers.tiered",
    "UploadError": "ray_ckpt.tiers.tiered",
    "key_and_version": "ray_ckpt.core.uri",
    "normalize_uri": "ray_ckpt.core.uri",
    "StepWriter": "ray_ckpt.core.writer",
    "start_checkpointer": "ray_ckpt.distributed.handle",
    "get_checkpointer": "ray_ckpt.distributed.handle",
    "CheckpointerHandle": "ray_ckpt.distributed.handle",
    "WorkerClient": "ray_ckpt.distributed.worker",
    "SaveFuture": "ray_ckpt.distributed.worker",
    "EvalClient": "ray_ckpt.distributed.eval",
    "Lease": "ray_ckpt.distributed.eval",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'ray_ckpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ArchitectureNotAllowedError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptCheckpointError",
    "RayCkptError",
    "SaveAbortedError",
    "StorageError",
    "__version__",
    *_LAZY,
]
