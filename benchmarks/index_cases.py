"""Index cases without Ray: top_k over many checkpoints in-process, and the restart-time rebuild of
the index from the run's index.parquet snapshot (what the checkpointer does when it comes back).
"""

from __future__ import annotations

import os
import random
import time

from benchmarks.measure import CaseResult, percentile
from ray_ckpt.core.index import CheckpointIndex, CheckpointInfo
from ray_ckpt.core.storage.storage import Storage

INDEX_SNAPSHOT = "index.parquet"


def make_records(count: int, *, seed: int = 0) -> list[CheckpointInfo]:
    """``count`` checkpoint records with a random loss and an accuracy (some runs rank by either)."""
    rng = random.Random(seed)
    return [
        CheckpointInfo(
            step=step * 100,
            uri=f"file:///runs/bench/checkpoints/step_{step * 100:09d}",
            metrics={"loss": rng.random(), "accuracy": rng.random()},
            created=1.7e9 + step,
            total_size=1 << 30,
            files_size=(1 << 30) + 4096,
            world_size=2,
            metadata={"epoch": step // 1000},
        )
        for step in range(count)
    ]


def index_topk(count: int, queries: int, k: int = 10) -> CaseResult:
    """Latency of CheckpointIndex.top_k(k) over ``count`` records (after the first query built the ranking)."""
    index = CheckpointIndex("loss", "min")
    index.extend(make_records(count))
    started = time.perf_counter()
    index.top_k(k)
    first = time.perf_counter() - started
    latencies = []
    for _ in range(queries):
        began = time.perf_counter()
        index.top_k(k)
        latencies.append(time.perf_counter() - began)
    adds = []
    for i in range(min(queries, 1000)):  # keeping the ranking sorted as saves commit
        info = CheckpointInfo(step=count * 100 + i, uri="x", metrics={"loss": random.random()})
        began = time.perf_counter()
        index.add(info)
        adds.append(time.perf_counter() - began)
    return CaseResult(
        "index_topk",
        "index",
        f"in-process CheckpointIndex.top_k({k}) over {count} checkpoints",
        metrics={"p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3},
        runs=latencies[:50],
        extra={"records": count, "first_query_ms": first * 1e3, "add_p99_ms": percentile(adds, 99) * 1e3},
    )


def snapshot_restart(workdir: str, count: int, repeat: int) -> CaseResult:
    """Seconds to rebuild the index of ``count`` checkpoints from index.parquet on storage, ready to rank."""
    storage = Storage(os.path.join(workdir, "index_run"))
    index = CheckpointIndex("loss", "min")
    index.extend(make_records(count))
    data = index.to_parquet_bytes()
    storage.write_atomic(INDEX_SNAPSHOT, data)
    runs = []
    for _ in range(repeat):
        began = time.perf_counter()
        rebuilt = CheckpointIndex("loss", "min")
        rebuilt.extend(CheckpointIndex.records_from_parquet_bytes(storage.read_bytes(INDEX_SNAPSHOT)))
        rebuilt.top_k(1)  # the first query builds the ranking: part of being ready
        runs.append(time.perf_counter() - began)
        assert len(rebuilt) == count
    return CaseResult(
        "index_restart",
        "index",
        f"restart: read index.parquet of {count} checkpoints, rebuild the index, first top_k",
        metrics={"seconds": min(runs)},
        runs=runs,
        extra={"records": count, "snapshot_bytes": len(data)},
    )
