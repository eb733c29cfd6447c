"""A worker actor dies before reporting its share of a step: killed before it saves (gather), or
killed while it is writing its own shards (direct). The step aborts after save_timeout_s with a
SaveAbortedError naming the missing rank; nothing becomes visible, the partial step directory is
removed, and the next step commits with a replacement worker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig, CheckpointStore, SaveAbortedError
from tests.reliability.faults import MARKER, temp_files, wait_for

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

TIMEOUT_S = 3.0


def rank_state(rank: int, step: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s own keys (two 4 KB tensors: two shards at a 5 KB limit) plus a replicated one."""
    return {
        "shared.bias": torch.arange(4.0),
        f"layer{rank}.a": torch.full((1024,), float(step * 10 + rank)),
        f"layer{rank}.b": torch.full((1024,), float(step * 10 + rank) + 0.5),
    }


@ray.remote(num_cpus=0)
class Rank:
    """A training worker that saves through WorkerClient (it joins one run at a time)."""

    def join(self, run_name: str, rank: int, world_size: int) -> bool:
        self.client = ray_ckpt.WorkerClient(run_name, rank, world_size)
        self.rank = rank
        return True

    def save(self, step: int) -> int:
        return self.client.save(step, rank_state(self.rank, step), blocking=True).result(60).step

    def save_but_hang_after_one_shard(self, step: int, gate: str) -> None:
        """Direct mode: write one shard of this rank, then hang (the test kills this actor)."""
        import ray_ckpt.core.writer as writer_module

        original = writer_module.write_planned_file

        def write_planned_file(*args: Any, **kwargs: Any) -> Any:
            digest = original(*args, **kwargs)
            Path(gate).write_text(args[3].name)  # the shard that reached storage
            while True:
                time.sleep(0.05)
            return digest

        writer_module.write_planned_file = write_planned_file
        self.client.save(step, rank_state(self.rank, step), blocking=True)


@pytest.fixture(scope="module")
def survivor(ray_session: str) -> Any:
    """The rank that stays alive (shared by the tests of this module: one actor start less each)."""
    return Rank.remote()


@pytest.mark.parametrize("write_mode", ["gather", "direct"])
def test_worker_dies_before_reporting_step_aborts_and_next_step_commits(
    tmp_path: Path, run_name: str, write_mode: str, survivor: Any
) -> None:
    config = CheckpointConfig(
        storage_uri=str(tmp_path / "store"),
        run_name=run_name,
        write_mode=write_mode,
        save_timeout_s=TIMEOUT_S,
        max_shard_size="5KB",
    )
    handle = ray_ckpt.start_checkpointer(config)
    # Every worker is up (imports done) before the short save timeout can run.
    victim, replacement = Rank.remote(), Rank.remote()
    ray.get([survivor.join.remote(run_name, 0, 2), victim.join.remote(run_name, 1, 2)])
    ranks = [survivor, victim]
    assert ray.get([w.save.remote(1) for w in ranks]) == [1, 1]
    run_dir = tmp_path / "store" / run_name
    step2 = run_dir / "checkpoints" / "step_000000002"

    if write_mode == "gather":
        ray.kill(ranks[1])  # dies while "training", before it ever reports step 2
        doomed = None
    else:
        gate = tmp_path / "gate"
        doomed = ranks[1].save_but_hang_after_one_shard.remote(2, str(gate))
    started = time.monotonic()
    pending = ranks[0].save.remote(2)
    if write_mode == "direct":
        wait_for(gate.exists, 60, "rank 1 to write a shard")
        assert (step2 / gate.read_text()).exists() and not (step2 / MARKER).exists()
        ray.kill(ranks[1])  # dies mid-write, before reporting
    late = "did not report" if write_mode == "gather" else "did not finish writing their share"
    with pytest.raises(SaveAbortedError, match=rf"step 2: ranks \[1\] {late} within save_timeout_s"):
        ray.get(pending, timeout=60)
    assert time.monotonic() - started >= TIMEOUT_S * 0.9
    if doomed is not None:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(doomed, timeout=60)

    # Nothing visible; the partial step is removed (the abort's cleanup runs on the writer thread).
    assert [i.step for i in handle.list()] == [1]
    assert [i.step for i in CheckpointStore(config=config).list()] == [1]
    wait_for(lambda: not step2.exists(), 30, "the aborted step's directory to be removed")
    assert temp_files(run_dir) == []

    # A replacement worker (as Ray Train would start) and the survivor commit the next step.
    ray.get(replacement.join.remote(run_name, 1, 2))
    ranks[1] = replacement
    assert ray.get([w.save.remote(3) for w in ranks]) == [3, 3]
    store = CheckpointStore(config=config)
    assert [i.step for i in store.list()] == [1, 3]
    store.verify(3)
    loaded = store.load(3)
    for rank in range(2):
        for key, value in rank_state(rank, 3).items():
            assert torch.equal(loaded[key], value), key
    handle.shutdown()
