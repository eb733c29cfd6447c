"""The checkpoint index at a million records: top_k latency, snapshot size, write and restore time.

    python -m benchmarks.index_scale [--records 1000000] [--repeats 3] [--out bench_out/index_scale.json]

All in-process (no Ray): what the checkpointer does on every query (top_k over its sorted
rankings), on every commit (add + rewrite index.parquet) and on a restart (read index.parquet,
rebuild the index, first ranked query). Records are synthetic: two metrics, small metadata on
half of them, durability lists. Prints a Markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

from ray_ckpt.core.index import CheckpointIndex, CheckpointInfo
from ray_ckpt.core.storage.storage import Storage

logger = logging.getLogger("benchmarks.index_scale")


def make_records(count: int, seed: int = 0) -> list[CheckpointInfo]:
    """``count`` records: loss and accuracy metrics, metadata on every other one, some remote copies."""
    rng = random.Random(seed)
    return [
        CheckpointInfo(
            step=step * 100,
            uri=f"s3://bucket/runs/big-run/checkpoints/step_{step * 100:09d}",
            metrics={"loss": rng.random(), "accuracy": rng.random()},
            created=1.7e9 + step,
            total_size=10 * 10**9,
            files_size=10 * 10**9 + 40_960,
            world_size=1000,
            metadata={"epoch": step // 1000, "git": "3fcf98c"} if step % 2 else {},
            durability=["local", "remote"] if step % 3 == 0 else ["local"],
        )
        for step in range(count)
    ]


def timed(fn: Any) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run(records: int, repeats: int, queries: int) -> dict[str, Any]:
    """Every measurement; the restore is repeated ``repeats`` times (the min is the headline)."""
    result: dict[str, Any] = {"records": records, "load_1m": [os.getloadavg()[0]]}
    recs = make_records(records)
    index = CheckpointIndex("loss", "min")
    result["extend_s"], _ = timed(lambda: index.extend(recs))
    result["first_top_k_s"], _ = timed(lambda: index.top_k(10))  # sorts the run's ranking once
    result["first_top_k_other_metric_s"], _ = timed(lambda: index.top_k(10, "accuracy", "max"))
    latencies = [timed(lambda: index.top_k(10))[0] for _ in range(queries)]
    result["top_k10_p50_us"] = percentile(latencies, 50) * 1e6
    result["top_k10_p99_us"] = percentile(latencies, 99) * 1e6
    result["top_k1000_p50_us"] = percentile([timed(lambda: index.top_k(1000))[0] for _ in range(200)], 50) * 1e6
    result["latest_p50_us"] = percentile([timed(index.latest)[0] for _ in range(queries)], 50) * 1e6
    rng = random.Random(1)
    adds = []
    for i in range(1000):  # commits arriving: both rankings kept sorted
        info = CheckpointInfo(step=records * 100 + i, uri="u", metrics={"loss": rng.random(), "accuracy": 0.5})
        adds.append(timed(lambda info=info: index.add(info))[0])
    result["add_p50_us"] = percentile(adds, 50) * 1e6
    result["add_p99_us"] = percentile(adds, 99) * 1e6
    removes = [timed(lambda s=s: index.remove(s))[0] for s in range(records * 100, records * 100 + 1000)]
    result["remove_p50_us"] = percentile(removes, 50) * 1e6
    result["index_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    with tempfile.TemporaryDirectory(prefix="ray-ckpt-index-") as workdir:
        storage = Storage(workdir)
        writes, restores, parses = [], [], []
        data = b""
        for _ in range(repeats):
            result["load_1m"].append(os.getloadavg()[0])
            seconds, data = timed(index.to_parquet_bytes)
            started = time.perf_counter()
            storage.write_atomic("index.parquet", data)
            writes.append(seconds + time.perf_counter() - started)
            gc.collect()
            started = time.perf_counter()
            parsed = CheckpointIndex.records_from_parquet_bytes(storage.read_bytes("index.parquet"))
            parses.append(time.perf_counter() - started)
            rebuilt = CheckpointIndex("loss", "min")
            rebuilt.extend(parsed)
            rebuilt.top_k(1)
            restores.append(time.perf_counter() - started)
            if len(rebuilt) != len(index) or rebuilt.top_k(5) != index.top_k(5):
                raise AssertionError("the restored index differs from the original")
            del parsed, rebuilt
        result["snapshot_bytes"] = len(data)
        result["snapshot_bytes_per_record"] = len(data) / records
        result["snapshot_write_s"] = min(writes)
        result["snapshot_write_runs_s"] = writes
        result["snapshot_parse_s"] = min(parses)
        result["restore_s"] = min(restores)
        result["restore_runs_s"] = restores
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def table(r: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    rows = [
        ("records", f"{r['records']:,}"),
        ("build the index (extend)", f"{r['extend_s']:.2f} s"),
        ("first top_k (sorts the ranking once)", f"{r['first_top_k_s']:.2f} s"),
        ("first top_k by another metric", f"{r['first_top_k_other_metric_s']:.2f} s"),
        ("top_k(10) p50 / p99", f"{r['top_k10_p50_us']:.1f} / {r['top_k10_p99_us']:.1f} µs"),
        ("top_k(1000) p50", f"{r['top_k1000_p50_us']:.0f} µs"),
        ("latest() p50", f"{r['latest_p50_us']:.1f} µs"),
        ("add (a commit, 2 rankings) p50 / p99", f"{r['add_p50_us']:.0f} / {r['add_p99_us']:.0f} µs"),
        ("remove (retention) p50", f"{r['remove_p50_us']:.0f} µs"),
        ("index.parquet size", f"{r['snapshot_bytes'] / 1e6:.1f} MB ({r['snapshot_bytes_per_record']:.1f} B/record)"),
        ("snapshot write (to_parquet_bytes + atomic write), min", f"{r['snapshot_write_s']:.2f} s"),
        ("snapshot parse (records_from_parquet_bytes), min", f"{r['snapshot_parse_s']:.2f} s"),
        ("restore (parse + rebuild + first top_k), min", f"{r['restore_s']:.2f} s"),
        ("process peak RSS (records + index + restore)", f"{r['peak_rss_mb']:.0f} MB"),
        ("1-min load during the runs", ", ".join(f"{x:.1f}" for x in r["load_1m"])),
    ]
    lines = ["| measurement | value |", "|---|---:|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the table, write the JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.index_scale", description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--out", default="bench_out/index_scale.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args.records, args.repeats, args.queries)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(table(result))
    print(f"\nmedian load {statistics.median(result['load_1m']):.1f} on {os.cpu_count()} CPUs; JSON: {args.out}")
    return result


if __name__ == "__main__":
    main()
