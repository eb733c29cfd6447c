"""Ray Train/Tune's ``CheckpointConfig`` names for ray-ckpt's retention fields, meant as Ray means them.

``num_to_keep`` counts the checkpoints ranked by ``checkpoint_score_attribute`` (keep_top_k), or
the newest ones (keep_last_n) when no score attribute is given; a score attribute without any
order ranks by Ray's default order, "max"; ``None`` (Ray's default) sets nothing. Importing this
module registers the names (:func:`ray_ckpt.core.config.register_aliases`), so they are accepted
in any config (``import ray_ckpt`` and :mod:`ray_ckpt.distributed.train_tune` do);
:func:`retention_from_ray` translates a Ray ``CheckpointConfig`` object. Ray is not imported.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from ray_ckpt.core.config import FieldAliases, register_aliases, retention_fields
from ray_ckpt.core.errors import ConfigError

RENAMED = {
    "checkpoint_score_attribute": "metric_name",
    "checkpoint_score_order": "mode",
}
NUM_TO_KEEP = "num_to_keep"
DEFAULT_ORDER = "max"
KEYS = (*RENAMED, NUM_TO_KEEP)


def _ranked(data: Mapping[str, Any]) -> bool:
    """Whether Ray's num_to_keep ranks (a score attribute is given beside it) or keeps the newest."""
    return isinstance(data.get("checkpoint_score_attribute"), str)


class RayAliases(FieldAliases):
    """Ray's retention keys of ``ray.train.CheckpointConfig`` (flat keys only)."""

    framework = "Ray Train/Tune"
    keys = KEYS

    def translate(self, key: str, value: Any, data: Mapping[str, Any]) -> list[tuple[str, Any]] | str:
        if value is None and key != "checkpoint_score_order":
            return []  # Ray's default: no ranking / keep every checkpoint
        if key != NUM_TO_KEEP:
            return [(RENAMED[key], value)]
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            return f"must be None or at least 1, as in Ray's CheckpointConfig, got {value!r}"
        return [("keep_top_k" if _ranked(data) else "keep_last_n", value)]

    def targets(self, key: str) -> set[str]:
        return {"keep_top_k", "keep_last_n"} if key == NUM_TO_KEEP else {RENAMED[key]}

    def implied(self, data: Mapping[str, Any], given: Collection[str]) -> list[tuple[str, Any, str]]:
        if _ranked(data) and "mode" not in given:
            return [("mode", DEFAULT_ORDER, "checkpoint_score_order (Ray's default)")]
        return []


RAY_ALIASES = RayAliases()
register_aliases(RAY_ALIASES)


def retention_from_ray(checkpoint_config: Any) -> dict[str, Any]:
    """ray-ckpt's retention fields (flat) for a Ray ``CheckpointConfig``, with Ray's meaning.

    ``checkpoint_config`` is a ``ray.train.CheckpointConfig`` / ``ray.tune.CheckpointConfig`` (or a
    mapping of its field names): ``num_to_keep=N`` with ``checkpoint_score_attribute=M`` and
    ``checkpoint_score_order=O`` gives ``keep_top_k=N, metric_name=M, mode=O`` (O defaults to
    Ray's "max"); without a score attribute, ``keep_last_n=N``; ``num_to_keep=None`` sets no
    rule (Ray keeps every checkpoint). Use it as ``CheckpointConfig(..., **retention_from_ray(cc))``.
    """
    if isinstance(checkpoint_config, Mapping):
        given = {k: checkpoint_config[k] for k in KEYS if k in checkpoint_config}
        ignored = {"checkpoint_frequency", "checkpoint_at_end"}  # Ray's save schedule, not retention
        unknown = sorted(set(map(str, checkpoint_config)) - set(KEYS) - ignored)
        if unknown:
            known = ", ".join(KEYS)
            raise ConfigError(f"{unknown[0]}: not a Ray CheckpointConfig retention field (known: {known})")
    else:
        given = {k: getattr(checkpoint_config, k) for k in KEYS if hasattr(checkpoint_config, k)}
        if not given:
            raise ConfigError(
                f"checkpoint_config: expected a ray.train.CheckpointConfig or a mapping, got "
                f"{type(checkpoint_config).__name__}"
            )
    if given.get("checkpoint_score_attribute") is None:
        given.pop("checkpoint_score_order", None)  # Ray's order only matters with a score attribute
    return retention_fields(given)
