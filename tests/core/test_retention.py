"""Retention as users of Ray Train, Lightning and Orbax expect it: ported cases, and every difference.

Each table row is one scenario of another library: its options, the metric of each step (None:
the step has no value of the metric), and the steps that library keeps at the end (written from
its documented semantics). The row's options are translated to ray-ckpt's by one function per
library (``ray_options``, ``lightning_options``, ``orbax_options``: the mapping
docs/RETENTION.md states), and the expected steps are checked twice: with the policy objects of
:mod:`ray_ckpt.core.retention` over an in-memory index, and with a :class:`CheckpointStore` that saves
the steps one by one (retention after every commit), on disk and in a fresh reader.

Where our rules differ, a row of ``DIFFERENCES`` gives both results; the test asserts ours, and
docs/RETENTION.md says why (the row's ``why`` is the short version).
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointConfig, CheckpointStore, ConfigError
from ray_ckpt.core.index import CheckpointIndex, CheckpointInfo
from ray_ckpt.core.layout import parse_step_dir
from ray_ckpt.core.retention import (
    AnyOf,
    BestN,
    EveryNSteps,
    LatestN,
    Steps,
    explain,
    plan,
    policy_from_config,
)
from ray_ckpt.interop.artifact import open_run

NAN = float("nan")
METRIC = "loss"
LOSSES = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.2, 5: 0.9, 6: 0.8}  # best (min): 2, 4, 3; (max): 5, 6, 1
Scores = dict[int, float | None]


# ---------------------------------------------------------------------------------------------
# The mappings (docs/RETENTION.md, "How to translate").
# ---------------------------------------------------------------------------------------------
def ray_options(
    num_to_keep: int | None = None, checkpoint_score_attribute: str | None = None, checkpoint_score_order: str = "max"
) -> dict[str, Any]:
    """Ray Train's ``CheckpointConfig`` as ray-ckpt retention options."""
    if num_to_keep is None:
        return {}  # keep everything
    if checkpoint_score_attribute is None:
        return {"keep_last_n": num_to_keep}  # Ray ranks by recency
    return {"metric_name": checkpoint_score_attribute, "mode": checkpoint_score_order, "keep_top_k": num_to_keep}


def lightning_options(
    save_top_k: int = 1, monitor: str | None = None, mode: str = "min", save_last: bool = True
) -> dict[str, Any]:
    """Lightning's ``ModelCheckpoint`` as ray-ckpt retention options (``save_last`` is ours always)."""
    if save_top_k == -1:
        return {}
    if monitor is None or save_top_k == 0:
        return {"keep_last_n": save_top_k}  # Lightning keeps the newest (or only last.ckpt)
    return {"metric_name": monitor, "mode": mode, "keep_top_k": save_top_k}


def orbax_options(
    max_to_keep: int | None = None,
    keep_period: int | None = None,
    best_fn: str | None = None,
    best_mode: str = "max",
    keep_checkpoints_without_metrics: bool = True,
) -> dict[str, Any]:
    """Orbax's ``CheckpointManagerOptions`` as ray-ckpt retention options (``best_fn`` names a metric)."""
    options: dict[str, Any] = {"keep_period": keep_period} if keep_period else {}
    if max_to_keep is None:
        return options
    if best_fn is None:
        return {**options, "keep_last_n": max_to_keep}
    return {
        **options,
        "metric_name": best_fn,
        "mode": best_mode,
        "keep_top_k": max_to_keep,
        "keep_checkpoints_without_metrics": keep_checkpoints_without_metrics,
    }


