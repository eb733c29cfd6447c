"""Rank reports the checkpointer cannot read back, sent to the real actor by hand, and eval scores
given as numpy/torch scalars.

A report is what a rank tells the master about its tensors (dtype, shape, byte count per key) plus
the bytes (gather mode: numpy views in the object store) or the files it wrote (direct mode). One
that does not describe its bytes must abort the step, with SaveAbortedError naming the rank and
the key, before anything is committed; the next step commits as usual. Scores reported as numpy or
torch scalars must rank exactly as the store ranks them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig, CheckpointStore, SaveAbortedError
from ray_ckpt.distributed.wire import RankReport, RankResult, RankState, TensorMeta
from tests.reliability.faults import step_dirs, wait_for

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

GOOD_KEY = "w"


def _config(tmp_path: Path, run_name: str, **overrides: Any) -> CheckpointConfig:
    options: dict[str, Any] = {
        "storage_uri": str(tmp_path),
        "run_name": run_name,
        "metric_name": "loss",
        "mode": "min",
        "save_timeout_s": 30.0,
    }
    options.update(overrides)
    return CheckpointConfig(**options)


def _f32(n: int) -> np.ndarray:
    """The uint8 view a rank puts into the object store for an F32[n] tensor."""
    return torch.arange(float(n)).numpy().view(np.uint8).reshape(-1)


def _good_state(rank: int) -> tuple[RankState, dict[str, np.ndarray]]:
    """A valid description and its bytes: a replicated F32[4] plus one F32[2] of the rank's own."""
    own = f"own.{rank}"
    state = RankState({GOOD_KEY: TensorMeta("F32", (4,), 16), own: TensorMeta("F32", (2,), 8)})
    return state, {GOOD_KEY: _f32(4), own: _f32(2)}


# (what, key, description of that key, the bytes sent for it, what the error must say)
BAD_TENSORS: list[tuple[str, Any, TensorMeta, np.ndarray, str]] = [
    ("declared nbytes below numel * itemsize", "bad", TensorMeta("F32", (4,), 8), _f32(2), "declares 8 bytes"),
    ("bytes sent do not match the declaration", "bad", TensorMeta("F32", (4,), 16), _f32(2), "8 bytes were sent"),
    ("negative dimension", "bad", TensorMeta("F32", (-4,), 16), _f32(4), "non-negative"),
    ("dimension not an integer", "bad", TensorMeta("F32", (2.0,), 8), _f32(2), "non-negative integers"),
    ("unknown dtype", "bad", TensorMeta("F33", (4,), 16), _f32(4), "unknown dtype 'F33'"),
    ("key not a string", 3, TensorMeta("F32", (4,), 16), _f32(4), "not a string"),
    ("reserved key", "__metadata__", TensorMeta("F32", (4,), 16), _f32(4), "reserved"),
]


def _bad_state(key: Any, meta: TensorMeta, data: np.ndarray) -> tuple[RankState, dict[Any, np.ndarray]]:
    state, arrays = _good_state(1)
    state.tensors[key] = meta
    arrays[key] = data
    return state, arrays


def _gather_report(rank: int, world_size: int, state: RankState, arrays: dict[Any, np.ndarray]) -> RankReport:
    """What WorkerClient's gather-mode save sends (see worker.py), built by hand."""
    return RankReport(rank=rank, world_size=world_size, model=state, model_ref=[ray.put(arrays)])


def _assert_not_committed(tmp_path: Path, run_name: str, step: int, committed: list[int]) -> None:
    store = CheckpointStore(str(tmp_path), run_name=run_name)
    assert [i.step for i in store.list()] == committed
    run_dir = tmp_path / run_name
    name = f"step_{step:09d}"
    wait_for(lambda: name not in step_dirs(run_dir), 30, f"{name} to be removed after the abort")


def _assert_next_step_commits(tmp_path: Path, run_name: str, step: int, committed: list[int]) -> None:
    worker = ray_ckpt.WorkerClient(run_name, 0, 1)
    info = worker.save(step, {"w": torch.full((4,), float(step))}, metrics={"loss": 1.0}, blocking=True).result(60)
    assert info.step == step
    store = CheckpointStore(str(tmp_path), run_name=run_name)
    assert [i.step for i in store.list()] == [*committed, step]
    assert torch.equal(store.load(step)["w"], torch.full((4,), float(step)))


