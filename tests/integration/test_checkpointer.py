"""The checkpointer actor with worker and eval clients on a real local Ray."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig, CheckpointStore, SaveAbortedError

pytestmark = pytest.mark.usefixtures("ray_session")


def make_config(tmp_path: Path, run_name: str, **overrides: Any) -> CheckpointConfig:
    options: dict[str, Any] = {
        "storage_uri": str(tmp_path / "store"),
        "run_name": run_name,
        "metric_name": "loss",
        "mode": "min",
        "max_shard_size": "4KB",
        "save_timeout_s": 20.0,
    }
    options.update(overrides)
    return CheckpointConfig(**options)


@ray.remote(num_cpus=0)
class Rank:
    """A worker actor holding some state and saving it through WorkerClient."""

    def __init__(self, run_name: str, rank: int, world_size: int) -> None:
        self.client = ray_ckpt.WorkerClient(run_name, rank, world_size)
        self.rank = rank

    def save(self, step: int, state: dict[str, torch.Tensor], metrics: dict | None = None, **kw: Any) -> Any:
        return self.client.save(step, state, metrics=metrics, **kw).result(60)

    def save_nowait(self, step: int, state: dict[str, torch.Tensor], **kw: Any) -> float:
        started = time.perf_counter()
        self.client.save(step, state, blocking=False, **kw)
        return time.perf_counter() - started

    def save_then_mutate(self, step: int) -> tuple[float, float]:
        t = torch.ones(1000)
        self.client.save(step, {"w": t}, blocking=False)
        t.mul_(5)  # training goes on and changes the tensor in place
        return float(t[0]), float(self.client.wait()[0].step)

    def wait(self) -> list[int]:
        return [i.step for i in self.client.wait(60)]


def shared_and_own(rank: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    shared = {"embed.weight": torch.randn(64, 16), "norm.bias": torch.zeros(16)}
    own = {f"layers.{rank}.weight": torch.full((32, 16), float(rank + 1)), f"layers.{rank}.scale": torch.arange(8.0)}
    return {**shared, **own}


def files_of(step_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(step_dir)): p.read_bytes()
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != "checkpoint.json"
    }


@pytest.mark.parametrize("write_mode", ["gather", "direct"])
def test_partitioned_and_replicated_keys_commit_once(tmp_path: Path, run_name: str, write_mode: str) -> None:
    config = make_config(tmp_path, run_name, write_mode=write_mode)
    handle = ray_ckpt.start_checkpointer(config)
    ranks = [Rank.remote(run_name, r, 2) for r in range(2)]
    infos = ray.get(
        [
            w.save.remote(1, shared_and_own(r), {"loss": 0.5 + r}, trainer_state={"epoch": 3, "m": torch.ones(2)})
            for r, w in enumerate(ranks)
        ]
    )
    assert {i.step for i in infos} == {1} and infos[0].world_size == 2
    assert infos[0].metrics["loss"] == 0.5  # rank 0 wins on a metric both report
    store = CheckpointStore(config=config)
    loaded = store.load(1)
    expected = {**shared_and_own(0), **shared_and_own(1)}
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    trainer = store.load_trainer_state(1)
    assert trainer["epoch"] == 3 and torch.equal(trainer["m"], torch.ones(2))
    store.verify(1)
    # each replicated key is stored once across all shards
    import json

    index = json.loads(
        (tmp_path / "store" / run_name / "checkpoints/step_000000001/model.safetensors.index.json").read_text()
    )
    assert sorted(index["weight_map"]) == sorted(expected)
    assert handle.latest().step == 1
    handle.shutdown()


def test_gather_and_direct_write_byte_identical_checkpoints(tmp_path: Path, run_name: str) -> None:
    trees = {}
    for mode in ("gather", "direct"):
        name = f"{run_name}-{mode}"
        config = make_config(tmp_path, name, write_mode=mode, max_shard_size="3KB")
        handle = ray_ckpt.start_checkpointer(config)
        ranks = [Rank.remote(name, r, 2) for r in range(2)]
        ray.get(
            [
                w.save.remote(7, shared_and_own(r), {"loss": 1.0}, trainer_state={"opt": {"lr": 0.1}})
                for r, w in enumerate(ranks)
            ]
        )
        step_dir = tmp_path / "store" / name / "checkpoints" / "step_000000007"
        trees[mode] = files_of(step_dir)
        handle.shutdown()
    assert len([n for n in trees["gather"] if n.startswith("model-")]) > 1  # really sharded
    assert trees["gather"].keys() == trees["direct"].keys()
    for name in trees["gather"]:
        assert trees["gather"][name] == trees["direct"][name], name


@pytest.mark.parametrize("write_mode", ["gather", "direct"])
def test_conflicting_replicated_key_aborts_naming_the_key(tmp_path: Path, run_name: str, write_mode: str) -> None:
    config = make_config(tmp_path, run_name, write_mode=write_mode)
    handle = ray_ckpt.start_checkpointer(config)
    ranks = [Rank.remote(run_name, r, 2) for r in range(2)]
    ray.get([w.save.remote(1, shared_and_own(r)) for r, w in enumerate(ranks)])
    bad = shared_and_own(1)
    bad["embed.weight"] = bad["embed.weight"] + 1
    refs = [ranks[0].save.remote(2, shared_and_own(0)), ranks[1].save.remote(2, bad)]
    for ref in refs:
        with pytest.raises(Exception, match="embed.weight"):
            ray.get(ref)
    assert [i.step for i in CheckpointStore(config=config).list()] == [1]
    assert not (tmp_path / "store" / run_name / "checkpoints" / "step_000000002").exists()
    # the run goes on
    ray.get([w.save.remote(3, shared_and_own(r)) for r, w in enumerate(ranks)])
    assert handle.latest().step == 3


@pytest.mark.parametrize("write_mode", ["gather", "direct"])
def test_missing_rank_aborts_after_timeout_and_next_step_commits(
    tmp_path: Path, run_name: str, write_mode: str
) -> None:
    config = make_config(tmp_path, run_name, save_timeout_s=2.0, write_mode=write_mode)
    handle = ray_ckpt.start_checkpointer(config)
    ranks = [Rank.remote(run_name, r, 2) for r in range(2)]
    started = time.monotonic()
    with pytest.raises(SaveAbortedError, match=r"ranks \[1\] did not report"):
        ray.get(ranks[0].save.remote(1, shared_and_own(0)))
    assert time.monotonic() - started < 30
    assert CheckpointStore(config=config).list() == []
    assert not (tmp_path / "store" / run_name / "checkpoints" / "step_000000001").exists()
    ray.get([w.save.remote(2, shared_and_own(r)) for r, w in enumerate(ranks)])
    assert [i.step for i in handle.list()] == [2]


def test_bad_rank_world_size_and_stale_step_are_refused(tmp_path: Path, run_name: str) -> None:
    config = make_config(tmp_path, run_name)
    handle = ray_ckpt.start_checkpointer(config)
    with pytest.raises(ValueError, match="rank"):
        ray_ckpt.WorkerClient(run_name, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        ray_ckpt.WorkerClient(run_name, 0, 0)
    solo = ray_ckpt.WorkerClient(run_name, 0, 1)
    solo.save(5, {"w": torch.ones(3)}, blocking=True)
    with pytest.raises(ray_ckpt.CheckpointExistsError, match="step 3"):
        solo.save(3, {"w": torch.ones(3)}, blocking=True)
    with pytest.raises(ValueError, match="empty"):
        solo.save(6, {}, blocking=True)
    with pytest.raises(TypeError, match="w2"):
        solo.save(6, {"w": torch.ones(1), "w2": object()}, blocking=True)
    # world_size changing mid-step: the step aborts with an error that says so
    r0 = Rank.remote(run_name, 0, 2)
    pending = r0.save.remote(7, {"w": torch.ones(3)})
    deadline = time.monotonic() + 30
    while handle.stats()["pending"] != [7] and time.monotonic() < deadline:  # rank 0 is in
        time.sleep(0.1)
    with pytest.raises(ValueError, match="world_size 3"):
        ray_ckpt.WorkerClient(run_name, 1, 3).save(7, {"w": torch.ones(3)}, blocking=True)
    with pytest.raises(Exception, match="world_size"):
        ray.get(pending)
    assert [i.step for i in handle.list()] == [5]
    overwritten = solo.save(3, {"w": torch.zeros(3)}, blocking=True, overwrite=True).result()
    assert overwritten.step == 3


def test_async_save_snapshots_then_returns(tmp_path: Path, run_name: str) -> None:
    config = make_config(tmp_path, run_name)
    ray_ckpt.start_checkpointer(config)
    worker = Rank.remote(run_name, 0, 1)
    mutated, committed = ray.get(worker.save_then_mutate.remote(1))
    assert mutated == 5.0 and committed == 1.0
    assert torch.equal(CheckpointStore(config=config).load(1)["w"], torch.ones(1000))


def test_back_pressure_bounds_pending_saves(tmp_path: Path, run_name: str) -> None:
    config = make_config(tmp_path, run_name, max_pending_saves=1, save_timeout_s=30.0)
    handle = ray_ckpt.start_checkpointer(config)
    r0, r1 = Rank.remote(run_name, 0, 2), Rank.remote(run_name, 1, 2)
    # rank 0 starts step 1 (waiting for rank 1): it holds the only slot
    assert ray.get(r0.save_nowait.remote(1, shared_and_own(0))) < 10
    second = r0.save_nowait.remote(2, shared_and_own(0))  # must block: no slot
    ready, _ = ray.wait([second], timeout=1.5)
    assert not ready, "a second pending save was accepted beyond max_pending_saves"
    stats = handle.stats()
    # the second save waits in the worker (its own max_pending_saves bound), not on the master
    assert stats["pending"] == [1]
    ray.get(r1.save_nowait.remote(1, shared_and_own(1)))  # step 1 completes, the slot frees
    ray.get(second, timeout=30)
    ray.get(r1.save_nowait.remote(2, shared_and_own(1)))
    assert ray.get(r0.wait.remote())[-1] == 2  # wait() returns the saves still outstanding
    assert [i.step for i in handle.list()] == [1, 2]


@ray.remote(num_cpus=0)
class Querier:
    def __init__(self, run_name: str) -> None:
        self.ev = ray_ckpt.EvalClient(run_name)

    def hammer(self, seconds: float) -> tuple[int, float]:
        latencies = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            top = self.ev.top_k(2)
            latencies.append(time.perf_counter() - started)
            losses = [i.metrics["loss"] for i in top]
            assert losses == sorted(losses)
        return len(latencies), max(latencies)


def test_queries_are_served_while_saves_run(tmp_path: Path, run_name: str) -> None:
    config = make_config(tmp_path, run_name, max_shard_size="64MB")
    handle = ray_ckpt.start_checkpointer(config)
    queriers = [Querier.remote(run_name) for _ in range(4)]
    pending = [q.hammer.remote(4.0) for q in queriers]
    solo = ray_ckpt.WorkerClient(run_name, 0, 1)
    big = {"w": torch.randn(4_000_000)}  # 16 MB per save
    for step in range(1, 6):
        solo.save(step, big, metrics={"loss": 1.0 / step})
    solo.wait(60)
    results = ray.get(pending)
    assert all(count > 10 for count, _ in results)
    assert [i.step for i in handle.top_k(2)] == [5, 4]


def test_wait_for_checkpoint_and_report_eval_rank_top_k(tmp_path: Path, run_name: str) -> None:
    config = make_config(tmp_path, run_name, metric_name="eval/score", mode="max")
    ray_ckpt.start_checkpointer(config)
    ev = ray_ckpt.EvalClient(run_name)
    assert ev.wait_for_checkpoint(None, timeout=0.5) is None
    solo = ray_ckpt.WorkerClient(run_name, 0, 1)

    def later() -> None:
        time.sleep(0.5)
        solo.save(1, {"w": torch.ones(2)}, blocking=True)
        solo.save(2, {"w": torch.ones(2) * 2}, blocking=True)

    thread = threading.Thread(target=later)
    thread.start()
    info = ev.wait_for_checkpoint(None, timeout=30)
    thread.join()
    assert info is not None and info.step in (1, 2)
    assert ev.wait_for_checkpoint(2, timeout=0.3) is None
    assert ev.top_k(5) == []  # nothing scored yet
    ev.report_eval(1, {"eval/score": 10.0})
    ev.report_eval(2, {"eval/score": 3.0})
    assert [i.step for i in ev.top_k(2)] == [1, 2]
    assert ev.best().metrics["eval/score"] == 10.0
    assert torch.equal(ev.load("best")["w"], torch.ones(2))
    # eval metrics are persisted beside the checkpoint: a plain store sees them too
    assert CheckpointStore(config=config).best().step == 1


def test_leases_protect_from_retention_and_expire(tmp_path: Path, run_name: str) -> None:
    config = make_config(tmp_path, run_name, keep_last_n=1, lease_ttl_s=1.5)
    handle = ray_ckpt.start_checkpointer(config)
    solo = ray_ckpt.WorkerClient(run_name, 0, 1)
    ev = ray_ckpt.EvalClient(run_name)
    solo.save(1, {"w": torch.ones(2)}, blocking=True)
    with ev.lease(1):
        solo.save(2, {"w": torch.ones(2)}, blocking=True)
        time.sleep(2.0)  # longer than the ttl: the renewal thread keeps the lease alive
        solo.save(3, {"w": torch.ones(2)}, blocking=True)
        assert [i.step for i in handle.list()] == [1, 3]
        assert torch.equal(ev.load(1)["w"], torch.ones(2))
    solo.save(4, {"w": torch.ones(2)}, blocking=True)
    assert [i.step for i in handle.list()] == [4]
    # a holder that dies without releasing: the lease lapses after its ttl
    store = CheckpointStore(config=config)
    store.acquire_lease(4, ttl_s=1.0, holder="dead-evaluator")
    solo.save(5, {"w": torch.ones(2)}, blocking=True)
    assert [i.step for i in handle.list()] == [4, 5]
    time.sleep(1.2)
    solo.save(6, {"w": torch.ones(2)}, blocking=True)
    assert [i.step for i in handle.list()] == [6]


def test_restarted_checkpointer_rebuilds_its_index(tmp_path: Path, run_name: str) -> None:
    config = make_config(tmp_path, run_name, metric_name="eval/score", mode="max", max_restarts=2)
    handle = ray_ckpt.start_checkpointer(config)
    solo = ray_ckpt.WorkerClient(run_name, 0, 1)
    ev = ray_ckpt.EvalClient(run_name)
    for step in (1, 2, 3):
        solo.save(step, {"w": torch.full((4,), float(step))}, metrics={"loss": float(step)}, blocking=True)
    ev.report_eval(2, {"eval/score": 9.0})
    pid_before = ray.get(handle.actor.__ray_call__.remote(lambda self: os.getpid()))
    ray.kill(handle.actor, no_restart=False)
    # ray.kill is asynchronous: wait for the new incarnation (calls fail while it restarts)
    deadline, pid_after = time.monotonic() + 120, pid_before
    while pid_after == pid_before and time.monotonic() < deadline:
        try:
            pid_after = ray.get(handle.actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)
    assert pid_after != pid_before
    # the same eval client (and handle) carry on with the restarted actor, index rebuilt from storage
    assert [i.step for i in ev.list()] == [1, 2, 3]
    assert ev.best().step == 2
    assert solo.save(4, {"w": torch.ones(4)}, blocking=True).result().step == 4
    assert ray_ckpt.get_checkpointer(run_name).latest().step == 4


def eventually(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_eval_clients_follow_the_index_in_process(tmp_path: Path, run_name: str) -> None:
    config = make_config(tmp_path, run_name, metric_name="eval/score", mode="max", keep_last_n=2)
    handle = ray_ckpt.start_checkpointer(config)
    solo = ray_ckpt.WorkerClient(run_name, 0, 1)
    scorer, watcher = ray_ckpt.EvalClient(run_name), ray_ckpt.EvalClient(run_name)
    assert watcher.latest() is None and watcher.follower() is not None
    solo.save(1, {"w": torch.ones(2)}, blocking=True)
    found = watcher.wait_for_checkpoint(None, timeout=30)  # the commit is pushed to the copy
    assert found is not None and found.step == 1
    scorer.report_eval(1, {"eval/score": 5.0})
    assert scorer.best().step == 1  # the reporter sees its own score at once
    eventually(lambda: watcher.best() is not None)  # the other client once the change reaches it
    assert watcher.best().metrics["eval/score"] == 5.0
    for step in (2, 3):
        solo.save(step, {"w": torch.ones(2) * step}, blocking=True)
    eventually(lambda: [i.step for i in watcher.list()] == [2, 3])  # retention's deletions too
    assert watcher.best() is None  # the scored step is gone
    assert watcher.list() == handle.list() and watcher.follower().connected
    for step in range(4, 10):  # a commit acknowledged to this process is in its very next query
        solo.save(step, {"w": torch.ones(2)}, blocking=True)
        assert watcher.latest().step == step
    direct = ray_ckpt.EvalClient(run_name, follow_index=False)  # no copy: every query asks the master
    assert direct.follower() is None and direct.list() == handle.list()
    watcher.close()
    assert [i.step for i in watcher.list()] == [8, 9]  # closed: answered by the master again


# A driver that exits with EvalClients still following: Ray's own exit hook (ray.shutdown) must
# find no follower thread alive, or one waking inside Ray after the core worker is gone ends the
# process with _exit(1) or a segfault in _raylet.so after everything passed.
_EXIT_SCRIPT = """
import atexit, sys, threading
import ray
import ray._private.worker as ray_worker

