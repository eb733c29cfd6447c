"""The checkpointer actor killed in the middle of a save (``ray.kill`` with restarts allowed).

The save is held at a chosen storage write inside the actor (a gate installed through
``__ray_call__``), so the kill lands at a known moment. Then: the pending save fails with
SaveAbortedError at the worker, the restarted actor rebuilds its index from storage and removes
the partial step, the worker's retry commits, and an eval client made before the kill (one of
its calls even in flight) carries on without being recreated.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig, CheckpointStore, SaveAbortedError
from tests.reliability.faults import (
    MARKER,
    SHARD_LIMIT,
    actor_pid,
    assert_state,
    hold_writes,
    restarted_pid,
    tensors_for,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("ray_session")


def hold_writes_to(checkpointer: Any, needle: str, gate_dir: str) -> None:
    """Runs inside the actor: the write of a path containing ``needle`` completes, then blocks forever."""
    hold_writes(checkpointer.store.storage, needle, gate_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("write_mode", "held_at"),
    [("gather", "step_000000003/model-00002-of-00003"), ("direct", "step_000000003/model.safetensors.index.json")],
    ids=["gather-between-shards", "direct-before-marker"],
)
def test_checkpointer_killed_mid_save_restarts_and_the_retry_commits(
    tmp_path: Path, run_name: str, write_mode: str, held_at: str
) -> None:
    config = CheckpointConfig(
        storage_uri=str(tmp_path / "store"),
        run_name=run_name,
        metric_name="loss",
        mode="min",
        max_shard_size=SHARD_LIMIT,
        write_mode=write_mode,
        max_restarts=2,
        save_timeout_s=60.0,
    )
    handle = ray_ckpt.start_checkpointer(config)
    worker = ray_ckpt.WorkerClient(run_name, 0, 1)
    for step in (1, 2):
        worker.save(step, tensors_for(step), metrics={"loss": 1.0 / step}, blocking=True)
    evaluator = ray_ckpt.EvalClient(run_name, retry_s=90.0)
    assert [i.step for i in evaluator.list()] == [1, 2]
    pid_before = actor_pid(handle)

    gate = tmp_path / "gate"
    gate.mkdir()
    ray.get(handle.actor.__ray_call__.remote(hold_writes_to, held_at, str(gate)))
    pending = worker.save(3, tensors_for(3), metrics={"loss": 1.0 / 3})
    wait_for(lambda: (gate / "reached").exists(), 60, f"the save to reach {held_at}")
    step3 = tmp_path / "store" / run_name / "checkpoints" / "step_000000003"
    assert step3.exists() and not (step3 / MARKER).exists()  # really mid-save: files, no marker

    # An eval query in flight while the actor dies: it must come back by itself.
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.append(evaluator.wait_for_checkpoint(2, timeout=90)))
    waiter.start()
    time.sleep(0.3)
    ray.kill(handle.actor, no_restart=False)

    with pytest.raises(SaveAbortedError, match=r"step 3.*(died|restarted)"):
        pending.result(timeout=90)
    # The restarted actor rebuilt its index from storage; the same eval client goes on.
    assert restarted_pid(handle, pid_before) != pid_before
    assert [i.step for i in evaluator.list()] == [1, 2]
    assert evaluator.best().step == 2
    assert not step3.exists(), "the restarted checkpointer did not remove the partial step"
    assert [i.step for i in CheckpointStore(config=config).list()] == [1, 2]

    # The worker retries the same step with the same client: it commits.
    info = worker.save(3, tensors_for(3), metrics={"loss": 1.0 / 3}, blocking=True).result(timeout=90)
    assert info.step == 3
    waiter.join(90)
    assert waited and waited[0] is not None and waited[0].step == 3, waited
    assert [i.step for i in evaluator.list()] == [1, 2, 3]
    store = CheckpointStore(config=config)
    for step in (1, 2, 3):
        store.verify(step)
        assert_state(step, store.load(step))
    assert_state(3, evaluator.load("latest"))
    handle.shutdown()


def save_with_retries(worker: Any, step: int, state: dict[str, torch.Tensor], attempts: int = 60) -> Any:
    """What a training loop does: a save that raises SaveAbortedError is simply tried again."""
    for attempt in range(attempts):
        try:
            return worker.save(step, state, blocking=True).result(timeout=60)
        except SaveAbortedError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


@pytest.mark.slow
def test_killed_between_saves_and_a_second_time(tmp_path: Path, run_name: str) -> None:
    """Two kills in a row (max_restarts=2): saves in flight fail with SaveAbortedError only, their
    retries commit, and each restart indexes everything committed so far."""
    config = CheckpointConfig(storage_uri=str(tmp_path / "store"), run_name=run_name, max_restarts=2)
    handle = ray_ckpt.start_checkpointer(config)
    worker = ray_ckpt.WorkerClient(run_name, 0, 1)
    evaluator = ray_ckpt.EvalClient(run_name, retry_s=90.0)
    worker.save(1, {"w": torch.full((3,), 1.0)}, blocking=True)
    for step in (2, 3):
        ray.kill(handle.actor, no_restart=False)
        assert save_with_retries(worker, step, {"w": torch.full((3,), float(step))}).step == step
        assert [i.step for i in evaluator.list()] == list(range(1, step + 1))
    assert torch.equal(evaluator.load("latest")["w"], torch.full((3,), 3.0))
    handle.shutdown()