# ---------------------------------------------------------------------------------------------
# Ported cases: the other library keeps exactly these steps, and so do we.
# ---------------------------------------------------------------------------------------------
RAY_CASES = [
    # id, Ray CheckpointConfig, scores per step, kept
    ("num_to_keep=None keeps all", {}, LOSSES, [1, 2, 3, 4, 5, 6]),
    ("num_to_keep=2 without a score: the 2 newest", {"num_to_keep": 2}, LOSSES, [5, 6]),
    ("num_to_keep=1 without a score: the newest", {"num_to_keep": 1}, LOSSES, [6]),
    (
        "num_to_keep=2 by loss, min: the 2 best and the latest",
        {"num_to_keep": 2, "checkpoint_score_attribute": METRIC, "checkpoint_score_order": "min"},
        LOSSES,
        [2, 4, 6],
    ),
    (
        "num_to_keep=2 by loss, max",
        {"num_to_keep": 2, "checkpoint_score_attribute": METRIC, "checkpoint_score_order": "max"},
        LOSSES,
        [5, 6],
    ),
    (
        "num_to_keep=1: the latest is kept although it ranks last",
        {"num_to_keep": 1, "checkpoint_score_attribute": METRIC, "checkpoint_score_order": "max"},
        {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.1},
        [1, 4],
    ),
    (
        "a NaN score ranks below every number",
        {"num_to_keep": 2, "checkpoint_score_attribute": METRIC, "checkpoint_score_order": "min"},
        {1: 0.3, 2: NAN, 3: 0.1, 4: 0.2, 5: NAN},
        [3, 4, 5],
    ),
]

LIGHTNING_CASES = [
    # id, ModelCheckpoint(...), scores per step, kept (save_last=True: last.ckpt is the latest step)
    ("save_top_k=-1 keeps all", {"save_top_k": -1, "monitor": METRIC}, LOSSES, [1, 2, 3, 4, 5, 6]),
    ("save_top_k=2 by val loss, min, save_last", {"save_top_k": 2, "monitor": METRIC}, LOSSES, [2, 4, 6]),
    ("save_top_k=2, mode=max, save_last", {"save_top_k": 2, "monitor": METRIC, "mode": "max"}, LOSSES, [5, 6]),
    ("save_top_k=0, save_last: only last", {"save_top_k": 0, "monitor": METRIC}, LOSSES, [6]),
    ("monitor=None, save_top_k=1: the latest", {"save_top_k": 1}, LOSSES, [6]),
    ("save_top_k=1: the best and last", {"save_top_k": 1, "monitor": METRIC}, {1: 0.3, 2: 0.1, 3: 0.2}, [2, 3]),
    ("a NaN monitor value counts as the worst", {"save_top_k": 2, "monitor": METRIC}, {1: NAN, 2: 0.3, 3: 0.4}, [2, 3]),
]

ORBAX_CASES = [
    # id, CheckpointManagerOptions(...), metrics per step (None: saved without metrics), kept
    ("max_to_keep=None keeps all", {}, LOSSES, [1, 2, 3, 4, 5, 6]),
    ("max_to_keep=2: the 2 newest", {"max_to_keep": 2}, LOSSES, [5, 6]),
    ("max_to_keep=2, keep_period=2", {"max_to_keep": 2, "keep_period": 2}, {s: 1.0 for s in range(1, 8)}, [2, 4, 6, 7]),
    ("keep_period alone deletes nothing", {"keep_period": 3}, LOSSES, [1, 2, 3, 4, 5, 6]),
    (
        "best_fn=loss, best_mode=min, max_to_keep=2 (the latest ranks)",
        {"max_to_keep": 2, "best_fn": METRIC, "best_mode": "min"},
        {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.2},
        [2, 4],
    ),
    (
        "best_mode=max",
        {"max_to_keep": 2, "best_fn": METRIC, "best_mode": "max"},
        {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.7},
        [2, 4],
    ),
    (
        "keep_checkpoints_without_metrics=True keeps steps without metrics",
        {"max_to_keep": 2, "best_fn": METRIC, "best_mode": "min", "keep_checkpoints_without_metrics": True},
        {1: None, 2: 0.3, 3: None, 4: 0.1, 5: 0.2},
        [1, 3, 4, 5],
    ),
    (
        "keep_checkpoints_without_metrics=False deletes them first",
        {"max_to_keep": 2, "best_fn": METRIC, "best_mode": "min", "keep_checkpoints_without_metrics": False},
        {1: None, 2: 0.3, 3: None, 4: 0.1, 5: 0.2},
        [4, 5],
    ),
    (
        "best_fn with keep_period",
        {"max_to_keep": 1, "keep_period": 4, "best_fn": METRIC, "best_mode": "max"},
        {1: 1.0, 2: 5.0, 3: 2.0, 4: 3.0, 5: 4.0, 6: 0.0, 7: 1.0, 8: 2.0},
        [2, 4, 8],
    ),
]