@pytest.mark.parametrize("what,key,meta,data,says", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_gather_report_that_does_not_fit_its_bytes_aborts_naming_rank_and_key(
    tmp_path: Path, run_name: str, what: str, key: Any, meta: TensorMeta, data: np.ndarray, says: str
) -> None:
    handle = ray_ckpt.start_checkpointer(_config(tmp_path, run_name))
    try:
        state, arrays = _good_state(0)
        good = handle.actor.report.remote(5, _gather_report(0, 2, state, arrays))
        ray.get(good)  # rank 0 is in; the step waits for rank 1
        bad_state, bad_arrays = _bad_state(key, meta, data)
        named = rf"step 5: rank 1's report is invalid: model: key {key!r}"
        committed = handle.actor.wait_committed.remote(5)
        try:
            ray.get(handle.actor.report.remote(5, _gather_report(1, 2, bad_state, bad_arrays)))
        except ray.exceptions.RayTaskError as exc:  # refused on arrival (the description itself)
            with pytest.raises(SaveAbortedError, match=named):
                raise exc.as_instanceof_cause() from None
        # every rank waiting on the step learns why, whether refused on arrival or once fetched
        with pytest.raises(ray.exceptions.RayTaskError) as excinfo:
            ray.get(committed, timeout=60)
        cause = excinfo.value.as_instanceof_cause()
        assert isinstance(cause, SaveAbortedError), cause
        assert f"rank 1's report is invalid: model: key {key!r}" in str(cause) and says in str(cause), str(cause)
        assert "nothing was committed" in str(cause)
        _assert_not_committed(tmp_path, run_name, 5, [])
        assert handle.stats()["pending"] == [] and handle.stats()["queued"] == []
        _assert_next_step_commits(tmp_path, run_name, 6, [])
    finally:
        handle.shutdown()


def test_gather_trainer_state_and_metrics_are_checked_too(tmp_path: Path, run_name: str) -> None:
    handle = ray_ckpt.start_checkpointer(_config(tmp_path, run_name))
    try:
        state, arrays = _good_state(0)
        trainer = RankState({"opt.m": TensorMeta("F32", (4,), 16)})
        report = _gather_report(0, 1, state, arrays)
        report.trainer, report.trainer_ref = trainer, [ray.put({"opt.m": _f32(3)})]  # 12 bytes for 16
        ray.get(handle.actor.report.remote(1, report))
        with pytest.raises(SaveAbortedError, match=r"rank 0's report is invalid: trainer_state: key 'opt\.m'"):
            try:
                ray.get(handle.actor.wait_committed.remote(1), timeout=60)
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
        report = _gather_report(0, 1, *_good_state(0))
        report.metrics = {"loss": "low"}  # type: ignore[dict-item]
        with pytest.raises(SaveAbortedError, match=r"step 2: rank 0's report is invalid: metrics: 'loss'"):
            try:
                ray.get(handle.actor.report.remote(2, report))
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
        _assert_not_committed(tmp_path, run_name, 1, [])
        _assert_not_committed(tmp_path, run_name, 2, [])
        # a numpy scalar metric is taken as its float value
        report = _gather_report(0, 1, *_good_state(0))
        report.metrics = {"loss": np.float32(0.25)}  # type: ignore[dict-item]
        ray.get(handle.actor.report.remote(3, report))
        info = ray.get(handle.actor.wait_committed.remote(3), timeout=60)
        assert info.metrics == {"loss": 0.25} and type(info.metrics["loss"]) is float
        assert handle.best().step == 3
        _assert_next_step_commits(tmp_path, run_name, 4, [3])
    finally:
        handle.shutdown()


# direct mode: the rank writes its own bytes, so the master checks the description it plans with
DIRECT_CASES = [c for c in BAD_TENSORS if c[0] != "bytes sent do not match the declaration"]


@pytest.mark.parametrize("what,key,meta,data,says", DIRECT_CASES, ids=[c[0] for c in DIRECT_CASES])
def test_direct_plan_that_does_not_describe_tensors_aborts_naming_rank_and_key(
    tmp_path: Path, run_name: str, what: str, key: Any, meta: TensorMeta, data: np.ndarray, says: str
) -> None:
    handle = ray_ckpt.start_checkpointer(_config(tmp_path, run_name, write_mode="direct"))
    try:
        waiting = handle.actor.plan.remote(5, RankReport(0, 2, _good_state(0)[0]), False, "direct")  # waits for 1
        bad_state, _ = _bad_state(key, meta, data)
        for ref in (handle.actor.plan.remote(5, RankReport(1, 2, bad_state), False, "direct"), waiting):
            with pytest.raises(ray.exceptions.RayTaskError) as excinfo:
                ray.get(ref, timeout=60)
            cause = excinfo.value.as_instanceof_cause()
            assert isinstance(cause, SaveAbortedError), cause
            assert f"step 5: rank 1's report is invalid: model: key {key!r}" in str(cause), str(cause)
            assert says in str(cause), str(cause)
        _assert_not_committed(tmp_path, run_name, 5, [])
        _assert_next_step_commits(tmp_path, run_name, 6, [])
    finally:
        handle.shutdown()


def test_direct_plan_with_a_bad_trainer_state_aborts_and_removes_the_step(tmp_path: Path, run_name: str) -> None:
    handle = ray_ckpt.start_checkpointer(_config(tmp_path, run_name, write_mode="direct"))
    try:
        state, _ = _good_state(0)
        report = RankReport(rank=0, world_size=1, model=state, trainer=RankState({"opt.m": TensorMeta("X9", (4,), 16)}))
        with pytest.raises(SaveAbortedError, match=r"rank 0's report is invalid: trainer_state: key 'opt\.m': unknown"):
            try:
                ray.get(handle.actor.plan.remote(1, report, False, "direct"), timeout=60)
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
        _assert_not_committed(tmp_path, run_name, 1, [])
        _assert_next_step_commits(tmp_path, run_name, 2, [])
    finally:
        handle.shutdown()


def test_direct_finish_from_a_rank_that_never_joined_aborts_naming_it(tmp_path: Path, run_name: str) -> None:
    handle = ray_ckpt.start_checkpointer(_config(tmp_path, run_name, write_mode="direct"))
    try:
        waiting = handle.actor.plan.remote(1, RankReport(0, 2, _good_state(0)[0]), False, "direct")
        with pytest.raises(SaveAbortedError, match=r"rank 1's report is invalid: it finished without joining"):
            try:
                ray.get(handle.actor.finish_rank.remote(1, RankResult(1)), timeout=60)
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
        with pytest.raises(ray.exceptions.RayTaskError):
            ray.get(waiting, timeout=60)
        _assert_not_committed(tmp_path, run_name, 1, [])
        _assert_next_step_commits(tmp_path, run_name, 2, [])
    finally:
        handle.shutdown()


def test_numpy_and_torch_eval_scores_rank_like_the_store(tmp_path: Path, run_name: str) -> None:
    config = _config(tmp_path, run_name, metric_name="eval/score", mode="max")
    handle = ray_ckpt.start_checkpointer(config)
    try:
        worker = ray_ckpt.WorkerClient(run_name, 0, 1)
        for step in (1, 2, 3, 4):
            worker.save(step, {"w": torch.ones(2)}, blocking=True)
        ev = ray_ckpt.EvalClient(run_name)
        assert ev.follower() is not None  # answers come from the in-process copy of the index
        ev.report_eval(1, {"eval/score": np.float32(1.5)})
        ev.report_eval(2, {"eval/score": np.int64(3)})
        ev.report_eval(3, {"eval/score": torch.tensor(2.0)})
        # straight to the actor (not through EvalClient, which converts first): the master converts
        ray.get(handle.actor.report_eval.remote(4, {"eval/score": np.float64(0.5)}))
        store = CheckpointStore(config=config)
        expected = [(2, 3.0), (3, 2.0), (1, 1.5), (4, 0.5)]
        for view in (ev, handle, ray_ckpt.EvalClient(run_name), store):
            ranked = [(i.step, i.metrics["eval/score"]) for i in view.top_k(4)]
            assert ranked == expected, (type(view).__name__, ranked)
            best = view.best()
            assert best is not None and best.step == 2 and type(best.metrics["eval/score"]) is float
        assert ev.best() == store.best()
        with pytest.raises(TypeError, match="eval/score"):
            ev.report_eval(1, {"eval/score": "high"})
        with pytest.raises(TypeError, match="eval/score"):
            try:
                ray.get(handle.actor.report_eval.remote(1, {"eval/score": [1.0]}))
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
        assert [(i.step, i.metrics["eval/score"]) for i in ev.top_k(4)] == expected
        ev.close()
    finally:
        handle.shutdown()
