"""ray-ckpt: checkpointing for distributed training on Ray.

Sharded safetensors with atomic commits, retention and a top-k index, on local disks or S3.
"""

from __future__ import annotations

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

__version__ = "0.1.0"

# Every other name is imported on first use: the store works without importing Ray, and a
# process that never touches a tensor (``ray-ckpt --help``, ``ray-ckpt ls``) never imports torch.
_LAZY = {
    "Architecture": "ray_ckpt.architecture",
    "CheckpointArtifact": "ray_ckpt.artifact",
    "load_from_uri": "ray_ckpt.artifact",
    "PendingCheckpoint": "ray_ckpt.byo",
    "CheckpointConfig": "ray_ckpt.config",
    "CheckpointIndex": "ray_ckpt.index",
    "CheckpointInfo": "ray_ckpt.index",
    "CheckpointManager": "ray_ckpt.manager",
    "initialize_run_dir": "ray_ckpt.manager",
    "load_checkpoint": "ray_ckpt.oneshot",
    "load_metadata": "ray_ckpt.oneshot",
    "save_checkpoint": "ray_ckpt.oneshot",
    "RunDir": "ray_ckpt.rundir",
    "RunStore": "ray_ckpt.runstore",
    "Shard": "ray_ckpt.shard",
    "CheckpointStore": "ray_ckpt.store",
    "TieredCheckpointStore": "ray_ckpt.tiered",
    "UploadError": "ray_ckpt.tiered",
    "key_and_version": "ray_ckpt.uri",
    "normalize_uri": "ray_ckpt.uri",
    "StepWriter": "ray_ckpt.writer",
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
