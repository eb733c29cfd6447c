"""How a commit scales with world size and bytes, in gather and direct mode.

    python -m benchmarks.scaling [--quick] [--nodes 2] [--out bench_out/scaling.json]

Two sweeps, each for both write modes, on a private Ray (one local node, or with ``--nodes N`` a
``ray.cluster_utils.Cluster`` with the checkpointer on its own node and the ranks spread over N
others, so gathered bytes cross object stores):

* world size 1 -> 2 -> 4 -> 8 -> 16 -> 32 ranks (small partitioned tensors plus replicated keys):
  commit latency, the master's CPU seconds per commit, its memory (peak RSS over a fresh process,
  shared-memory part apart), and what each rank sends it (report/plan bytes);
* bytes per rank at a fixed world size: the per-byte cost of each mode.

Every configuration's last step is loaded back and compared, tensor by tensor. Prints Markdown
tables, writes every run to JSON. Others share this machine: each row carries the 1-minute load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig, CheckpointStore
from ray_ckpt.core.format.digests import FileDigest
from ray_ckpt.core.format.hf_index import ShardSpec, hf_index_bytes
from ray_ckpt.core.format.tree import flatten_state
from ray_ckpt.core.layout import Manifest, step_dir
from ray_ckpt.core.planner import MODEL, describe, plan_save
from ray_ckpt.core.writer import write_share
from ray_ckpt.distributed.wire import RankReport, RankResult, RankState, TensorMeta

logger = logging.getLogger("benchmarks.scaling")

NAMESPACE = "ray_ckpt_scaling"
MB = 1e6
REPLICATED_BYTES = 256 * 1024  # every rank holds the same embedding (deduplicated by digest)


# -- state --------------------------------------------------------------------------------------
def rank_state(rank: int, per_rank_bytes: int, tensors: int = 4, step: int = 0) -> dict[str, torch.Tensor]:
    """This rank's partition (``tensors`` fp32 tensors, ``per_rank_bytes`` in all) plus replicated keys."""
    gen = torch.Generator().manual_seed(7)
    state = {
        "shared.embed.weight": torch.rand(REPLICATED_BYTES // 4, generator=gen),
        "shared.norm.weight": torch.full((256,), 1.0 + step),
    }
    numel = max(1, per_rank_bytes // 4 // tensors)
    for i in range(tensors):
        state[f"layers.{rank}.{i}.weight"] = torch.full((numel,), float(rank * 1000 + i + step))
    return state


def expected_state(world_size: int, per_rank_bytes: int, step: int) -> dict[str, torch.Tensor]:
    """What a step saved by ranks 0..world_size-1 must load as."""
    out: dict[str, torch.Tensor] = {}
    for rank in range(world_size):
        out.update(rank_state(rank, per_rank_bytes, step=step))
    return out


def report_bytes(rank: int, world_size: int, per_rank_bytes: int) -> int:
    """Pickled size of the metadata one rank sends the master per step (tensor names, shapes, digests)."""
    flat = flatten_state(rank_state(rank, per_rank_bytes))
    report = RankReport(rank=rank, world_size=world_size, model=describe(flat))
    return len(pickle.dumps(report))


# -- actors -------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class BenchRank:
    """One rank; ``connect`` binds it to a run, ``save`` saves its state and waits for the commit."""

    def __init__(self) -> None:
        self.client: ray_ckpt.WorkerClient | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.rank = 0
        self.per_rank_bytes = 0

    def connect(self, run_name: str, rank: int, world_size: int, per_rank_bytes: int) -> str:
        self.client = ray_ckpt.WorkerClient(run_name, rank, world_size, namespace=NAMESPACE)
        self.rank = rank
        if per_rank_bytes != self.per_rank_bytes:
            self.per_rank_bytes = per_rank_bytes
            self.state = rank_state(rank, per_rank_bytes)
        return ray.get_runtime_context().get_node_id()

    def save(self, step: int) -> tuple[float, float]:
        """(seconds until save() returned, seconds until the step committed)."""
        assert self.client is not None
        self.state["shared.norm.weight"].fill_(1.0 + step)
        for i in range(4):
            key = f"layers.{self.rank}.{i}.weight"
            if key in self.state:
                self.state[key].fill_(float(self.rank * 1000 + i + step))
        started = time.perf_counter()
        future = self.client.save(step, self.state, metrics={"loss": 1.0 / (step + 1)})
        returned = time.perf_counter() - started
        future.result(600)
        return returned, time.perf_counter() - started


def proc_stats(actor: Any, reset_peak: bool = False) -> dict[str, float]:
    """The checkpointer process's memory (MB) and CPU seconds, read from /proc inside it.

    ``reset_peak`` then restarts its peak-RSS counter (VmHWM) from the current RSS.
    """

    def read(_self: Any) -> dict[str, float]:
        fields: dict[str, float] = {}
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssShmem", "RssFile"):
                    fields[name] = int(value.split()[0]) / 1024
        with open("/proc/self/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        fields["cpu_s"] = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5\n")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return fields

    return ray.get(actor.__ray_call__.remote(read), timeout=60)


# -- cluster ------------------------------------------------------------------------------------
@contextmanager
def ray_backend(nodes: int, object_store_bytes: int) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Yield (checkpointer actor options, per-rank actor options cycle) on a private Ray."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runtime_env = {"env_vars": {"PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", "")}}
    cluster = None
    try:
        if nodes <= 0:
            ray.init(
                address="local",
                num_cpus=2,
                namespace=NAMESPACE,
                include_dashboard=False,
                logging_level="WARNING",
                log_to_driver=False,
                object_store_memory=object_store_bytes,
                runtime_env=runtime_env,
            )
            yield {}, [{}]
            return
        from ray.cluster_utils import Cluster

        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "resources": {"master": 1},
                "object_store_memory": object_store_bytes,
                "include_dashboard": False,
            },
        )
        for i in range(nodes):
            cluster.add_node(
                wait=False, num_cpus=0, resources={f"ranks_{i}": 1}, object_store_memory=object_store_bytes
            )
        cluster.wait_for_nodes()
        ray.init(
            address=cluster.address,
            namespace=NAMESPACE,
            logging_level="WARNING",
            log_to_driver=False,
            runtime_env=runtime_env,
        )
        yield {"resources": {"master": 0.01}}, [{"resources": {f"ranks_{i}": 0.01}} for i in range(nodes)]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


