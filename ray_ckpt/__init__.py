"""ray-ckpt: checkpointing for distributed training on Ray.

Sharded safetensors with atomic commits, retention and a top-k index, on local disks or S3.

The names a user needs, by use case (README "Ways to save" says which to pick):

* one process: :class:`CheckpointStore` (``save``/``save_async``/``load``), with a remote tier
  :class:`TieredCheckpointStore`; :class:`CheckpointConfig`; :class:`Shard` for sharded state;
  :class:`CheckpointInfo` / :class:`CheckpointIndex` for what a run holds;
* on Ray: :func:`start_checkpointer` / :func:`get_checkpointer` (:class:`CheckpointerHandle`),
  :class:`WorkerClient` in training actors (:class:`SaveFuture`), :class:`EvalClient` in
  evaluators (:class:`Lease`);
* the APIs trainers call today: :class:`CheckpointManager` (Orbax-style),
  :class:`NeMoCheckpointManager`, :class:`MettaCheckpointManager`, :class:`RunDir`, and one-shot
  :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`load_metadata`;
* other formats: :func:`load_from_uri` (:class:`CheckpointArtifact`); URIs: :func:`normalize_uri`,
  :func:`key_and_version`;
* the errors, all :class:`RayCkptError`.

Every name but the errors is imported on first use. Resolving one also registers the field names
of other frameworks that :class:`CheckpointConfig` accepts (NeMo RL's ``checkpoint_dir``, Ray
Train's ``num_to_keep``: :mod:`ray_ckpt.adapters.nemo_config`, :mod:`ray_ckpt.distributed.ray_config`).
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
    # config and the store in one process
    "CheckpointConfig": "ray_ckpt.core.config",
    "CheckpointStore": "ray_ckpt.core.store",
    "RunStore": "ray_ckpt.core.runstore",
    "TieredCheckpointStore": "ray_ckpt.tiers.tiered",
    "open_store": "ray_ckpt.tiers.tiered",
    "UploadError": "ray_ckpt.tiers.remote",
    "Shard": "ray_ckpt.core.shard",
    "CheckpointIndex": "ray_ckpt.core.index",
    "CheckpointInfo": "ray_ckpt.core.index",
    "key_and_version": "ray_ckpt.core.uri",
    "normalize_uri": "ray_ckpt.core.uri",
    # on Ray
    "start_checkpointer": "ray_ckpt.distributed.handle",
    "get_checkpointer": "ray_ckpt.distributed.handle",
    "CheckpointerHandle": "ray_ckpt.distributed.handle",
    "WorkerClient": "ray_ckpt.distributed.worker",
    "SaveFuture": "ray_ckpt.distributed.worker",
    "EvalClient": "ray_ckpt.distributed.eval",
    "Lease": "ray_ckpt.distributed.eval",
    # adapters: one name each
    "CheckpointManager": "ray_ckpt.adapters.manager",
    "NeMoCheckpointManager": "ray_ckpt.adapters.nemo",
    "MettaCheckpointManager": "ray_ckpt.adapters.metta",
    "RunDir": "ray_ckpt.adapters.rundir",
    "save_checkpoint": "ray_ckpt.adapters.oneshot",
    "load_checkpoint": "ray_ckpt.adapters.oneshot",
    "load_metadata": "ray_ckpt.adapters.oneshot",
    # other formats
    "CheckpointArtifact": "ray_ckpt.interop.artifact",
    "load_from_uri": "ray_ckpt.interop.artifact",
}
# Modules that register other frameworks' names for config fields when imported.
_CONFIG_ALIASES = ("ray_ckpt.adapters.nemo_config", "ray_ckpt.distributed.ray_config")


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        for module in _CONFIG_ALIASES:
            importlib.import_module(module)
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
