"""Retention as policy objects: each says which steps it keeps; a step no policy keeps is deleted.

In the spirit of Orbax's preservation policies: :class:`LatestN`, :class:`EveryNSteps`,
:class:`BestN` (by a metric), :class:`Steps` (leased, not yet uploaded, in flight) and
:class:`AnyOf`, their union. The latest step is always kept. :func:`policy_from_config` builds
the policy a run's config describes; the store applies it (this module does no I/O).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ray_ckpt.config import CheckpointConfig
from ray_ckpt.index import CheckpointIndex, rankable

logger = logging.getLogger(__name__)


class PreservationPolicy(Protocol):
    """Which committed steps of an index a rule keeps."""

    def keep(self, index: CheckpointIndex) -> set[int]: ...


@dataclass(frozen=True)
class KeepAll:
    """Keeps every step (a run with neither ``keep_top_k`` nor ``keep_last_n``)."""

    def keep(self, index: CheckpointIndex) -> set[int]:
        return set(index.steps())


@dataclass(frozen=True)
class LatestN:
    """The ``n`` newest steps (Ray's ``num_to_keep`` without a score, Orbax's ``max_to_keep``)."""

    n: int

    def keep(self, index: CheckpointIndex) -> set[int]:
        return set(index.steps()[-self.n :]) if self.n > 0 else set()


@dataclass(frozen=True)
class EveryNSteps:
    """Every step divisible by ``n`` (Orbax's ``keep_period``)."""

    n: int

    def keep(self, index: CheckpointIndex) -> set[int]:
        return {s for s in index.steps() if s % self.n == 0}


@dataclass(frozen=True)
class BestN:
    """The ``n`` best steps by a finite ``metric`` (NaN, inf and missing never rank).

    ``keep_unranked`` also keeps every step without a finite value of the metric (Orbax's
    ``keep_checkpoints_without_metrics``): a step whose score has not arrived yet survives.
    """

    n: int
    metric: str
    mode: str
    keep_unranked: bool = False

    def keep(self, index: CheckpointIndex) -> set[int]:
        kept = {info.step for info in index.top_k(self.n, self.metric, self.mode)}
        unranked = [info.step for info in index.list() if rankable(info.metrics.get(self.metric)) is None]
        if self.keep_unranked:
            kept.update(unranked)
        elif unranked:
            logger.info(
                "retention: steps %s have no finite %r; they are never best and are kept only by the other rules",
                unranked,
                self.metric,
            )
        return kept


@dataclass(frozen=True)
class Steps:
    """These steps, for a reason (``"leased"``, ``"not uploaded"``, ``"in flight"``)."""

    steps: frozenset[int]
    reason: str = ""

    def keep(self, index: CheckpointIndex) -> set[int]:
        return {s for s in self.steps if s in index}


@dataclass(frozen=True)
class AnyOf:
    """The union: a step is kept when any policy keeps it."""

    policies: tuple[PreservationPolicy, ...]

    def keep(self, index: CheckpointIndex) -> set[int]:
        kept: set[int] = set()
        for policy in self.policies:
            kept |= policy.keep(index)
        return kept


def policy_from_config(config: CheckpointConfig, protected: Iterable[int] = ()) -> PreservationPolicy:
    """The retention a config describes, plus ``protected`` steps (leases and the like).

    With neither ``keep_top_k`` nor ``keep_last_n`` nothing is deleted (``keep_period`` alone
    only marks steps to keep). ``keep_top_k`` needs ``metric_name`` (the config refuses it without).
    """
    if config.keep_top_k is None and config.keep_last_n is None:
        return KeepAll()
    policies: list[PreservationPolicy] = [Steps(frozenset(protected), "protected")]
    if config.keep_last_n:
        policies.append(LatestN(config.keep_last_n))
    if config.keep_period:
        policies.append(EveryNSteps(config.keep_period))
    if config.keep_top_k and config.metric_name:
        keep_unranked = bool(getattr(config, "keep_checkpoints_without_metrics", False))
        policies.append(BestN(config.keep_top_k, config.metric_name, config.mode, keep_unranked))
    return AnyOf(tuple(policies))


def plan(index: CheckpointIndex, policy: PreservationPolicy) -> tuple[list[int], list[int]]:
    """``(keep, delete)``, oldest first; the latest step is always kept."""
    steps = index.steps()
    if not steps:
        return [], []
    kept = policy.keep(index) | {steps[-1]}
    return [s for s in steps if s in kept], [s for s in steps if s not in kept]
