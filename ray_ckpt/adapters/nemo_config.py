"""NeMo RL's names for ray-ckpt's config fields: ``checkpoint_dir``, ``save_period``, ``higher_is_better``.

Importing this module registers them (:func:`ray_ckpt.core.config.register_aliases`), so a NeMo RL
checkpointing section builds a :class:`~ray_ckpt.core.config.CheckpointConfig` as it is;
``import ray_ckpt`` and :mod:`ray_ckpt.adapters.nemo` do. Errors name the NeMo key
(``save_interval_steps: ... (given as save_period)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray_ckpt.core.config import FieldAliases, register_aliases

# NeMo RL's key -> the field it sets as it is
RENAMED = {
    "checkpoint_dir": "storage_uri",
    "save_period": "save_interval_steps",
}
HIGHER_IS_BETTER = "higher_is_better"  # NeMo RL's boolean spelling of ``mode``


class NeMoAliases(FieldAliases):
    """NeMo RL's checkpointing keys (flat keys only)."""

    framework = "NeMo RL"
    keys = (*RENAMED, HIGHER_IS_BETTER)

    def translate(self, key: str, value: Any, data: Mapping[str, Any]) -> list[tuple[str, Any]] | str:
        if key != HIGHER_IS_BETTER:
            return [(RENAMED[key], value)]
        if not isinstance(value, bool):
            return f"must be a bool, got {value!r}"
        return [("mode", "max" if value else "min")]

    def targets(self, key: str) -> set[str]:
        return {"mode"} if key == HIGHER_IS_BETTER else {RENAMED[key]}


NEMO_ALIASES = NeMoAliases()
register_aliases(NEMO_ALIASES)
