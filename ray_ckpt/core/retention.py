"""Retention as policy objects: each says which steps it keeps; a step no policy keeps is deleted.

In the spirit of Orbax's preservation policies: :class:`LatestN`, :class:`EveryNSteps`,
:class:`BestN` (by a metric), :class:`Steps` (leased, not yet uploaded, in flight) and
:class:`AnyOf`, their union. The latest step is always kept. :func:`policy_from_config` builds
the policy a run's config describes; the store applies it (this module does no I/O).
:func:`explain` says why each kept step is kept (the CLI's ``ray-ckpt retention`` prints it).

How these rules compare with Ray Train's ``num_to_keep``, Lightning's ``save_top_k`` and
Orbax's ``max_to_keep``/``keep_period``/``best_fn``: docs/RETENTION.md.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ray_ckpt.core.config import CheckpointConfig
from ray_ckpt.core.index import CheckpointIndex, rankable

logger = logging.getLogger(__name__)


class PreservationPolicy(Protocol):
    """Which committed steps of an index a rule keeps."""

    def keep(self, index: CheckpointIndex) -> set[int]: ...


# Why a step is kept, as :func:`explain` and ``ray-ckpt retention`` name it.
LATEST = "latest"
LAST_N = "last-n"
TOP_K = "top-k"
NO_METRIC = "no-metric"  # BestN with keep_unranked: no finite metric yet
PERIOD = "period"
KEEP_ALL = "no-deleting-rule"
LEASED = "leased"


# Per run index: the (metric, step) pairs already logged as unranked.
_TOLD_UNRANKED: weakref.WeakKeyDictionary[Any, set[tuple[str | None, int]]] = weakref.WeakKeyDictionary()


def _told_unranked(index: Any) -> set[tuple[str | None, int]]:
    try:
        return _TOLD_UNRANKED.setdefault(index, set())
    except TypeError:  # not weakly referenceable: log every time rather than keep it alive
        return set()


@dataclass(frozen=True)
class KeepAll:
    """Keeps every step (a run with neither ``keep_top_k`` nor ``keep_last_n``)."""

    label = KEEP_ALL

    def keep(self, index: CheckpointIndex) -> set[int]:
        return set(index.steps())


@dataclass(frozen=True)
class LatestN:
    """The ``n`` newest steps (Ray's ``num_to_keep`` without a score, Orbax's ``max_to_keep``)."""

    n: int
    label = LAST_N

    def keep(self, index: CheckpointIndex) -> set[int]:
        return set(index.steps()[-self.n :]) if self.n > 0 else set()


@dataclass(frozen=True)
class EveryNSteps:
    """Every step divisible by ``n`` (Orbax's ``keep_period``)."""

    n: int
    label = PERIOD

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
        return set(self.reasons(index))

    def reasons(self, index: CheckpointIndex) -> dict[int, str]:
        """The kept steps, each with why: ``"top-k"``, or ``"no-metric"`` (``keep_unranked``)."""
        kept = {info.step: TOP_K for info in index.top_k(self.n, self.metric, self.mode)}
        unranked = [info.step for info in index.list() if rankable(info.metrics.get(self.metric)) is None]
        if self.keep_unranked:
            kept.update(dict.fromkeys(unranked, NO_METRIC))
        elif unranked:
            told = _told_unranked(index)
            new = [step for step in unranked if (self.metric, step) not in told]
            if new:  # once per step of a run's index, not at every retention run
                told.update((self.metric, step) for step in new)
                logger.debug(  # the usual state of a step waiting for its eval score: not worth an INFO line
                    "retention: steps %s have no finite %r; they are never best and are kept only by the other rules",
                    new,
                    self.metric,
                )
        return kept


@dataclass(frozen=True)
class Steps:
    """These steps, for a reason (``"leased"``, ``"not uploaded"``, ``"in flight"``)."""

    steps: frozenset[int]
    reason: str = ""

    @property
    def label(self) -> str:
        return self.reason or "protected"

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


def policy_from_config(
    config: CheckpointConfig, protected: Iterable[int] = (), *, protected_reason: str = "protected"
) -> PreservationPolicy:
    """The retention a config describes, plus ``protected`` steps (leases and the like).

    With neither ``keep_top_k`` nor ``keep_last_n`` nothing is deleted (``keep_period`` alone
    only marks steps to keep). ``keep_top_k`` needs ``metric_name`` (the config refuses it
    without). ``protected_reason`` names the protection in :func:`explain` (e.g. ``"leased"``).
    """
    if config.keep_top_k is None and config.keep_last_n is None:
        return KeepAll()
    policies: list[PreservationPolicy] = [Steps(frozenset(protected), protected_reason)]
    if config.keep_last_n:
        policies.append(LatestN(config.keep_last_n))
    if config.keep_period:
        policies.append(EveryNSteps(config.keep_period))
    if config.keep_top_k and config.metric_name:
        keep_unranked = bool(config.keep_checkpoints_without_metrics)
        policies.append(BestN(config.keep_top_k, config.metric_name, config.mode, keep_unranked))
    return AnyOf(tuple(policies))


def plan(index: CheckpointIndex, policy: PreservationPolicy) -> tuple[list[int], list[int]]:
    """``(keep, delete)``, oldest first; the latest step is always kept."""
    steps = index.steps()
    if not steps:
        return [], []
    kept = policy.keep(index) | {steps[-1]}
    return [s for s in steps if s in kept], [s for s in steps if s not in kept]


def explain(index: CheckpointIndex, policy: PreservationPolicy) -> tuple[dict[int, list[str]], list[int]]:
    """``(kept, delete)``: every kept step with the rules that keep it, and the doomed steps.

    The reasons are the policies' labels (``"latest"``, ``"last-n"``, ``"top-k"``, ``"period"``,
    ``"no-metric"``, ``"leased"``, ``"no-deleting-rule"``; a policy without a ``label`` is named
    by its class). Both come from the same :meth:`keep` calls :func:`plan` makes, so ``kept``
    lists exactly the steps :func:`plan` keeps.
    """
    steps = index.steps()
    if not steps:
        return {}, []
    why: dict[int, list[str]] = {}
    for step, reason in _reasons(policy, index):
        if reason not in why.setdefault(step, []):
            why[step].append(reason)
    why.setdefault(steps[-1], []).insert(0, LATEST)
    return {s: why[s] for s in steps if s in why}, [s for s in steps if s not in why]


def _reasons(policy: PreservationPolicy, index: CheckpointIndex) -> Iterable[tuple[int, str]]:
    if isinstance(policy, AnyOf):
        for child in policy.policies:
            yield from _reasons(child, index)
        return
    reasons = getattr(policy, "reasons", None)
    if callable(reasons):
        yield from reasons(index).items()
        return
    label = getattr(policy, "label", type(policy).__name__)
    for step in sorted(policy.keep(index)):
        yield step, label
