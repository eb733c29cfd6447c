"""Adapters giving trainers the checkpoint APIs they call today, over the one ray-ckpt store.

``ray_ckpt.compat.nemo.NeMoCheckpointManager`` (NeMo RL) and
``ray_ckpt.compat.metta.CheckpointManager`` (Metta). They translate names only: same format,
commit protocol and retention as :class:`~ray_ckpt.store.CheckpointStore`.
"""

from __future__ import annotations

from ray_ckpt.compat.metta import CheckpointManager as MettaCheckpointManager
from ray_ckpt.compat.nemo import NeMoCheckpointManager, config_from_nemo

__all__ = ["MettaCheckpointManager", "NeMoCheckpointManager", "config_from_nemo"]
