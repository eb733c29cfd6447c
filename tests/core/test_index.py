"""CheckpointIndex: latest/best/top-k (ties, unrankable metrics), updates, Parquet snapshots."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_ckpt import CheckpointIndex, CheckpointInfo
from ray_ckpt.core.index import IndexFeed, IndexReplica, new_epoch, position_reached, rankable


def info(step: int, **metrics: float) -> CheckpointInfo:
    return CheckpointInfo(step=step, uri=f"file:///r/checkpoints/step_{step:09d}", metrics=dict(metrics))


def steps(records: list[CheckpointInfo]) -> list[int]:
    return [r.step for r in records]


def make(*records: CheckpointInfo, metric: str | None = "loss", mode: str = "min") -> CheckpointIndex:
    index = CheckpointIndex(metric, mode)
    index.extend(records)
    return index


def test_empty() -> None:
    index = CheckpointIndex("loss")
    assert len(index) == 0
    assert index.latest() is None
    assert index.best() is None
    assert index.top_k(3) == []
    assert index.list() == [] and index.steps() == []


def test_latest_is_highest_step_not_last_added() -> None:
    index = make(info(5), info(1), info(10), info(3))
    assert index.latest().step == 10
    assert index.steps() == [1, 3, 5, 10]
    assert steps(index.list()) == [1, 3, 5, 10]
    assert 5 in index and 4 not in index
    assert index.get(3).step == 3 and index.get(4) is None


def test_top_k_min_and_max() -> None:
    index = make(info(1, loss=0.5, acc=0.1), info(2, loss=0.2, acc=0.9), info(3, loss=0.9, acc=0.5), info(4, loss=0.1))
    assert steps(index.top_k(2)) == [4, 2]
    assert index.best().step == 4
    assert steps(index.top_k(10)) == [4, 2, 1, 3]
    assert steps(index.top_k(2, metric="acc", mode="max")) == [2, 3]
    assert steps(index.top_k(5, metric="acc", mode="min")) == [1, 3, 2]  # step 4 has no acc
    assert index.best("acc", "max").step == 2
    assert index.top_k(0) == [] and index.top_k(-1) == []


def test_run_mode_max() -> None:
    index = make(info(1, score=1.0), info(2, score=3.0), info(3, score=2.0), metric="score", mode="max")
    assert steps(index.top_k(3)) == [2, 3, 1]


def test_ties_go_to_the_newer_step() -> None:
    index = make(info(1, loss=0.5), info(7, loss=0.5), info(3, loss=0.5), info(4, loss=0.7))
    assert steps(index.top_k(4)) == [7, 3, 1, 4]
    index_max = make(info(1, loss=0.5), info(7, loss=0.5), info(3, loss=0.5), mode="max")
    assert steps(index_max.top_k(2)) == [7, 3]


def test_negative_zero_ties_with_zero() -> None:
    index = make(info(1, loss=0.0), info(2, loss=-0.0))
    assert steps(index.top_k(2)) == [2, 1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_unrankable_metrics_are_never_ranked(bad: float) -> None:
    index = make(info(1, loss=0.3), info(2, loss=bad), info(3), info(4, other=0.0), info(5, loss=0.4))
    for mode in ("min", "max"):
        assert steps(index.top_k(10, mode=mode)) == ([1, 5] if mode == "min" else [5, 1])
    assert index.latest().step == 5
    only_bad = make(info(1, loss=bad), info(2))
    assert only_bad.best() is None and only_bad.top_k(3) == []


def test_rankable() -> None:
    assert rankable(1) == 1.0 and rankable(0.5) == 0.5
    for value in (None, float("nan"), float("inf"), -float("inf"), True, "0.1", [1]):
        assert rankable(value) is None
    assert info(1, loss=float("nan")).metric("loss") is None
    assert info(1).metric("loss") is None
    assert info(1, loss=2).metric("loss") == 2.0


def test_no_metric_or_bad_mode() -> None:
    index = make(info(1, loss=1.0), metric=None)
    with pytest.raises(ValueError, match="metric"):
        index.top_k(1)
    assert steps(index.top_k(1, metric="loss")) == [1]
    with pytest.raises(ValueError, match="mode"):
        index.top_k(1, metric="loss", mode="best")


def test_add_remove_keep_rankings_right() -> None:
    index = make(info(1, loss=0.5), info(2, loss=0.4), info(3, loss=0.3))
    assert steps(index.top_k(2)) == [3, 2]  # builds the (loss, min) ranking
    assert steps(index.top_k(2, mode="max")) == [1, 2]  # and (loss, max)
    index.add(info(4, loss=0.1))
    assert steps(index.top_k(2)) == [4, 3]
    assert steps(index.top_k(2, mode="max")) == [1, 2]
    assert index.remove(4).step == 4
    assert index.remove(4) is None
    assert steps(index.top_k(2)) == [3, 2]
    # replacing a record (same step, new metrics) drops its old ranking entry
    index.add(info(3, loss=0.9))
    assert steps(index.top_k(3)) == [2, 1, 3]
    assert steps(index.top_k(3, mode="max")) == [3, 1, 2]
    index.add(info(2, loss=float("nan")))
    assert steps(index.top_k(3)) == [1, 3]
    assert len(index) == 3
    index.clear()
    assert len(index) == 0 and index.top_k(3) == [] and index.latest() is None


def test_update_metrics() -> None:
    index = make(info(1, loss=0.5), info(2, loss=0.4), info(3))
    assert steps(index.top_k(3)) == [2, 1]
    assert steps(index.top_k(3, metric="eval", mode="max")) == []
    updated = index.update_metrics(3, {"loss": 0.1, "eval": 7.0})
    assert updated.metrics == {"loss": 0.1, "eval": 7.0}
    assert steps(index.top_k(3)) == [3, 2, 1]
    assert steps(index.top_k(3, metric="eval", mode="max")) == [3]
    index.update_metrics(1, {"eval": 9.0})
    assert index.get(1).metrics == {"loss": 0.5, "eval": 9.0}
    assert steps(index.top_k(3, metric="eval", mode="max")) == [1, 3]
    index.update_metrics(3, {"loss": float("nan")})
    assert steps(index.top_k(3)) == [2, 1]
    with pytest.raises(KeyError):
        index.update_metrics(99, {"loss": 1.0})


def test_parquet_snapshot_roundtrip() -> None:
    records = [
        CheckpointInfo(
            step=s,
            uri=f"s3://b/run/checkpoints/step_{s:09d}",
            metrics={"loss": 1.0 / (s + 1), "nan": float("nan"), "inf": float("inf")} if s % 2 else {},
            created=1_700_000_000.5 + s,
            total_size=s * 1000,
            files_size=s * 1100 + 7,
            world_size=1 + s % 4,
            metadata={"git": "abc", "n": s, "nested": {"x": [1, 2]}},
            durability=["local", "remote"] if s % 3 == 0 else ["local"],
        )
        for s in (0, 1, 2, 5, 100, 2**40)
    ]
    index = make(*records)
    again = CheckpointIndex.records_from_parquet_bytes(index.to_parquet_bytes())
    assert [r.step for r in again] == [r.step for r in records]
    for a, b in zip(records, again, strict=True):
        for name in ("step", "uri", "created", "total_size", "files_size", "world_size", "metadata", "durability"):
            assert getattr(a, name) == getattr(b, name), name
        assert a.metrics.keys() == b.metrics.keys()
        for key, value in a.metrics.items():
            assert (math.isnan(value) and math.isnan(b.metrics[key])) or value == b.metrics[key]
    table = index.to_table()
    assert table.num_rows == len(records)
    assert {"step", "uri", "metrics", "created", "world_size"} <= set(table.column_names)
    rebuilt = make(*again)
    assert steps(rebuilt.top_k(10)) == steps(index.top_k(10))


def test_empty_snapshot_roundtrip() -> None:
    assert CheckpointIndex.records_from_parquet_bytes(CheckpointIndex().to_parquet_bytes()) == []


def test_info_dict_roundtrip_ignores_unknown_fields() -> None:
    record = info(3, loss=1.0)
    data = {**record.to_dict(), "future_field": 1}
    assert CheckpointInfo.from_dict(data) == record


def test_top_k_over_100k_records() -> None:
    rng = random.Random(0)
    values = {s: rng.random() for s in range(100_000)}
    for s in range(0, 100_000, 97):
        values[s] = float("nan")
    index = CheckpointIndex("loss", "min")
    index.extend(info(s, loss=v) for s, v in values.items())
    expected = sorted((v, -s) for s, v in values.items() if not math.isnan(v))
    assert steps(index.top_k(10)) == [-neg for _, neg in expected[:10]]
    assert index.latest().step == 99_999
    # keep ranking right while records change
    for s in range(50):
        index.remove(-expected[s][1])
    index.add(info(200_000, loss=-1.0))
    assert steps(index.top_k(3)) == [200_000, -expected[50][1], -expected[51][1]]
    assert len(index) == 100_000 - 50 + 1


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "remove", "update"]),
            st.integers(0, 15),
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)),
        ),
        max_size=40,
    ),
    k=st.integers(0, 6),
    mode=st.sampled_from(["min", "max"]),
)
def test_top_k_matches_a_full_sort(ops: list, k: int, mode: str) -> None:
    """After any sequence of add/remove/update, top_k equals sorting every record from scratch."""
    index = CheckpointIndex("m", mode)
    model: dict[int, dict[str, float]] = {}
    index.top_k(1)  # build the ranking early so that it must be maintained incrementally
    for op, step, value in ops:
        metrics = {} if value is None else {"m": value}
        if op == "add":
            index.add(info(step, **metrics))
            model[step] = metrics
        elif op == "remove":
            index.remove(step)
            model.pop(step, None)
        elif step in model:
            index.update_metrics(step, metrics)
            model[step] = {**model[step], **metrics}
    sign = 1 if mode == "min" else -1
    ranked = sorted((sign * float(m["m"]), -s) for s, m in model.items() if "m" in m and math.isfinite(float(m["m"])))
    assert steps(index.top_k(k)) == [-neg for _, neg in ranked[:k]]
    assert index.steps() == sorted(model)
    assert (index.latest().step if model else None) == (max(model) if model else None)


# -- IndexFeed / IndexReplica: followers keep a copy by deltas ---------------------------------
def feed_of(*records: CheckpointInfo, history: int = 100) -> IndexFeed:
    index = CheckpointIndex("loss", "min")
    index.extend(records)
    return IndexFeed(index, history=history)


def same(replica: IndexReplica, feed: IndexFeed) -> bool:
    return replica.index.list() == feed.index.list() and replica.version == feed.version


def test_new_follower_gets_every_record_then_only_changes() -> None:
    feed = feed_of(info(1, loss=3.0), info(2, loss=2.0))
    replica = IndexReplica("loss", "min")
    first = feed.changes_since(replica.epoch, replica.version)
    assert first.reset and steps(first.upserts) == [1, 2]
    assert replica.apply(first) and same(replica, feed)
    feed.add(info(3, loss=1.0))
    feed.update_metrics(1, {"loss": 0.5})
    feed.remove(2)
    feed.update_metrics(1, {"loss": 0.25})  # changed twice: sent once, as it is now
    delta = feed.changes_since(replica.epoch, replica.version)
    assert not delta.reset
    assert steps(delta.upserts) == [1, 3] and delta.removed == [2]
    assert delta.upserts[0].metrics == {"loss": 0.25}
    assert replica.apply(delta) and same(replica, feed)
    assert steps(replica.index.top_k(2)) == [1, 3]
    assert feed.changes_since(replica.epoch, replica.version).upserts == []


def test_follower_behind_the_history_or_of_another_epoch_gets_a_reset() -> None:
    feed = feed_of(info(1, loss=1.0), history=3)
    replica = IndexReplica("loss", "min")
    replica.apply(feed.changes_since(None, -1))
    for step in range(2, 8):
        feed.add(info(step, loss=float(step)))
    delta = feed.changes_since(replica.epoch, replica.version)
    assert delta.reset and steps(delta.upserts) == list(range(1, 8))
    assert replica.apply(delta) and same(replica, feed)
    feed.reset([info(10, loss=0.1)])  # re-read from storage: a new epoch, versions start over
    delta = feed.changes_since(replica.epoch, replica.version)
    assert delta.reset and replica.apply(delta)
    assert steps(replica.index.list()) == [10] and replica.epoch == feed.epoch


def test_stale_and_out_of_order_deltas_are_ignored_or_refused() -> None:
    feed = feed_of(info(1, loss=1.0))
    replica = IndexReplica("loss", "min")
    replica.apply(feed.changes_since(None, -1))
    base = replica.version
    feed.add(info(2, loss=2.0))
    older = feed.changes_since(replica.epoch, base)
    feed.add(info(3, loss=3.0))
    newer = feed.changes_since(replica.epoch, base)
    assert replica.apply(newer)
    assert not replica.apply(older)  # a slower poll answered after a newer one: nothing changes
    assert same(replica, feed)
    feed.add(info(4, loss=4.0))
    gap = feed.changes_since(feed.epoch, feed.version - 1)  # based on a version the replica never had
    other = IndexReplica("loss", "min")
    other.apply(feed_of().changes_since(None, -1))
    other.epoch, other.version = feed.epoch, 0
    with pytest.raises(ValueError, match="cannot apply"):
        other.apply(gap)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "remove", "score", "sync"]), st.integers(1, 12), st.floats(-5, 5)),
        max_size=60,
    ),
    st.integers(1, 8),
)
def test_replica_matches_the_feed_after_any_changes(ops: list[tuple[str, int, float]], history: int) -> None:
    feed = feed_of(history=history)
    replica = IndexReplica("loss", "min")
    for op, step, value in ops:
        if op == "add":
            feed.add(info(step, loss=value))
        elif op == "remove":
            feed.remove(step)
        elif op == "score" and step in feed.index:
            feed.update_metrics(step, {"loss": value})
        elif op == "sync":
            replica.apply(feed.changes_since(replica.epoch, replica.version))
    replica.apply(feed.changes_since(replica.epoch, replica.version))
    assert same(replica, feed)
    assert replica.index.top_k(5) == feed.index.top_k(5)


def test_position_reached_orders_epochs_then_versions() -> None:
    old, new = new_epoch(), new_epoch()
    assert old < new
    assert position_reached((old, 5), (old, 5)) and position_reached((old, 6), (old, 5))
    assert not position_reached((old, 4), (old, 5))
    assert position_reached((new, 0), (old, 99))  # a restarted master read everything from storage
    assert not position_reached((old, 99), (new, 0)) and not position_reached((None, -1), (old, 0))


def test_snapshot_file_metadata_round_trips() -> None:
    index = CheckpointIndex("loss", "min")
    index.add(CheckpointInfo(step=1, uri="u", metrics={"loss": 1.0}, metadata={"k": "v"}))
    records, metadata = CheckpointIndex.read_parquet_bytes(index.to_parquet_bytes({"ray_ckpt.folded": '["a"]'}))
    assert metadata == {"ray_ckpt.folded": '["a"]'} and records[0].metadata == {"k": "v"}