class RankPool:
    """Rank actors created on demand and reused across runs (starting one costs seconds of imports)."""

    def __init__(self, placements: list[dict[str, Any]]) -> None:
        self.placements = placements
        self.actors: list[Any] = []

    def take(self, count: int) -> list[Any]:
        while len(self.actors) < count:
            batch = [
                BenchRank.options(**self.placements[i % len(self.placements)]).remote()
                for i in range(len(self.actors), min(count, len(self.actors) + 4))  # 4 at a time: 2 cores
            ]
            ray.get([a.__ray_ready__.remote() for a in batch], timeout=600)
            self.actors += batch
        return self.actors[:count]


# -- one configuration --------------------------------------------------------------------------
def measure(
    pool: RankPool,
    master_options: dict[str, Any],
    storage: str,
    mode: str,
    world_size: int,
    per_rank_bytes: int,
    repeats: int,
) -> dict[str, Any]:
    """A fresh checkpointer; one warm-up save, then ``repeats`` timed saves; the last one verified."""
    run = f"scale-{mode}-{world_size}-{per_rank_bytes}-{uuid.uuid4().hex[:6]}"
    config = CheckpointConfig(
        storage_uri=storage,
        run_name=run,
        write_mode=mode,
        metric_name="loss",
        max_shard_size="64MB",
        keep_last_n=2,
        save_timeout_s=600.0,
    )
    handle = ray_ckpt.start_checkpointer(config, namespace=NAMESPACE, **master_options)
    try:
        ranks = pool.take(world_size)
        ray.get([r.connect.remote(run, i, world_size, per_rank_bytes) for i, r in enumerate(ranks)], timeout=600)
        ray.get([r.save.remote(0) for r in ranks], timeout=600)  # warm-up: first-call costs, directories
        commits, returns, loads = [], [], []
        idle = proc_stats(handle.actor, reset_peak=True)  # after the warm-up: the peak is the saves' own
        cpu_before = idle["cpu_s"]
        for step in range(1, repeats + 1):
            loads.append(os.getloadavg()[0])
            started = time.perf_counter()
            results = ray.get([r.save.remote(step) for r in ranks], timeout=600)
            commits.append(time.perf_counter() - started)
            returns.append(max(ret for ret, _ in results))
        after = proc_stats(handle.actor)
        store = CheckpointStore(config=config)
        loaded = store.load(repeats)
        expected = expected_state(world_size, per_rank_bytes, repeats)
        ok = loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
        if not ok:
            raise AssertionError(f"{run}: step {repeats} does not load back as saved")
        manifest = store.read_manifest(repeats)
        marker = store.storage.read_bytes(f"{step_dir(repeats)}/checkpoint.json")
        index_name = manifest.model.get("index", "")
        index_bytes = manifest.files[index_name].size if index_name in manifest.files else 0
        total = sum(t.numel() * t.element_size() for t in expected.values())
    finally:
        handle.shutdown()
    return {
        "mode": mode,
        "world_size": world_size,
        "per_rank_bytes": per_rank_bytes,
        "checkpoint_bytes": total,
        "files": len(manifest.files),
        "commit_s": commits,
        "commit_p50_s": statistics.median(commits),
        "commit_min_s": min(commits),
        "save_return_p50_s": statistics.median(returns),
        "master_cpu_s_per_commit": (after["cpu_s"] - cpu_before) / repeats,
        "master_idle_rss_mb": idle["VmRSS"],
        "master_peak_rss_mb": after["VmHWM"],
        "master_peak_delta_mb": after["VmHWM"] - idle["VmRSS"],
        "master_rss_shmem_mb": after.get("RssShmem", 0.0),
        "master_anon_delta_mb": after.get("RssAnon", 0.0) - idle.get("RssAnon", 0.0),
        "manifest_bytes": len(marker),
        "hf_index_bytes": index_bytes,
        "report_bytes_per_rank": report_bytes(0, world_size, per_rank_bytes),
        "load_1m": loads,
    }


