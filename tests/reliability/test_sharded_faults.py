"""Sharded saves that go wrong: a rank killed or failing mid-write, shards that do not fit together.

Ranks are plain Ray actors holding :class:`ray_ckpt.Shard` slices (the planner treats DTensors and
Shards alike). Each failure aborts the step naming the rank (and the key), nothing becomes
visible, and the next step commits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig, CheckpointStore, SaveAbortedError, Shard
from tests.reliability.faults import MARKER, wait_for

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

TIMEOUT_S = 4.0


def full(step: int) -> torch.Tensor:
    return torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32) + step


def shards(rank: int, step: int, rows: int = 64) -> dict[str, Any]:
    """Rank ``rank`` of 2: a row half (dim 0) and a column half (dim 1) of the step's tensor."""
    t = full(step)
    half = rows // 2
    return {
        "rows": Shard(t[rank * 32 : rank * 32 + 32].clone(), (rows, 32), (rank * half, 0)),
        "cols": Shard(t[:, rank * 16 : rank * 16 + 16].contiguous(), (64, 32), (0, rank * 16)),
    }


@ray.remote(num_cpus=0)
class ShardRank:
    def join(self, run_name: str, rank: int, world: int) -> bool:
        self.client = ray_ckpt.WorkerClient(run_name, rank, world)
        self.rank = rank
        return True

    def save(self, step: int, rows: int = 64) -> int:
        return self.client.save(step, shards(self.rank, step, rows), blocking=True).result(60).step

    def save_failing(self, step: int, gate: str | None) -> None:
        """Write this rank's ranges of the shared file, then hang (``gate`` set) or raise."""
        import ray_ckpt.core.writer as writer_module

        original = writer_module.write_pieces

        def write_pieces(*args: Any, **kwargs: Any) -> Any:
            written = original(*args, **kwargs)
            if gate is None:
                raise OSError("the disk is on fire")
            Path(gate).write_text("written")
            while True:
                time.sleep(0.05)
            return written

        writer_module.write_pieces = write_pieces
        try:
            self.client.save(step, shards(self.rank, step), blocking=True)
        finally:
            writer_module.write_pieces = original


def _config(tmp_path: Path, run_name: str, **options: Any) -> CheckpointConfig:
    return CheckpointConfig(storage_uri=str(tmp_path / "store"), run_name=run_name, save_timeout_s=TIMEOUT_S, **options)


def _get_abort(ref: Any) -> SaveAbortedError:
    with pytest.raises(SaveAbortedError) as excinfo:
        ray.get(ref, timeout=60)
    return excinfo.value


def test_rank_killed_mid_write_aborts_naming_it_and_the_next_step_commits(tmp_path: Path, run_name: str) -> None:
    config = _config(tmp_path, run_name, write_mode="direct")
    handle = ray_ckpt.start_checkpointer(config)
    survivor, victim, replacement = ShardRank.remote(), ShardRank.remote(), ShardRank.remote()
    ray.get([survivor.join.remote(run_name, 0, 2), victim.join.remote(run_name, 1, 2)])
    assert ray.get([survivor.save.remote(1), victim.save.remote(1)]) == [1, 1]
    step2 = tmp_path / "store" / run_name / "checkpoints" / "step_000000002"
    gate = tmp_path / "gate"
    victim.save_failing.remote(2, str(gate))
    pending = survivor.save.remote(2)
    wait_for(gate.exists, 60, "rank 1 to write its ranges")
    assert step2.exists() and not (step2 / MARKER).exists()  # being written, invisible
    ray.kill(victim)
    error = _get_abort(pending)
    assert "ranks [1] did not finish writing their share" in str(error)
    store = CheckpointStore(config=config)
    assert [i.step for i in store.list()] == [1]
    wait_for(lambda: not step2.exists(), 30, "the aborted step to be removed")
    ray.get(replacement.join.remote(run_name, 1, 2))
    assert ray.get([survivor.save.remote(3), replacement.save.remote(3)]) == [3, 3]
    store.reload()
    loaded = store.load(3)
    assert torch.equal(loaded["rows"], full(3)) and torch.equal(loaded["cols"], full(3))
    handle.shutdown()


