"""Cases that need Ray: end-to-end saves from 2 worker actors through the checkpointer (gather and
direct) and Ray Train's own checkpointing of the same state (the anchor), the time an async save
blocks the training loop, the gather transport against pickled torch tensors, the checkpointer's
memory growth during a save, and top_k latency under concurrent eval load.

Ray runs locally inside the benchmark process (``start_ray``); actors are defined here and imported
by the Ray workers through PYTHONPATH.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import threading
import time
import uuid
from typing import Any

import ray

from benchmarks.measure import (
    CaseResult,
    fsync_file,
    make_state_dict,
    percentile,
    rank_indices,
    state_nbytes,
    throughput_case,
)
from ray_ckpt import CheckpointConfig, CheckpointStore, start_checkpointer
from ray_ckpt.core.format.tree import flatten_state
from ray_ckpt.distributed.eval import EvalClient
from ray_ckpt.distributed.worker import WorkerClient

logger = logging.getLogger(__name__)

NAMESPACE = "ray_ckpt_bench"
WORLD_SIZE = 2


def start_ray(state_bytes: int, num_cpus: int = 4) -> None:
    """A private local Ray for the run: a few logical CPUs, an object store of ~4x the state."""
    if ray.is_initialized():
        return
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(
        address="local",
        num_cpus=num_cpus,
        namespace=NAMESPACE,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        object_store_memory=max(512 << 20, 4 * state_bytes),
        runtime_env={"env_vars": {"PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", "")}},
    )


@ray.remote(num_cpus=0)
class BenchWorker:
    """A training rank holding its half of the benchmark state dict, with a WorkerClient per run."""

    def __init__(self, runs: dict[str, str], rank: int, total_bytes: int, tensors: int) -> None:
        self.rank = rank
        self.state = make_state_dict(total_bytes, tensors, indices=rank_indices(tensors, rank, WORLD_SIZE))
        self.clients = {mode: WorkerClient(run, rank, WORLD_SIZE, namespace=NAMESPACE) for mode, run in runs.items()}

    def nbytes(self) -> int:
        return state_nbytes(self.state)

    def save(self, mode: str, step: int, blocking: bool) -> tuple[float, float]:
        """One save of this rank's state: (seconds until save() returned, seconds until committed)."""
        started = time.perf_counter()
        future = self.clients[mode].save(step, self.state, metrics={"loss": 1.0 / (step + 1)}, blocking=blocking)
        returned = time.perf_counter()
        future.result()
        return returned - started, time.perf_counter() - started

    def send_gather(self, sink: Any) -> float:
        """Hand the state to ``sink`` the way gather mode does: uint8 numpy views through ray.put."""
        started = time.perf_counter()
        flat = flatten_state(self.state)
        ref = ray.put({k: b.data for k, b in flat.tensors.items()})
        received = ray.get(sink.take_refs.remote([ref]))
        elapsed = time.perf_counter() - started
        del ref
        assert received == self.nbytes()
        return elapsed

    def send_pickled(self, sink: Any) -> float:
        """Hand the state to ``sink`` as torch tensors in a Ray call (Ray pickles them)."""
        started = time.perf_counter()
        received = ray.get(sink.take_tensors.remote(self.state))
        elapsed = time.perf_counter() - started
        assert received == self.nbytes()
        return elapsed


@ray.remote(num_cpus=0)
class Sink:
    """The receiving end of the transport comparison (stands where the checkpointer stands)."""

    def take_refs(self, refs: list[Any]) -> int:
        arrays = ray.get(refs[0])
        return sum(int(a.nbytes) for a in arrays.values())

    def take_tensors(self, tensors: dict[str, Any]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors.values())


@ray.remote(num_cpus=0)
class EvalProbe:
    """An evaluation actor that polls top_k and records the latency it sees.

    ``EvalClient.top_k`` (answered from the client's live index copy) or, with ``direct``, a
    call to the checkpointer actor (a Ray round trip per query).
    """

    def __init__(self, run_name: str) -> None:
        self.client = EvalClient(run_name, NAMESPACE)
        self.direct = EvalClient(run_name, NAMESPACE, follow_index=False)

    def ready(self) -> bool:
        return self.client.follower() is not None

    def run(self, start_at: float, duration_s: float, interval_s: float, k: int, direct: bool = False) -> list[float]:
        client = self.direct if direct else self.client
        while time.time() < start_at:
            time.sleep(0.005)
        latencies: list[float] = []
        while time.time() < start_at + duration_s:
            began = time.perf_counter()
            client.top_k(k)
            latencies.append(time.perf_counter() - began)
            if interval_s:
                time.sleep(interval_s)
        return latencies