def simulate(
    master_options: dict[str, Any], storage: str, mode: str, world: int, tensors: int = 4, steps: int = 3
) -> dict[str, Any]:
    """``world`` ranks simulated by this driver (calls only, no rank processes): the master's own cost.

    Every rank's calls are in flight at once, as with real ranks; the ranks' own work (ray.put,
    writing their shards in direct mode) happens outside the timed part, so the latency is the
    master's: accept/plan ``world`` calls, merge, fetch (gather) or stat (direct) and commit.
    """
    run = f"sim-{mode}-{world}-{uuid.uuid4().hex[:6]}"
    config = CheckpointConfig(
        storage_uri=storage, run_name=run, write_mode=mode, max_shard_size="64MB", keep_last_n=2, save_timeout_s=600.0
    )
    handle = ray_ckpt.start_checkpointer(config, namespace=NAMESPACE, **master_options)
    actor = handle.actor
    flats = {
        r: flatten_state({f"layers.{r}.{i}.weight": torch.full((1024,), float(r)) for i in range(tensors)})
        for r in range(world)
    }
    metas = {
        r: RankState({k: TensorMeta(b.dtype, tuple(b.shape), b.nbytes) for k, b in f.tensors.items()})
        for r, f in flats.items()
    }
    store = CheckpointStore(config=config)
    latencies, cpus, loads = [], [], []
    try:
        for step in range(steps + 1):  # step 0 warms up
            stats = proc_stats(actor, reset_peak=True)
            loads.append(os.getloadavg()[0])
            if mode == "gather":
                refs = {r: ray.put({k: b.data for k, b in f.tensors.items()}) for r, f in flats.items()}
                started = time.perf_counter()
                accepted = [
                    actor.report.remote(step, RankReport(r, world, metas[r], model_ref=[refs[r]])) for r in range(world)
                ]
                waits = [actor.wait_committed.remote(step) for _ in range(world)]
                ray.get(accepted + waits, timeout=600)
                elapsed = time.perf_counter() - started
            else:
                started = time.perf_counter()
                joins = [actor.plan.remote(step, RankReport(r, world, metas[r]), False, "direct") for r in range(world)]
                plans = ray.get(joins, timeout=600)
                planned = time.perf_counter()
                results = []
                for r, plan in enumerate(plans):  # the ranks' own (parallel) work: not timed
                    files = write_share(store.storage, plan, r, lambda p, k, _, f=flats[r]: f.tensors[k].data)
                    results.append(RankResult(r, files=files))
                resumed = time.perf_counter()
                done = [actor.finish_rank.remote(step, res) for res in results]
                waits = [actor.wait_committed.remote(step) for _ in range(world)]
                ray.get(done + waits, timeout=600)
                elapsed = (planned - started) + (time.perf_counter() - resumed)
            after = proc_stats(actor)
            if step:
                latencies.append(elapsed)
                cpus.append(after["cpu_s"] - stats["cpu_s"])
        manifest = store.read_manifest(steps)
        marker = store.storage.read_bytes(f"{step_dir(steps)}/checkpoint.json")
        if len(manifest.files) < world:
            raise AssertionError(f"{run}: {len(manifest.files)} files for {world} ranks")
    finally:
        handle.shutdown()
    return {
        "mode": mode,
        "world_size": world,
        "tensors_per_rank": tensors,
        "files": len(manifest.files),
        "commit_s": latencies,
        "commit_min_s": min(latencies),
        "commit_p50_s": statistics.median(latencies),
        "master_cpu_s_per_commit": statistics.median(cpus),
        "master_peak_delta_mb": after["VmHWM"] - stats["VmRSS"],
        "manifest_bytes": len(marker),
        "load_1m": loads,
    }