def test_a_failing_rank_write_aborts_with_its_exception(tmp_path: Path, run_name: str) -> None:
    config = _config(tmp_path, run_name, write_mode="direct")
    handle = ray_ckpt.start_checkpointer(config)
    a, b = ShardRank.remote(), ShardRank.remote()
    ray.get([a.join.remote(run_name, 0, 2), b.join.remote(run_name, 1, 2)])
    refs = [a.save.remote(1), b.save_failing.remote(1, None)]
    with pytest.raises(OSError, match="the disk is on fire"):
        ray.get(refs[1], timeout=60)  # the failing rank sees its own error
    error = _get_abort(refs[0])  # every other rank: the abort, with each failing rank's exception
    assert "rank 1: OSError: the disk is on fire" in str(error) and "nothing was committed" in str(error)
    assert set(error.failures) == {1} and isinstance(error.failures[1], OSError)
    assert CheckpointStore(config=config).list() == []
    assert ray.get([a.save.remote(2), b.save.remote(2)]) == [2, 2]
    handle.shutdown()


@pytest.mark.parametrize("write_mode", ["gather", "direct"])
def test_shards_that_do_not_fit_together_abort_naming_key_and_ranks(
    tmp_path: Path, run_name: str, write_mode: str
) -> None:
    config = _config(tmp_path, run_name, write_mode=write_mode)
    handle = ray_ckpt.start_checkpointer(config)
    a, b = ShardRank.remote(), ShardRank.remote()
    ray.get([a.join.remote(run_name, 0, 2), b.join.remote(run_name, 1, 2)])
    refs = [a.save.remote(1), b.save.remote(1, 70)]  # rank 1 says "rows" has 70 rows, rank 0 says 64
    for ref in refs:
        error = _get_abort(ref)
        assert "key 'rows': ranks 0 and 1 disagree on the tensor: F32[64, 32] vs F32[70, 32]" in str(error)
        assert "nothing was committed" in str(error)
    assert CheckpointStore(config=config).list() == []
    assert ray.get([a.save.remote(2), b.save.remote(2)]) == [2, 2]
    handle.shutdown()


@pytest.mark.parametrize("write_mode", ["gather", "direct"])
def test_sharded_save_on_an_object_store_and_ranged_resharding_loads(
    run_name: str, s3_bucket: tuple[str, dict[str, Any]], write_mode: str
) -> None:
    """On S3 nothing is written piecewise: chunked tensors' files are streamed by the master (direct
    mode: from chunks the ranks send through Ray's object store); a reshard reads only its boxes."""
    uri, options = s3_bucket
    config = CheckpointConfig(
        storage_uri=f"{uri}/runs", storage_options=options, run_name=run_name, write_mode=write_mode, save_timeout_s=60
    )
    handle = ray_ckpt.start_checkpointer(config)
    a, b = ShardRank.remote(), ShardRank.remote()
    ray.get([a.join.remote(run_name, 0, 2), b.join.remote(run_name, 1, 2)])
    assert ray.get([a.save.remote(1), b.save.remote(1)]) == [1, 1]
    store = CheckpointStore(config=config)
    loaded = store.load(1)
    assert torch.equal(loaded["rows"], full(1)) and torch.equal(loaded["cols"], full(1))
    store.verify(1)
    three = [
        Shard(torch.zeros(22, 32), (64, 32), (0, 0)),
        Shard(torch.zeros(22, 32), (64, 32), (22, 0)),
        Shard(torch.zeros(20, 32), (64, 32), (44, 0)),
    ]  # 2 -> 3 ranks, uneven, on S3
    for piece in three:
        store.load(1, into={"rows": piece})
    assert torch.equal(torch.cat([p.local for p in three]), full(1))
    handle.shutdown()
