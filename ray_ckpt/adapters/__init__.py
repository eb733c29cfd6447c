"""Adapters: the checkpoint APIs trainers call today, over the one ray-ckpt store.

An Orbax-style :class:`~ray_ckpt.adapters.manager.CheckpointManager`, one-shot
``save_checkpoint``/``load_checkpoint``, run directories (:mod:`ray_ckpt.adapters.rundir`),
NeMo RL's :class:`~ray_ckpt.adapters.nemo.NeMoCheckpointManager` and Metta's
:class:`~ray_ckpt.adapters.metta.MettaCheckpointManager`. They translate names only: same
format, commit protocol and retention as :class:`~ray_ckpt.core.store.CheckpointStore`.
"""

from __future__ import annotations

_LAZY = {
    "MettaCheckpointManager": ("ray_ckpt.adapters.metta", "MettaCheckpointManager"),
    "NeMoCheckpointManager": ("ray_ckpt.adapters.nemo", "NeMoCheckpointManager"),
    "config_from_nemo": ("ray_ckpt.adapters.nemo", "config_from_nemo"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ray_ckpt.adapters' has no attribute {name!r}")


__all__ = list(_LAZY)