PORTED = (
    [pytest.param(ray_options(**theirs), scores, kept, id=f"ray: {name}") for name, theirs, scores, kept in RAY_CASES]
    + [
        pytest.param(lightning_options(**theirs), scores, kept, id=f"lightning: {name}")
        for name, theirs, scores, kept in LIGHTNING_CASES
    ]
    + [
        pytest.param(orbax_options(**theirs), scores, kept, id=f"orbax: {name}")
        for name, theirs, scores, kept in ORBAX_CASES
    ]
)


# ---------------------------------------------------------------------------------------------
# Differences: what the other library keeps, what we keep, and why (docs/RETENTION.md).
# ---------------------------------------------------------------------------------------------
DIFFERENCES = [
    # id, our options, scores, theirs kept, ours kept, why
    (
        "ray: num_to_keep is filled with NaN-scored steps; top-k never keeps an unscored step",
        ray_options(2, METRIC, "min"),
        {1: NAN, 2: 0.3},
        [1, 2],
        [2],
        "a step without a finite score is never best: only the other rules keep it",
    ),
    (
        "lightning: save_last=False drops the latest when it does not rank; we always keep the latest",
        lightning_options(1, METRIC, "min", save_last=False),
        {1: 0.1, 2: 0.5},
        [1],
        [1, 2],
        "the latest step is the resume point",
    ),
    (
        "lightning: a tie keeps the older best; ours ranks the newer step first",
        lightning_options(1, METRIC, "min"),
        {1: 0.2, 2: 0.2},
        [1, 2],
        [2],
        "ties go to the newer step (a retrained model with the same score replaces the old one)",
    ),
    (
        "orbax: keep_checkpoints_without_metrics defaults to True; ours to False",
        {
            k: v
            for k, v in orbax_options(2, best_fn=METRIC, best_mode="min").items()
            if k != "keep_checkpoints_without_metrics"
        },
        {1: None, 2: 0.3, 3: None, 4: 0.1, 5: 0.2},
        [1, 3, 4, 5],
        [4, 5],
        "an unscored step is never best; keep_last_n/keep_period/leases keep the ones that matter",
    ),
    (
        "orbax: with best_fn the latest goes when it does not rank; we always keep it",
        orbax_options(1, best_fn=METRIC, best_mode="min"),
        {1: 0.1, 2: 0.5},
        [1],
        [1, 2],
        "the latest step is the resume point",
    ),
    (
        "orbax: without keep_checkpoints_without_metrics, max_to_keep is filled with unscored steps",
        orbax_options(2, best_fn=METRIC, best_mode="min", keep_checkpoints_without_metrics=False),
        {1: None, 2: None, 3: 0.3},
        [2, 3],
        [3],
        "a step without a finite score is never best: only the other rules keep it",
    ),
]


# ---------------------------------------------------------------------------------------------
# The two checks.
# ---------------------------------------------------------------------------------------------
def _index(scores: Scores, metric: str | None) -> CheckpointIndex:
    index = CheckpointIndex(metric, "min")
    for step, value in scores.items():
        metrics = {} if value is None or metric is None else {metric: value}
        index.add(CheckpointInfo(step=step, uri=f"mem://{step}", metrics=metrics))
    return index


