"""32 worker actors (num_cpus=0, small tensors) saving partitioned + replicated keys, both write modes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig, CheckpointStore

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

WORLD_SIZE = 32


def rank_state(rank: int, step: int) -> dict[str, torch.Tensor]:
    """Replicated keys (same on every rank) and this rank's own partition, a few KB each."""
    gen = torch.Generator().manual_seed(step)
    shared = {"embed.weight": torch.randn(64, 32, generator=gen), "final_norm.weight": torch.full((32,), float(step))}
    own = {
        f"layers.{rank}.attn.weight": torch.arange(256, dtype=torch.float32) + 1000 * rank + step,
        f"layers.{rank}.mlp.weight": torch.full((16, 16), float(rank), dtype=torch.bfloat16),
        f"layers.{rank}.mlp.steps": torch.tensor([rank, step], dtype=torch.int64),
    }
    return {**shared, **own}


@ray.remote(num_cpus=0)
class ManyRank:
    """One of the 32 ranks; ``connect`` binds it to a run."""

    def __init__(self) -> None:
        self.client: ray_ckpt.WorkerClient | None = None
        self.rank = 0

    def connect(self, run_name: str, rank: int) -> None:
        self.client = ray_ckpt.WorkerClient(run_name, rank, WORLD_SIZE)
        self.rank = rank

    def save(self, step: int) -> dict[str, Any]:
        assert self.client is not None
        trainer = {"step": step, "opt": {"lr": 0.1, "m": torch.ones(8) * step}} if self.rank == 0 else None
        metrics = {"loss": 1.0 / step, f"rank{self.rank}": 1.0}
        info = self.client.save(step, rank_state(self.rank, step), metrics=metrics, trainer_state=trainer).result(180)
        return {"step": info.step, "world_size": info.world_size, "metrics": info.metrics}


@pytest.fixture(scope="module")
def ranks() -> Any:
    """32 rank actors, started 8 at a time (each imports torch) and killed afterwards."""
    actors: list[Any] = []
    try:
        for start in range(0, WORLD_SIZE, 8):
            batch = [ManyRank.remote() for _ in range(start, start + 8)]
            ray.get([a.__ray_ready__.remote() for a in batch], timeout=600)
            actors += batch
        yield actors
    finally:
        for actor in actors:
            ray.kill(actor)


@pytest.mark.parametrize("write_mode", ["gather", "direct"])
def test_32_ranks_commit_and_load(tmp_path: Path, run_name: str, ranks: list[Any], write_mode: str) -> None:
    config = CheckpointConfig(
        storage_uri=str(tmp_path / "store"),
        run_name=run_name,
        metric_name="loss",
        write_mode=write_mode,
        max_shard_size="8KB",
        save_timeout_s=120.0,
    )
    handle = ray_ckpt.start_checkpointer(config)
    ray.get([r.connect.remote(run_name, i) for i, r in enumerate(ranks)], timeout=120)
    seconds = []
    for step in (1, 2):
        started = time.perf_counter()
        results = ray.get([r.save.remote(step) for r in ranks], timeout=300)
        seconds.append(time.perf_counter() - started)
        assert {(r["step"], r["world_size"]) for r in results} == {(step, WORLD_SIZE)}
    # metrics of every rank merge (rank 0 wins on the shared name)
    assert results[0]["metrics"]["loss"] == 0.5 and all(results[0]["metrics"][f"rank{i}"] == 1.0 for i in range(32))
    store = CheckpointStore(config=config)
    assert [i.step for i in store.list()] == [1, 2]
    for step in (1, 2):
        loaded = store.load(step)
        expected: dict[str, torch.Tensor] = {}
        for rank in range(WORLD_SIZE):
            expected.update(rank_state(rank, step))
        assert sorted(loaded) == sorted(expected) and len(expected) == 2 + 3 * WORLD_SIZE
        for key, value in expected.items():
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        store.verify(step)
    trainer = store.load_trainer_state(2)
    assert trainer["step"] == 2 and torch.equal(trainer["opt"]["m"], torch.ones(8) * 2)
    # replicated keys are written once, by rank 0; every rank's partition lands in the shards
    step_dir = tmp_path / "store" / run_name / "checkpoints" / "step_000000002"
    weight_map = json.loads((step_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {name for name in weight_map.values()}
    assert len(shards) >= WORLD_SIZE  # each rank's group starts a shard of its own
    replicated = {weight_map["embed.weight"], weight_map["final_norm.weight"]}
    others = {shard for key, shard in weight_map.items() if key.startswith("layers.") and key.split(".")[1] != "0"}
    assert replicated.isdisjoint(others)  # written with rank 0's group, not by any other rank
    assert handle.stats()["pending"] == [] and handle.latest().step == 2
    handle.shutdown()


SIMULATED_RANKS = 1200  # more than Ray's default of 1000 concurrent calls on an async actor


@pytest.mark.parametrize("write_mode", ["gather", "direct"])
def test_more_ranks_than_the_actor_default_concurrency(tmp_path: Path, run_name: str, write_mode: str) -> None:
    """1,200 ranks, simulated from the driver (one RankReport each, no processes): every rank holds
    a call open on the master (gather: wait_committed; direct: plan), so a master that serves
    at most 1000 calls at once would never see the last ranks and abort the step."""
    from ray_ckpt.core.format.tree import FlatState, flatten_state
    from ray_ckpt.core.writer import write_share
    from ray_ckpt.distributed.wire import RankReport, RankResult, RankState, TensorMeta

    world = SIMULATED_RANKS
    config = CheckpointConfig(
        storage_uri=str(tmp_path / "store"),
        run_name=run_name,
        write_mode=write_mode,
        max_shard_size="1MB",
        save_timeout_s=90.0,
    )
    handle = ray_ckpt.start_checkpointer(config)
    actor = handle.actor
    states = {r: rank_state(r, 1) for r in range(world)}
    own = {r: {k: v for k, v in s.items() if k.startswith("layers.")} for r, s in states.items()}

    def report(rank: int) -> tuple[RankReport, FlatState]:
        flat = flatten_state(own[rank])
        meta = {k: TensorMeta(b.dtype, tuple(b.shape), b.nbytes) for k, b in flat.tensors.items()}
        return RankReport(rank=rank, world_size=world, model=RankState(meta)), flat

    waits = []
    if write_mode == "gather":
        for rank in range(world):
            rep, flat = report(rank)
            rep.model_ref = [ray.put({k: b.data for k, b in flat.tensors.items()})]
            ray.get(actor.report.remote(1, rep), timeout=120)  # accepted (a WorkerClient waits for this too)
            waits.append(actor.wait_committed.remote(1))
    else:
        reports = {rank: report(rank) for rank in range(world)}
        plans = [actor.plan.remote(1, reports[r][0], False, "direct") for r in range(world)]
        storage = CheckpointStore(config=config).storage
        for rank, plan in enumerate(ray.get(plans, timeout=180)):
            flat = reports[rank][1]
            files = write_share(storage, plan, rank, lambda part, key, r, flat=flat: flat.tensors[key].data)
            ray.get(actor.finish_rank.remote(1, RankResult(rank, files=files)), timeout=120)
            waits.append(actor.wait_committed.remote(1))
    infos = ray.get(waits, timeout=180)
    assert {(i.step, i.world_size) for i in infos} == {(1, world)}
    loaded = CheckpointStore(config=config).load(1)
    expected = {k: v for r in range(world) for k, v in own[r].items()}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    handle.shutdown()