def simulated_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | ranks (simulated) | files | commit p50 s | commit min s | master CPU s/commit | master CPU ms/rank "
        "| master peak Δ MB | manifest KB | load 1m |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['world_size']} | {r['files']} | {r['commit_p50_s']:.3f} | {r['commit_min_s']:.3f} "
            f"| {r['master_cpu_s_per_commit']:.3f} | {r['master_cpu_s_per_commit'] / r['world_size'] * 1e3:.2f} "
            f"| {r['master_peak_delta_mb']:.0f} | {r['manifest_bytes'] / 1e3:.1f} "
            f"| {statistics.median(r['load_1m']):.1f} |"
        )
    return "\n".join(lines)


def metadata_projection(ranks: int, tensors_per_rank: int, bytes_per_rank: int, max_shard_size: int) -> dict[str, Any]:
    """The master's direct-mode metadata work for a big job, in-process (no Ray, no I/O), best of 3.

    ``ranks`` RankStates of ``tensors_per_rank`` tensors (plus 2 replicated keys every rank holds):
    merge them (ownership, replica checks), plan the shards, build the HF index and the commit
    marker; and the pickled size of what each rank sends (report) and gets back (its plan).
    """
    tensor_bytes = bytes_per_rank // tensors_per_rank
    states = {}
    for rank in range(ranks):
        tensors = {
            f"model.layers.{rank}.mlp.experts.{i}.down_proj.weight": TensorMeta(
                "BF16", (tensor_bytes // 2,), tensor_bytes, f"{rank:08x}{i:08x}"
            )
            for i in range(tensors_per_rank)
        }
        tensors["model.embed_tokens.weight"] = TensorMeta("BF16", (1024, 1024), 2 << 20, "e" * 16)
        tensors["model.norm.weight"] = TensorMeta("BF16", (1024,), 2048, "f" * 16)
        states[rank] = RankState(tensors)
    timings: dict[str, list[float]] = {"merge": [], "plan": [], "hf_index": [], "manifest": []}
    for _ in range(3):
        started = time.perf_counter()  # merge + plan are one planner call now: both columns show it
        plan = plan_save(
            1, {r: {MODEL: st} for r, st in states.items()}, directory="d", mode="direct", max_shard_size=max_shard_size
        )
        share = plan.share(1)
        timings["merge"].append(time.perf_counter() - started)
        timings["plan"].append(timings["merge"][-1])
        model = plan.parts[MODEL]
        shards = [ShardSpec(f.name, list(f.keys)) for f in model.files]
        total = model.total_size
        started = time.perf_counter()
        hf_index = hf_index_bytes(shards, total)
        timings["hf_index"].append(time.perf_counter() - started)
        started = time.perf_counter()
        files = {s.name: FileDigest(max_shard_size, "0123456789abcdef") for s in shards}
        manifest = Manifest(1, time.time(), {"loss": 1.0}, ranks, {}, files, {"total_size": total}, True)
        marker = manifest.to_json_bytes()
        timings["manifest"].append(time.perf_counter() - started)
    return {
        "ranks": ranks,
        "tensors_per_rank": tensors_per_rank,
        "bytes_per_rank": bytes_per_rank,
        "checkpoint_bytes": total,
        "shards": len(shards),
        "report_bytes_per_rank": len(pickle.dumps(RankReport(1, ranks, states[1]))),
        "plan_bytes_per_rank": len(pickle.dumps(share)),
        "hf_index_bytes": len(hf_index),
        "manifest_bytes": len(marker),
        **{f"{name}_s": min(values) for name, values in timings.items()},
    }


def projection_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| ranks | tensors/rank | GB/rank | checkpoint TB | shards | report KB/rank | plan KB/rank | HF index MB "
        "| manifest KB | merge s | plan s | HF index s | manifest s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['tensors_per_rank']} | {r['bytes_per_rank'] / 1e9:.0f} "
            f"| {r['checkpoint_bytes'] / 1e12:.2f} "
            f"| {r['shards']} | {r['report_bytes_per_rank'] / 1e3:.1f} | {r['plan_bytes_per_rank'] / 1e3:.1f} "
            f"| {r['hf_index_bytes'] / 1e6:.2f} | {r['manifest_bytes'] / 1e3:.0f} | {r['merge_s']:.3f} "
            f"| {r['plan_s']:.3f} | {r['hf_index_s']:.3f} | {r['manifest_s']:.3f} |"
        )
    return "\n".join(lines)


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return slope, my - slope * mx