def _proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile, RssShmem)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class ProcSampler:
    """Samples a process's memory (``read(pid)``: /proc status fields by default) every few ms on a
    thread; keeps the peak of each field."""

    def __init__(self, pid: int, interval_s: float = 0.002, read: Any = None) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.read = read or _proc_status
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.read(self.pid).items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            self.samples += 1
            time.sleep(self.interval_s)

    def __enter__(self) -> ProcSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


class RayBench:
    """The Ray side of a benchmark run: two checkpointers (gather, direct) and two worker ranks."""

    def __init__(self, workdir: str, total_bytes: int, tensors: int) -> None:
        self.total_bytes = total_bytes
        suffix = uuid.uuid4().hex[:8]
        self.runs = {"gather": f"bench-gather-{suffix}", "direct": f"bench-direct-{suffix}"}
        self.handles = {
            mode: start_checkpointer(
                CheckpointConfig(
                    storage_uri=os.path.join(workdir, "ray_runs"),
                    run_name=run,
                    write_mode=mode,
                    metric_name="loss",
                    max_pending_saves=2,
                ),
                namespace=NAMESPACE,
            )
            for mode, run in self.runs.items()
        }
        self.workers = [BenchWorker.remote(self.runs, rank, total_bytes, tensors) for rank in range(WORLD_SIZE)]
        self.nbytes = sum(ray.get([w.nbytes.remote() for w in self.workers]))
        self.steps = {mode: 0 for mode in self.runs}
        self.stores = {mode: CheckpointStore(config=h.config) for mode, h in self.handles.items()}

    def cleanup(self, mode: str) -> None:
        """Delete every step but the latest, untimed (no retention inside the timed saves), and resync the actor."""
        store = self.stores[mode]
        for info in store.list()[:-1]:
            store.delete(info.step)
        ray.get(self.handles[mode].actor.refresh.remote())

    def next_step(self, mode: str) -> int:
        self.steps[mode] += 1
        return self.steps[mode]

    def save_all(self, mode: str, blocking: bool = True) -> tuple[float, list[tuple[float, float]]]:
        """Both ranks save one step at once; (driver wall seconds, per-rank (returned, committed) seconds)."""
        step = self.next_step(mode)
        os.sync()
        started = time.perf_counter()
        per_rank = ray.get([w.save.remote(mode, step, blocking) for w in self.workers])
        elapsed = time.perf_counter() - started
        self.cleanup(mode)
        return elapsed, per_rank

    # -- cases --------------------------------------------------------------------------------
    def end_to_end(self, repeat: int) -> list[CaseResult]:
        """Blocking saves from both ranks through the checkpointer, gather and direct interleaved."""
        for mode in self.runs:  # warm-up: actors, imports, first directories
            self.save_all(mode)
        times: dict[str, list[float]] = {mode: [] for mode in self.runs}
        for _ in range(repeat):
            for mode in self.runs:
                times[mode].append(self.save_all(mode)[0])
                logger.info("e2e %s: %.3fs (load %.2f)", mode, times[mode][-1], os.getloadavg()[0])
        what = {
            "gather": "2 worker actors -> object store -> checkpointer writes shards, commits",
            "direct": "2 worker actors write their own shards, checkpointer commits",
        }
        return [
            throughput_case(
                f"e2e_{mode}_save",
                "ray",
                f"{what[mode]} (blocking save; old steps deleted untimed)",
                self.nbytes,
                times[mode],
            )
            for mode in self.runs
        ]

    def async_blocked(self, repeat: int) -> list[CaseResult]:
        """Seconds save(blocking=False) holds the training loop vs a blocking save, per mode."""
        results = []
        for mode in self.runs:
            blocked: list[float] = []
            synced: list[float] = []
            for _ in range(repeat):
                synced.append(self.save_all(mode, blocking=True)[0])
                _, per_rank = self.save_all(mode, blocking=False)
                blocked.append(max(r[0] for r in per_rank))  # the step waits for the slowest rank
            b, s = min(blocked), min(synced)
            results.append(
                CaseResult(
                    f"async_{mode}_blocked",
                    "ray",
                    f"{mode} mode: seconds save(blocking=False) blocks the loop vs a blocking save",
                    metrics={"blocked_seconds": b, "sync_seconds": s, "ratio": b / s},
                    runs=blocked,
                    extra={"sync_runs": synced},
                )
            )
        return results

    def transport(self, repeat: int) -> list[CaseResult]:
        """Rank 0's half of the state to another actor: numpy views via ray.put vs pickled torch tensors."""
        sink = Sink.remote()
        worker = self.workers[0]
        nbytes = ray.get(worker.nbytes.remote())
        ray.get(worker.send_gather.remote(sink))  # warm-up
        gather: list[float] = []
        pickled: list[float] = []
        for _ in range(repeat):
            gather.append(ray.get(worker.send_gather.remote(sink)))
            pickled.append(ray.get(worker.send_pickled.remote(sink)))
        ray.kill(sink)
        return [
            throughput_case(
                "gather_transfer",
                "ray",
                "uint8 numpy views: ray.put by the rank, zero-copy get by the receiver",
                nbytes,
                gather,
            ),
            throughput_case(
                "pickled_transfer",
                "ray",
                "torch tensors as Ray call arguments (pickled, copied on both ends)",
                nbytes,
                pickled,
            ),
        ]

    def checkpointer_rss(self) -> CaseResult:
        """Memory growth of the gather-mode checkpointer process while it writes one step."""
        handle = self.handles["gather"]
        pid = ray.get(handle.actor.__ray_call__.remote(lambda self: os.getpid()))
        self.save_all("gather")  # a warm process: first-save imports and allocations are not per-save cost
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5\n")  # reset VmHWM to the current RSS
            hwm_reset = True
        except OSError:
            hwm_reset = False
        before = _proc_status(pid)
        with ProcSampler(pid) as sampler:
            self.save_all("gather")
        after = _proc_status(pid)
        growth = {
            k: max(0, sampler.peak.get(k, 0) - before.get(k, 0)) for k in ("VmRSS", "RssAnon", "RssShmem", "RssFile")
        }
        limit = 0.10 * self.nbytes + 64e6
        return CaseResult(
            "checkpointer_rss",
            "ray",
            "peak private (RssAnon) growth of the checkpointer process during a gather save",
            metrics={
                "peak_private_growth_mb": max(growth["RssAnon"], 1) / 1e6,
                "limit_mb": limit / 1e6,
                "peak_rss_growth_mb": max(growth["VmRSS"], 1) / 1e6,
            },
            extra={
                "pid": pid,
                "how": "/proc/<pid>/status sampled every 2 ms from the driver; VmHWM reset via clear_refs=5"
                if hwm_reset
                else "/proc/<pid>/status sampled every 2 ms from the driver (VmHWM could not be reset)",
                "growth_bytes": growth,
                "before": before,
                "after": after,
                "vmhwm_growth_bytes": after.get("VmHWM", 0) - before.get("VmRSS", 0),
                "samples": sampler.samples,
                "checkpoint_bytes": self.nbytes,
                "note": "RssShmem is plasma (object store) pages the actor maps to read the ranks' buffers; "
                "they belong to the object store, shared, not a private copy",
            },
        )

    def topk_under_load(self, actors: int, duration_s: float, interval_s: float, k: int = 5) -> CaseResult:
        """top_k latency seen by ``actors`` eval actors polling while gather saves run back to back."""
        run = self.runs["gather"]
        started = time.perf_counter()
        probes = [EvalProbe.remote(run) for _ in range(actors)]
        ray.get([p.ready.remote() for p in probes])
        startup = time.perf_counter() - started

        def during_saves(direct: bool) -> tuple[list[float], int]:
            start_at = time.time() + 1.0
            pending = [p.run.remote(start_at, duration_s, interval_s, k, direct) for p in probes]
            saves = 0
            while time.time() < start_at:
                time.sleep(0.01)
            while time.time() < start_at + duration_s:
                self.save_all("gather")
                saves += 1
            return [x for lat in ray.get(pending) for x in lat], saves

        def idle(direct: bool) -> list[float]:
            idle_at = time.time() + 0.5
            runs = [p.run.remote(idle_at, min(duration_s, 3.0), interval_s, k, direct) for p in probes]
            return [x for lat in ray.get(runs) for x in lat]

        latencies, saves = during_saves(direct=False)
        actor_latencies, actor_saves = during_saves(direct=True)
        idle_latencies, idle_actor = idle(direct=False), idle(direct=True)
        for p in probes:
            ray.kill(p)
        return CaseResult(
            "topk_concurrent",
            "ray",
            f"EvalClient.top_k({k}) in {actors} eval actors (one query per {interval_s * 1e3:.0f} ms each, "
            "answered from each client's live index copy) while saves run",
            metrics={
                "p50_ms": percentile(latencies, 50) * 1e3,
                "p99_ms": percentile(latencies, 99) * 1e3,
                "queries": float(len(latencies)),
                "saves_during": float(max(saves, 1)),
            },
            extra={
                "actors": actors,
                "interval_s": interval_s,
                "max_ms": max(latencies) * 1e3,
                "idle_p50_ms": percentile(idle_latencies, 50) * 1e3,
                "idle_p99_ms": percentile(idle_latencies, 99) * 1e3,
                "actor_call_p50_ms": percentile(actor_latencies, 50) * 1e3,
                "actor_call_p99_ms": percentile(actor_latencies, 99) * 1e3,
                "actor_call_max_ms": max(actor_latencies) * 1e3,
                "actor_call_saves_during": actor_saves,
                "actor_call_idle_p50_ms": percentile(idle_actor, 50) * 1e3,
                "actor_call_idle_p99_ms": percentile(idle_actor, 99) * 1e3,
                "probe_startup_s": startup,
                "qps": len(latencies) / duration_s,
            },
        )

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        for handle in self.handles.values():
            handle.shutdown()