def _planned(options: dict[str, Any], scores: Scores, protected: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """The policy objects over an in-memory index: what the rules keep at the end."""
    config = CheckpointConfig(**options)
    keep, delete = plan(_index(scores, config.metric_name or METRIC), policy_from_config(config, protected))
    assert sorted(keep + delete) == sorted(scores)
    return keep


def on_disk(store: CheckpointStore) -> list[int]:
    root = Path(store.storage.local_path("checkpoints"))
    return sorted(s for s in (parse_step_dir(n) for n in os.listdir(root)) if s is not None)


def _saved(tmp_path: Path, options: dict[str, Any], scores: Scores) -> CheckpointStore:
    """A store that saved the steps one by one (retention ran after every commit)."""
    store = CheckpointStore(str(tmp_path / "runs"), run_name="r", **{"metric_name": METRIC, **options})
    for step, value in scores.items():
        store.save(step, {"w": torch.full((2,), float(step))}, metrics={} if value is None else {METRIC: value})
    return store


def _stored(tmp_path: Path, options: dict[str, Any], scores: Scores) -> list[int]:
    store = _saved(tmp_path, options, scores)
    kept = [i.step for i in store.list()]
    assert on_disk(store) == kept
    assert [i.step for i in CheckpointStore(str(tmp_path / "runs"), run_name="r").list()] == kept
    assert store.retention_plan() == (kept, [])  # nothing left that the rules would delete
    return kept


@pytest.mark.parametrize(("options", "scores", "kept"), PORTED)
def test_ported_case(tmp_path: Path, options: dict[str, Any], scores: Scores, kept: list[int]) -> None:
    assert _planned(options, scores) == kept
    assert _stored(tmp_path, options, scores) == kept


@pytest.mark.parametrize(
    ("options", "scores", "theirs", "ours"),
    [pytest.param(o, s, t, u, id=name) for name, o, s, t, u, _ in DIFFERENCES],
)
def test_difference(
    tmp_path: Path, options: dict[str, Any], scores: Scores, theirs: list[int], ours: list[int]
) -> None:
    assert _planned(options, scores) == ours
    assert _stored(tmp_path, options, scores) == ours


def test_every_difference_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "RETENTION.md").read_text()
    for option in (
        "num_to_keep",
        "checkpoint_score_attribute",
        "save_top_k",
        "save_last",
        "every_n_train_steps",
        "max_to_keep",
        "keep_period",
        "best_fn",
        "best_mode",
        "keep_checkpoints_without_metrics",
        "keep_time_interval",
    ):
        assert re.search(rf"`[^`]*\b{option}\b[^`]*`", doc), option
    for name, *_ in DIFFERENCES:
        library = name.split(":")[0]
        assert library.capitalize() in doc or library in doc


# ---------------------------------------------------------------------------------------------
# Configuration: refused where a rule could not mean anything.
# ---------------------------------------------------------------------------------------------
def test_lightning_monitorless_top_k_and_ours_are_both_refused() -> None:
    # Lightning: ModelCheckpoint(monitor=None, save_top_k=2) is a MisconfigurationException.
    with pytest.raises(ConfigError, match=r"^keep_top_k: set without metric_name"):
        CheckpointConfig(keep_top_k=2)
    # Keeping unscored steps qualifies top-k only.
    with pytest.raises(ConfigError, match=r"^keep_checkpoints_without_metrics: True only changes"):
        CheckpointConfig(keep_last_n=2, keep_checkpoints_without_metrics=True)
    assert CheckpointConfig().keep_checkpoints_without_metrics is False  # Orbax's default is True


def test_lightning_every_n_train_steps_is_the_save_schedule(tmp_path: Path) -> None:
    """``every_n_train_steps=2, save_top_k=-1`` saves steps 2, 4, 6: a schedule, not a retention rule."""
    from ray_ckpt import CheckpointManager

    with CheckpointManager(str(tmp_path / "r"), max_to_keep=None, save_interval_steps=2, async_save=False) as mgr:
        saved = [step for step in range(1, 7) if mgr.save(step, {"w": torch.ones(1)})]
        assert saved == [2, 4, 6] and mgr.all_steps() == [2, 4, 6]


# ---------------------------------------------------------------------------------------------
# The policy objects and the reasons.
# ---------------------------------------------------------------------------------------------
def test_policy_objects_compose() -> None:
    index = _index(LOSSES, METRIC)
    policy = AnyOf((LatestN(1), EveryNSteps(3), BestN(1, METRIC, "min"), Steps(frozenset({1}), "leased")))
    assert plan(index, policy) == ([1, 2, 3, 6], [4, 5])
    assert plan(index, AnyOf(())) == ([6], [1, 2, 3, 4, 5])  # the latest, always
    assert plan(CheckpointIndex(METRIC), policy) == ([], [])


def test_explain_names_each_rule() -> None:
    scores: Scores = {1: None, 2: 0.1, 3: 0.4, 4: 0.2, 5: None, 6: 0.9, 7: 0.8}
    config = CheckpointConfig(metric_name=METRIC, keep_top_k=1, keep_last_n=2, keep_period=3)
    kept, delete = explain(_index(scores, METRIC), policy_from_config(config, {4}, protected_reason="leased"))
    assert kept == {2: ["top-k"], 3: ["period"], 4: ["leased"], 6: ["last-n", "period"], 7: ["latest", "last-n"]}
    assert delete == [1, 5]
    unranked = config.replace(keep_checkpoints_without_metrics=True)
    kept, delete = explain(_index(scores, METRIC), policy_from_config(unranked))
    assert kept[1] == ["no-metric"] and kept[5] == ["no-metric"] and delete == [4]
    kept, delete = explain(_index(scores, METRIC), policy_from_config(CheckpointConfig()))
    assert kept[1] == ["no-deleting-rule"] and kept[7] == ["latest", "no-deleting-rule"] and delete == []