# Ray's exit hook, traced, at the place Ray registered it (before ray_ckpt is imported)
original = ray_worker.shutdown
def traced(*args, **kwargs):
    alive = [t for t in threading.enumerate() if t.name == "ray-ckpt-index-follower"]
    print("FOLLOWERS_AT_RAY_SHUTDOWN", len(alive), flush=True)
    return original(*args, **kwargs)
atexit.unregister(original)
atexit.register(traced, _exiting_interpreter=True)

import ray_ckpt
from tests.ray_session import ensure_ray

ensure_ray()
config = ray_ckpt.CheckpointConfig(storage_uri=sys.argv[1], run_name="exiting", metric_name="loss")
ray_ckpt.start_checkpointer(config)
clients = [ray_ckpt.EvalClient("exiting") for _ in range(4)]
assert all(c.latest() is None and c.follower() is not None for c in clients)
print("FOLLOWING", sum(t.name == "ray-ckpt-index-follower" for t in threading.enumerate()), flush=True)
"""


def test_a_driver_exiting_with_followers_stops_them_before_ray_shuts_down(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=repo,
    )
    output = done.stdout + done.stderr
    assert "FOLLOWING 4" in done.stdout, output[-4000:]
    assert "FOLLOWERS_AT_RAY_SHUTDOWN 0" in done.stdout, output[-4000:]
    assert done.returncode == 0, output[-4000:]


def test_two_writers_of_one_run_are_told_to_use_one_run_each(tmp_path: Path, run_name: str) -> None:
    """Two jobs (two Tune trials) sharing a run both report rank 0 of a step: the second is refused
    with an error that says what is wrong and what to do, not only "joined twice"."""
    config = make_config(tmp_path, run_name, save_timeout_s=5.0)
    handle = ray_ckpt.start_checkpointer(config)
    first = Rank.remote(run_name, 0, 2)
    pending = first.save.remote(1, {"w": torch.ones(3)})
    deadline = time.monotonic() + 60
    while handle.stats()["pending"] != [1] and time.monotonic() < deadline:  # the first writer is in
        time.sleep(0.1)
    with pytest.raises(ValueError, match=r"two writers share run .*give each its own run.*One run per trial"):
        ray_ckpt.WorkerClient(run_name, 0, 2).save(1, {"w": torch.ones(3)}, blocking=True)
    with pytest.raises(Exception):  # noqa: B017 - the first writer's step never completes (no rank 1)
        ray.get(pending)
    assert handle.list() == []