def _ray_train_loop(config: dict[str, Any]) -> None:
    """A Ray Train worker saving its half of the state the way Ray Train documents it, once per round:
    ``torch.save`` into a temporary directory, ``ray.train.report(checkpoint=Checkpoint.from_directory())``
    (Ray copies it into the run's storage before report returns), then an fsync of the copy Ray
    wrote, so it is as durable as ray-ckpt's save. Rank 0 writes the per-round wall times to a file."""
    import tempfile

    import ray.train
    import torch
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    state = make_state_dict(
        config["total_bytes"], config["tensors"], indices=rank_indices(config["tensors"], rank, WORLD_SIZE)
    )
    times: dict[str, list[float]] = {"total": [], "torch_save": [], "report": []}
    for index in range(config["rounds"]):
        name = f"checkpoint_{index:06d}"
        if rank == 0:
            os.sync()
        dist.barrier()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=config["local_dir"]) as local:
            torch.save(state, os.path.join(local, f"model-rank{rank}.pt"))
            saved = time.perf_counter()
            ray.train.report(
                {"round": index}, checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=name
            )
            reported = time.perf_counter()
        persisted = os.path.join(config["experiment_dir"], name)
        fsync_file(os.path.join(persisted, f"model-rank{rank}.pt"))
        fsync_file(persisted)
        dist.barrier()
        times["total"].append(time.perf_counter() - started)
        times["torch_save"].append(saved - started)
        times["report"].append(reported - saved)
        if rank == 0 and index:  # old checkpoints deleted untimed, as in the ray-ckpt cases
            shutil.rmtree(os.path.join(config["experiment_dir"], f"checkpoint_{index - 1:06d}"), ignore_errors=True)
    if rank == 0:  # Train V2's Result keeps only the metrics reported with a checkpoint: a file
        with open(config["times_file"], "w") as f:
            json.dump(times, f)