# -- report -------------------------------------------------------------------------------------
def world_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | ranks | MB | commit p50 s | commit min s | save() returns p50 ms | master CPU s/commit "
        "| master peak RSS MB (Δ over warm idle) | master anon Δ MB | master shm MB | manifest KB | report B/rank "
        "| files | load 1m |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['world_size']} | {r['checkpoint_bytes'] / MB:.1f} | {r['commit_p50_s']:.3f} "
            f"| {r['commit_min_s']:.3f} | {r['save_return_p50_s'] * 1e3:.1f} | {r['master_cpu_s_per_commit']:.3f} "
            f"| {r['master_peak_rss_mb']:.0f} (+{r['master_peak_delta_mb']:.0f}) | {r['master_anon_delta_mb']:.0f} "
            f"| {r['master_rss_shmem_mb']:.0f} "
            f"| {r['manifest_bytes'] / 1e3:.1f} | {r['report_bytes_per_rank']} | {r['files']} "
            f"| {statistics.median(r['load_1m']):.1f} |"
        )
    return "\n".join(lines)


def bytes_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | ranks | MB/rank | MB | commit p50 s | commit min s | GB/s (min) | master CPU s/commit "
        "| master peak Δ MB | master anon Δ MB | master shm MB | load 1m |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gbps = r["checkpoint_bytes"] / r["commit_min_s"] / 1e9
        lines.append(
            f"| {r['mode']} | {r['world_size']} | {r['per_rank_bytes'] / MB:.0f} | {r['checkpoint_bytes'] / MB:.0f} "
            f"| {r['commit_p50_s']:.3f} | {r['commit_min_s']:.3f} | {gbps:.2f} | {r['master_cpu_s_per_commit']:.3f} "
            f"| {r['master_peak_delta_mb']:.0f} | {r['master_anon_delta_mb']:.0f} | {r['master_rss_shmem_mb']:.0f} "
            f"| {statistics.median(r['load_1m']):.1f} |"
        )
    return "\n".join(lines)