# ---------------------------------------------------------------------------------------------
# Retention runs whenever what it keeps changes, not only at the next commit.
# ---------------------------------------------------------------------------------------------
def test_a_late_score_applies_retention(tmp_path: Path) -> None:
    store = _saved(
        tmp_path,
        {"keep_top_k": 1, "mode": "max", "keep_checkpoints_without_metrics": True},
        {1: None, 2: None, 3: None},
    )
    assert on_disk(store) == [1, 2, 3]  # unscored, kept until their scores arrive
    store.report_eval(1, {METRIC: 0.5})
    assert on_disk(store) == [1, 2, 3]  # 1 is the best, 2 and 3 wait for theirs
    store.report_eval(2, {METRIC: 0.7})
    assert on_disk(store) == [2, 3]  # 1 fell out of the top 1 at once
    store.report_eval(3, {METRIC: 0.1})
    assert on_disk(store) == [2, 3]  # 3 is the latest
    reader = CheckpointStore(str(tmp_path / "runs"), run_name="r")
    assert [i.step for i in reader.list()] == [2, 3]
    store.report_eval(3, {METRIC: 0.2}, retain=False)  # the checkpointer retains on its own thread
    assert store.retain_after("a test") == []


def test_a_score_of_a_leased_step_waits_for_the_lease(tmp_path: Path) -> None:
    store = _saved(tmp_path, {"keep_top_k": 1, "mode": "max"}, {1: 0.5, 2: None, 3: 0.1})
    assert on_disk(store) == [1, 3]
    lease = store.acquire_lease(1, ttl_s=600)
    store.report_eval(3, {METRIC: 0.9})  # 1 drops out of the top 1, but it is leased
    assert on_disk(store) == [1, 3]
    store.release_lease(1, lease)
    assert store.retain_after("the end of a lease") == [1]
    assert on_disk(store) == [3] and store.retention_plan() == ([3], [])


def test_an_expired_lease_no_longer_protects(tmp_path: Path) -> None:
    store = _saved(tmp_path, {"keep_last_n": 1}, {1: 0.5})
    store.acquire_lease(1, ttl_s=2.0)  # long enough for the save below on a loaded machine
    store.save(2, {"w": torch.ones(1)})
    assert on_disk(store) == [1, 2]
    deadline = time.monotonic() + 30
    while store.leased_steps() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.retain_after("the expiry of a lease") == [1] and on_disk(store) == [2]


def test_retention_is_cheap_when_nothing_is_doomed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _saved(tmp_path, {"keep_last_n": 2}, {1: 0.5, 2: 0.4})
    listings: list[str] = []
    real = store.leases.records

    def counted() -> Any:
        listings.append("leases")
        return real()

    monkeypatch.setattr(store.leases, "records", counted)
    assert store.retain_after("a score") == [] and listings == []  # planned in memory, no listing
    store.report_eval(2, {METRIC: 0.1})
    assert listings == []


def test_the_recorded_policy_includes_keep_checkpoints_without_metrics(tmp_path: Path) -> None:
    options = {"keep_top_k": 1, "mode": "min", "keep_checkpoints_without_metrics": True}
    _saved(tmp_path, options, {1: 0.3, 2: None, 3: 0.1, 4: None})
    reader = open_run(str(tmp_path / "runs" / "r"))  # a CLI or loader: ranks and keeps as the writer did
    assert reader.config.keep_checkpoints_without_metrics is True and reader.config.keep_top_k == 1
    assert reader.retention_plan() == ([2, 3, 4], [])
    override = open_run(str(tmp_path / "runs" / "r"), keep_last_n=1, keep_top_k=None)
    assert override.config.keep_checkpoints_without_metrics is True  # keep_top_k=None: not an override
    nan_store = _saved(tmp_path / "nan", {"keep_top_k": 1}, {1: 0.3, 2: NAN, 3: math.inf})
    assert [i.step for i in nan_store.list()] == [1, 3]  # NaN and inf never rank: only the latest rule