def ray_train_save(workdir: str, total_bytes: int, tensors: int, repeat: int, nbytes: int) -> CaseResult:
    """Ray Train's own checkpointing of the same state to the same disk: a 2-worker TorchTrainer
    (gloo, CPU) whose workers torch.save their halves and report them (one warm-up round)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    name = f"bench-train-{uuid.uuid4().hex[:8]}"
    storage = os.path.join(workdir, "ray_train")
    local_dir = os.path.join(workdir, "ray_train_local")
    os.makedirs(local_dir, exist_ok=True)
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "total_bytes": total_bytes,
            "tensors": tensors,
            "rounds": repeat + 1,
            "local_dir": local_dir,
            "experiment_dir": os.path.join(storage, name),
            "times_file": os.path.join(workdir, f"{name}.json"),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=WORLD_SIZE, use_gpu=False),
        run_config=ray.train.RunConfig(name=name, storage_path=storage),
    )
    trainer.fit()
    with open(os.path.join(workdir, f"{name}.json")) as f:
        times = {part: list(runs)[1:] for part, runs in json.load(f).items()}  # round 0: the warm-up
    shutil.rmtree(os.path.join(storage, name), ignore_errors=True)
    return throughput_case(
        "ray_train_save",
        "ray",
        "Ray Train: 2 TorchTrainer workers torch.save their halves, ray.train.report(checkpoint=...) copies "
        "them into the run's storage (same disk), fsync'd (old checkpoints deleted untimed)",
        nbytes,
        times["total"],
        # rank 0's split: its torch.save into the temporary directory, then ray.train.report
        torch_save_median_seconds=statistics.median(times["torch_save"]),
        report_median_seconds=statistics.median(times["report"]),
    )


def run_ray_cases(
    workdir: str,
    total_bytes: int,
    tensors: int,
    repeat: int,
    eval_actors: int,
    topk_duration_s: float,
    topk_interval_s: float,
) -> list[CaseResult]:
    """Every Ray case, in one Ray session."""
    start_ray(total_bytes)
    bench = RayBench(workdir, total_bytes, tensors)
    try:
        results = bench.end_to_end(repeat)
        results.append(ray_train_save(workdir, total_bytes, tensors, repeat, bench.nbytes))
        results += bench.async_blocked(repeat)
        results += bench.transport(repeat)
        results.append(bench.checkpointer_rss())
        results.append(bench.topk_under_load(eval_actors, topk_duration_s, topk_interval_s))
    finally:
        bench.shutdown()
    for result in results:
        if "gbps" in result.metrics:
            logger.info("%s: %.3f GB/s", result.name, result.metrics["gbps"])
    return results