def fits_table(world: list[dict[str, Any]], sized: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines = [
        "| mode | per rank: ms/rank (fit, min) | master CPU ms/rank | fixed s | per byte: s/GB (fit, min) "
        "| master CPU s/GB | master peak MB/GB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    fits: dict[str, Any] = {}
    for mode in ("gather", "direct"):
        w = [r for r in world if r["mode"] == mode]
        s = [r for r in sized if r["mode"] == mode]
        if not w or not s:
            continue
        per_rank, fixed = fit([r["world_size"] for r in w], [r["commit_min_s"] for r in w])
        cpu_rank, _ = fit([r["world_size"] for r in w], [r["master_cpu_s_per_commit"] for r in w])
        gbs = [r["checkpoint_bytes"] / 1e9 for r in s]
        per_gb, _ = fit(gbs, [r["commit_min_s"] for r in s])
        cpu_gb, _ = fit(gbs, [r["master_cpu_s_per_commit"] for r in s])
        mem_gb, _ = fit(gbs, [r["master_peak_delta_mb"] for r in s])
        fits[mode] = {
            "s_per_rank": per_rank,
            "fixed_s": fixed,
            "master_cpu_s_per_rank": cpu_rank,
            "s_per_gb": per_gb,
            "master_cpu_s_per_gb": cpu_gb,
            "master_peak_mb_per_gb": mem_gb,
        }
        lines.append(
            f"| {mode} | {per_rank * 1e3:.1f} | {cpu_rank * 1e3:.2f} | {fixed:.3f} | {per_gb:.2f} | {cpu_gb:.2f} "
            f"| {mem_gb:.0f} |"
        )
    return "\n".join(lines), fits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="world sizes up to 8, two byte sizes, 2 repeats")
    p.add_argument("--nodes", type=int, default=0, help="rank nodes of a local multi-node Cluster (0: one node)")
    p.add_argument("--world-sizes", default="1,2,4,8,16,32")
    p.add_argument("--rank-bytes", type=float, default=1.0, help="MB per rank in the world-size sweep")
    p.add_argument("--bytes-world-size", type=int, default=4, help="ranks in the per-byte sweep")
    p.add_argument("--bytes-per-rank", default="1,8,32,64", help="MB per rank in the per-byte sweep")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--storage", default=None, help="storage URI (default: a temp dir, removed afterwards)")
    p.add_argument("--out", default="bench_out/scaling.json")
    p.add_argument("--project-ranks", default="32,1000", help="rank counts of the in-process metadata projection")
    p.add_argument("--project-tensors", type=int, default=300, help="tensors per rank in the projection")
    p.add_argument("--project-gb", type=float, default=10.0, help="GB per rank in the projection")
    p.add_argument("--projection-only", action="store_true", help="only the in-process metadata projection")
    p.add_argument("--simulate", default="32,128,512,1000,2000", help="simulated rank counts ('' to skip)")
    p.add_argument("--simulate-only", action="store_true", help="only the simulated-ranks sweep")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both sweeps; print the tables; write the JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    world_sizes = [int(x) for x in args.world_sizes.split(",")]
    sizes = [int(float(x) * MB) for x in args.bytes_per_rank.split(",")]
    repeats = args.repeats
    if args.quick:
        world_sizes, sizes, repeats = [w for w in world_sizes if w <= 8], sizes[:2], min(repeats, 2)
    projection = [
        metadata_projection(int(n), args.project_tensors, int(args.project_gb * 1e9), 5 * 10**9)
        for n in args.project_ranks.split(",")
    ]
    if args.projection_only:
        print("\n## Master metadata work in direct mode (in-process projection, 5 GB shards)\n")
        print(projection_table(projection))
        return {"projection": projection}
    workdir = args.storage or tempfile.mkdtemp(prefix="ray-ckpt-scaling-")
    object_store = max(512 << 20, int(3 * args.bytes_world_size * max(sizes)))
    world: list[dict[str, Any]] = []
    sized: list[dict[str, Any]] = []
    simulated: list[dict[str, Any]] = []
    sim_sizes = [int(x) for x in args.simulate.split(",") if x]
    if args.quick:
        sim_sizes = [n for n in sim_sizes if n <= 128]
    started = time.time()
    try:
        with ray_backend(args.nodes, object_store) as (master_options, placements):
            for mode in ("gather", "direct"):
                for n in sim_sizes:
                    row = simulate(master_options, workdir, mode, n)
                    logger.info("simulated %s ranks=%d commit p50 %.3fs", mode, n, row["commit_p50_s"])
                    simulated.append(row)
            pool = RankPool(placements)
            for mode in () if args.simulate_only else ("gather", "direct"):
                for ws in world_sizes:
                    row = measure(pool, master_options, workdir, mode, ws, int(args.rank_bytes * MB), repeats)
                    logger.info("world %s ws=%d commit p50 %.3fs", mode, ws, row["commit_p50_s"])
                    world.append(row)
                for size in sizes:
                    row = measure(pool, master_options, workdir, mode, args.bytes_world_size, size, repeats)
                    logger.info("bytes %s %d MB/rank commit p50 %.3fs", mode, size // MB, row["commit_p50_s"])
                    sized.append(row)
    finally:
        if args.storage is None:
            shutil.rmtree(workdir, ignore_errors=True)
    fits_md, fits = fits_table(world, sized)
    document = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "ray": ray.__version__,
            "torch": torch.__version__,
            "nodes": args.nodes,
            "storage": "local disk (temp dir)" if args.storage is None else args.storage,
        },
        "started": started,
        "seconds": time.time() - started,
        "world_sweep": world,
        "bytes_sweep": sized,
        "fits": fits,
        "projection": projection,
        "simulated": simulated,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(document, f, indent=2)
    layout = "one node" if args.nodes <= 0 else f"{args.nodes + 1} nodes (master on its own node)"
    print(f"\n## The master alone: ranks simulated by the driver ({layout}, 4 tensors of 4 KB per rank)\n")
    print(simulated_table(simulated))
    if world:
        print(f"\n## Commit latency and master cost vs world size ({layout}, {args.rank_bytes:g} MB/rank)\n")
        print(world_table(world))
        print(f"\n## Per-byte cost ({args.bytes_world_size} ranks)\n")
        print(bytes_table(sized))
        print("\n## Fitted costs (from the min of each configuration)\n")
        print(fits_md)
    print("\n## Master metadata work in direct mode (in-process projection, 5 GB shards)\n")
    print(projection_table(projection))
    print(f"\n{os.cpu_count()} CPUs, {layout}; JSON: {args.out}; {document['seconds']:.0f}s")
    return document


if __name__ == "__main__":
    main()
