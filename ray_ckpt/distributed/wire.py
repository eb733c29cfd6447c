"""What ranks and the checkpointer send each other: a rank's report and its result, and their checks.

Plain dataclasses (and the planner's :class:`~ray_ckpt.core.planner.RankState` /
:class:`~ray_ckpt.core.planner.TensorMeta` they carry) so that a worker builds them without the
actor's code, and the actor checks what arrived before it trusts any of it: a report's
descriptions against its metrics and, in gather mode, against the bytes sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from ray_ckpt.core.format.digests import FileDigest
from ray_ckpt.core.layout import validate_metrics
from ray_ckpt.core.planner import RankState as RankState  # re-exported: part of a rank's report
from ray_ckpt.core.planner import TensorMeta as TensorMeta  # re-exported: part of a rank's report
from ray_ckpt.core.planner import check_rank_state


@dataclass
class RankReport:
    """What one rank sends to join a step: its descriptions, metrics and (gather mode) its bytes."""

    rank: int
    world_size: int
    model: RankState
    trainer: RankState | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    # Gather mode: [ref] of {key: uint8 numpy view}; refs are wrapped in lists so Ray passes
    # them through unresolved and the actor fetches them on its own schedule.
    model_ref: list[ray.ObjectRef] | None = None
    trainer_ref: list[ray.ObjectRef] | None = None


@dataclass
class RankResult:
    """What one rank reports once it has written its share of a direct-mode plan."""

    rank: int
    # the files it streamed, and its part (the digests of its chunks) of each shared file it wrote into
    files: dict[str, FileDigest] = field(default_factory=dict)
    digests: dict[tuple[str, str], str] = field(default_factory=dict)  # xxh3 of its replicated chunks
    # The chunks the plan has it send to the master (files the master writes): [ref] per part.
    model_ref: list[ray.ObjectRef] | None = None
    trainer_ref: list[ray.ObjectRef] | None = None


def check_rank_bytes(state: RankState, arrays: Any, what: str, keys: Any = None) -> None:
    """ValueError naming the key unless ``arrays`` holds each (or each of ``keys``) tensor's declared bytes.

    ``arrays`` is what the rank put into the object store: ``{key: uint8 numpy array}``.
    """
    if not isinstance(arrays, dict):
        raise ValueError(f"{what}: the bytes sent are a {type(arrays).__name__}, not a dict of arrays")
    for key in state.tensors if keys is None else keys:
        meta = state.tensors[key]
        data = arrays.get(key)
        if not isinstance(data, np.ndarray):
            sent = "no bytes were sent" if data is None else f"a {type(data).__name__} was sent, not an array"
            raise ValueError(f"{what}: key {key!r}: {sent}")
        if data.nbytes != meta.nbytes:
            raise ValueError(
                f"{what}: key {key!r}: {data.nbytes} bytes were sent for {meta.dtype}{list(meta.shape)} "
                f"({meta.nbytes} bytes)"
            )


def check_rank_report(report: RankReport) -> None:
    """ValueError naming the key (or metric) when a rank's report cannot be committed as sent.

    Checks the model and trainer descriptions (:func:`~ray_ckpt.core.planner.check_rank_state`) and the
    metrics, which are replaced by their float values (numpy and torch scalars included).
    """
    check_rank_state(report.model, "model")
    if report.trainer is not None:
        check_rank_state(report.trainer, "trainer_state")
    try:
        report.metrics = validate_metrics(report.metrics, what="metrics")
    except TypeError as exc:
        raise ValueError(str(exc)) from None
