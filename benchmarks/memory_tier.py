"""The memory tier side by side with its anchors, in one run on a cluster of 4 raylets.

    python -m benchmarks.memory_tier [--quick] [--size-mb 1024] [--eval-size-mb 256] [--repeat 3]
                                     [--step-s 3] [--cases anchors memory] [--out bench_out/memory_tier.json]

A ``ray.cluster_utils.Cluster`` on this machine: a head (no CPUs: the driver and every run's
checkpointer, pinned there) and three worker raylets ``node_a``, ``node_b``, ``node_c`` (1 CPU and a
custom resource each, which places actors by node). Rank 0 runs on node_a, rank 1 on node_b; each
holds half of a model + Adam state (``--size-mb`` in all: weight, bias and both Adam moments of a
stack of square linear layers, fp32, random; rank r holds the r-th half of the layers). A step's
state differs from the last one (one value per rank is the step), so a load of the wrong step fails
the bit-exact check.

Anchors, measured in the same run (each the median of ``--repeat`` runs):

* ``memcpy``: each rank copies its half into preallocated buffers (a snapshot), both at once;
* ``transfer_exchange``: each rank ``ray.put``s its half (uint8 views, as gather mode does) and the
  other rank ``ray.get``s it on its node, both at once (what one replica of every rank moves);
* ``transfer_one_way``: rank 0's half from node_a to an actor on node_c (what a replacement reads);
* ``storage_save_blocking`` / ``storage_save_blocked``: ``WorkerClient.save`` on the local disk
  (memory tier off), blocking, and the time a non-blocking save holds a loop that steps every
  ``--step-s`` seconds;
* ``load_disk_cold`` / ``load_s3``: a replacement rank 1 on node_c fills its half with
  ``WorkerClient.load("latest", into=...)`` from the local disk, the step's files dropped from the
  page cache first (fsync + ``posix_fadvise(DONTNEED)``, checked with ``fincore``), and from loopback
  S3 (moto's server in a subprocess);
* ``eval_independent``: 8 evaluators (4 on node_a, 4 on node_b) ``EvalClient.load`` one step of
  ``--eval-size-mb`` persisted on loopback S3, all at once; the server counts the bytes it serves.

Memory-tier cases (``memory_replicas=1``; run when the tree has the memory tier, see
:func:`memory_tier_ready`): blocking and non-blocking saves of the same state (steps 1-17, every
10th persisted to the local disk); node_b killed after step 17 (lost work: the step a replacement
resumes from vs the newest persisted step); the replacement on node_c loads ``latest`` from memory;
``flush`` of the newest step; 8 evaluators loading a persisted-only step with ``eval_cache_bytes``.

Prints Markdown tables and writes every run to JSON. Timings on a shared machine are noisy: the
load average at the start and end is in the report.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import ray
import torch
from ray.cluster_utils import Cluster

from benchmarks import s3_cases
from benchmarks.measure import GB, load_average, rank_indices, state_nbytes, write_report
from ray_ckpt import CheckpointConfig, start_checkpointer
from ray_ckpt.core.config import MemoryOptions
from ray_ckpt.core.format.tree import flatten_state
from ray_ckpt.core.layout import MARKER_FILE, step_dir
from ray_ckpt.distributed.eval import EvalClient
from ray_ckpt.distributed.handle import CheckpointerHandle
from ray_ckpt.distributed.holder import HOLDER_PREFIX
from ray_ckpt.distributed.worker import WorkerClient
from tests.integration.multinode_scenarios import HEAD_SYSTEM_CONFIG, kill_node

logger = logging.getLogger("benchmarks.memory_tier")

NAMESPACE = "ray_ckpt_bench_memory"
WORLD_SIZE = 2
NODES = ("node_a", "node_b", "node_c")  # rank 0, rank 1, the replacement
PIN = 0.01  # a sliver of a node's custom resource places an actor there without using it up
EVALUATORS_PER_NODE = 4
PERSIST_EVERY = 10  # the memory run persists every 10th step
KILL_AT = 17  # node_b dies after this step has committed
TARGETS = {  # figure -> (comparison, goal)
    "blocked": ("<=", 1.0),
    "blocking": ("<=", 1.5),
    "recovery_s3": (">=", 5.0),
    "recovery_disk": (">=", 1.0),
    "recovery_transfer": (">=", 0.8),
    "eval_wall": ("<=", 0.4),
    "eval_copies": ("<=", 2.0),
}


def memory_tier_ready() -> bool:
    """Whether this tree has the memory tier: its config group and ``flush`` on the handle."""
    return "memory_replicas" in MemoryOptions.model_fields and hasattr(CheckpointerHandle, "flush")


# -- the state ----------------------------------------------------------------------------------
def layer_dim(total_bytes: int, layers: int) -> int:
    """The width d of ``layers`` square layers whose weights, biases and two Adam moments total ``total_bytes``."""
    per_layer = max(2, total_bytes // (4 * 3 * layers))  # fp32 values of one layer's weight + bias
    d = math.isqrt(per_layer)
    while d * d + d > per_layer:
        d -= 1
    return max(d, 1)


def half_shapes(total_bytes: int, layers: int, rank: int) -> dict[str, tuple[int, ...]]:
    """The keys and shapes rank ``rank`` holds: its layers' parameters and their Adam moments."""
    d = layer_dim(total_bytes, layers)
    shapes: dict[str, tuple[int, ...]] = {}
    for i in rank_indices(layers, rank, WORLD_SIZE):
        for param, shape in ((f"layers.{i}.weight", (d, d)), (f"layers.{i}.bias", (d,))):
            shapes[param] = shape
            shapes[f"optim.{param}.exp_avg"] = shape
            shapes[f"optim.{param}.exp_avg_sq"] = shape
    return shapes


def half_state(total_bytes: int, layers: int, rank: int, step: int | None = None) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s half of the state (random, the same on every call); ``step`` marks it as that step's."""
    state = {}
    for n, (key, shape) in enumerate(half_shapes(total_bytes, layers, rank).items()):
        gen = torch.Generator().manual_seed(1_000_003 * rank + n)
        state[key] = torch.rand(shape, generator=gen)
    if step is not None:
        mark(state, step)
    return state


def mark(state: dict[str, torch.Tensor], step: int) -> None:
    """Make ``state`` this step's: its first value is the step (an optimizer step changed it)."""
    state[min(state)].view(-1)[0] = float(step)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def _logged(name: str) -> Iterator[list[str]]:
    """The messages of INFO and above that logger ``name`` and its children log inside the block."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    handler, target = Collect(logging.INFO), logging.getLogger(name)
    level = target.level
    target.addHandler(handler)
    target.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield messages
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


# -- actors -------------------------------------------------------------------------------------
@ray.remote(num_cpus=0, max_concurrency=4)
class Rank:
    """A training rank (or, ``build=False``, a replacement that starts with zeros) and its WorkerClients."""

    def __init__(self, rank: int, total_bytes: int, layers: int, build: bool = True) -> None:
        self.rank, self.total_bytes, self.layers = rank, total_bytes, layers
        if build:
            self.state = half_state(total_bytes, layers, rank)
        else:
            self.state = {k: torch.zeros(s) for k, s in half_shapes(total_bytes, layers, rank).items()}
        self.clients: dict[str, WorkerClient] = {}
        self._copy: dict[str, torch.Tensor] | None = None

    def nbytes(self) -> int:
        return state_nbytes(self.state)

    def connect(self, run: str) -> None:
        self.clients[run] = WorkerClient(run, self.rank, WORLD_SIZE, namespace=NAMESPACE)

    def memcpy(self) -> float:
        """Seconds to copy the state into buffers allocated (and touched) before: a snapshot."""
        if self._copy is None:
            self._copy = {k: torch.zeros_like(v) for k, v in self.state.items()}
        started = time.perf_counter()
        for key, value in self.state.items():
            self._copy[key].copy_(value)
        return time.perf_counter() - started

    def drop_copy(self) -> None:
        self._copy = None

    def send(self, sink: Any) -> float:
        """Seconds until ``sink`` (an actor on another node) has this rank's half: ray.put here, ray.get there."""
        started = time.perf_counter()
        ref = ray.put({k: b.data for k, b in flatten_state(self.state).tensors.items()})
        received = ray.get(sink.take.remote([ref]))
        elapsed = time.perf_counter() - started
        del ref
        assert received == self.nbytes(), (received, self.nbytes())
        return elapsed

    def take(self, refs: list[Any]) -> int:
        arrays = ray.get(refs[0])
        return sum(int(a.nbytes) for a in arrays.values())

    def save(self, run: str, step: int, blocking: bool) -> tuple[float, float]:
        """One save of this rank's state as ``step``: (seconds until save() returned, until committed)."""
        mark(self.state, step)
        started = time.perf_counter()
        future = self.clients[run].save(step, self.state, metrics={"loss": 1.0 / step}, blocking=blocking)
        returned = time.perf_counter()
        future.result(timeout=900)
        return returned - started, time.perf_counter() - started

    def train(self, run: str, steps: list[int], step_s: float) -> list[float]:
        """A loop: ``step_s`` of compute (the accelerator's; the host idles), then a non-blocking save.

        Seconds each save held the loop; every save has committed when this returns.
        """
        client = self.clients[run]
        blocked, futures = [], []
        for step in steps:
            time.sleep(step_s)
            mark(self.state, step)
            started = time.perf_counter()
            futures.append(client.save(step, self.state, metrics={"loss": 1.0 / step}, blocking=False))
            blocked.append(time.perf_counter() - started)
        for future in futures:
            future.result(timeout=900)
        return blocked

    def load(self, run: str, verify: bool) -> dict[str, Any]:
        """Fill the state with ``load("latest", into=...)``: seconds, the step, whether it is bit-exact."""
        for value in self.state.values():
            value.zero_()  # every load really writes every byte (untimed)
        client = self.clients[run]
        with _logged("ray_ckpt") as messages:  # what the load logged (e.g. a copy it found gone)
            started = time.perf_counter()
            step = client.load("latest", into=self.state)
            seconds = time.perf_counter() - started
        out: dict[str, Any] = {"seconds": seconds, "step": step, "logged": messages[:10]}
        if verify:
            out["exact"] = same(self.state, half_state(self.total_bytes, self.layers, self.rank, step))
        return out

    def load_source(self, run: str) -> str:
        """Where the last load of ``run`` read from ("memory" or "storage")."""
        return str(self.clients[run].last_load_source)

    def save_other(self, run: str, step: int, total_bytes: int) -> float:
        """A blocking save of this rank's half of a state of ``total_bytes`` (the evaluators' step)."""
        state = half_state(total_bytes, self.layers, self.rank, step)
        started = time.perf_counter()
        self.clients[run].save(step, state, metrics={"loss": 1.0 / step}, blocking=True)
        return time.perf_counter() - started


@ray.remote(num_cpus=0)
class Evaluator:
    """An evaluation actor: loads one step with ``EvalClient.load`` at an agreed time."""

    def __init__(self, run: str) -> None:
        self.client = EvalClient(run, NAMESPACE)

    def ready(self) -> bool:
        return True

    def load(self, step: int, start_at: float, expected: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        while time.time() < start_at:
            time.sleep(0.002)
        began = time.time()
        state = self.client.load(step)
        ended = time.time()
        out = {"began": began, "ended": ended, "nbytes": state_nbytes(state)}
        if expected is not None:
            out["exact"] = same(state, expected)
        return out


# -- the cluster and storage --------------------------------------------------------------------
@contextlib.contextmanager
def local_cluster(state_bytes: int, eval_bytes: int) -> Iterator[tuple[Cluster, dict[str, Any]]]:
    """A head (0 CPUs, resource ``head``) and the three worker raylets, each with a custom resource of its name.

    Object stores: a worker node holds its rank's puts (2 saves in flight), the holder's copies (its
    own half and a peer's, 2 steps while one commits) and the evaluators' step; the head holds what a
    checkpointer gathers to persist one step.
    """
    worker_store = max(256 << 20, 4 * state_bytes + 3 * eval_bytes)
    head_store = max(256 << 20, int(2.5 * state_bytes))
    cluster: Cluster | None = None
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "resources": {"head": 1},
                "object_store_memory": head_store,
                "include_dashboard": False,
                "_system_config": HEAD_SYSTEM_CONFIG,  # a dead raylet is noticed in ~2 s
            },
        )
        nodes = {
            name: cluster.add_node(wait=False, num_cpus=1, resources={name: 1.0}, object_store_memory=worker_store)
            for name in NODES
        }
        cluster.wait_for_nodes()
        ray.init(
            address=cluster.address,
            namespace=NAMESPACE,
            logging_level="WARNING",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", "")}},
        )
        yield cluster, nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def on(node: str) -> dict[str, Any]:
    """Actor options that place an actor on ``node``."""
    return {"resources": {node: PIN}}


def drop_from_page_cache(root: str) -> int:
    """fsync and ``posix_fadvise(DONTNEED)`` every file under ``root``; the bytes still cached (``fincore``)."""
    paths = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            paths.append(path)
    if not paths or shutil.which("fincore") is None:
        return -1 if paths else 0
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *paths],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line) for line in out.split())


def served_gets(options: dict[str, Any]) -> dict[str, int]:
    """GET requests and body bytes the loopback S3 endpoint has served so far, in all and of tensor files."""
    served = s3_cases.served(options)
    get, files = served.get("GET", {}), served.get("GET *.safetensors", {})
    return {
        "requests": int(get.get("requests", 0)),
        "bytes": int(get.get("bytes", 0)),
        "tensor_file_bytes": int(files.get("bytes", 0)),
    }


def stored_tensor_bytes(options: dict[str, Any], step_uri: str) -> int:
    """Bytes of a step's tensor files on S3 (what one full read of the step fetches)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    return sum(int(size) for path, size in fs.du(step_uri, total=False).items() if path.endswith(".safetensors"))


# -- the benchmark ------------------------------------------------------------------------------
class Bench:
    """The cluster's actors, the runs started so far, and every case's runs."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster, nodes: dict[str, Any], s3: dict[str, Any]) -> None:
        self.args, self.cluster, self.nodes, self.s3 = args, cluster, nodes, s3
        self.total_bytes = args.size_mb << 20
        self.eval_bytes = args.eval_size_mb << 20
        self.workdir = args.workdir
        self.bucket = s3_cases.make_bucket(s3)
        self.suffix = uuid.uuid4().hex[:6]
        self.handles: dict[str, CheckpointerHandle] = {}
        self.cases: dict[str, dict[str, Any]] = {}
        self.ranks = [Rank.options(**on(NODES[r])).remote(r, self.total_bytes, args.layers) for r in range(WORLD_SIZE)]
        self.nbytes = sum(ray.get([r.nbytes.remote() for r in self.ranks]))
        self.replacement = Rank.options(**on(NODES[2])).remote(1, self.total_bytes, args.layers, build=False)
        self.half_bytes = ray.get(self.replacement.nbytes.remote())

    # -- bookkeeping
    def start_run(self, kind: str, storage: str, **options: Any) -> str:
        """A checkpointer on the head for a new run on ``storage`` ("disk" or "s3"); the ranks connect to it."""
        run = f"bench-{kind}-{self.suffix}"
        if storage == "s3":
            where: dict[str, Any] = {"storage_uri": f"s3://{self.bucket}/runs", "storage_options": self.s3}
        else:
            where = {"storage_uri": os.path.join(self.workdir, "runs")}
        config = CheckpointConfig(
            run_name=run, metric_name="loss", keep_last_n=2, max_pending_saves=1, save_timeout_s=900, **where, **options
        )
        self.handles[run] = start_checkpointer(config, namespace=NAMESPACE, **on("head"))
        ray.get([r.connect.remote(run) for r in self.ranks])
        return run

    def stop_run(self, run: str) -> None:
        """Shut a run's checkpointer down and end its holders (named after the run), freeing their memory."""
        self.handles.pop(run).shutdown()
        prefix = f"{HOLDER_PREFIX}{run}:"
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(prefix):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))

    def record(self, name: str, what: str, runs: list[float], nbytes: int | None = None, **extra: Any) -> None:
        """One case: every run in seconds, the median, the best; GB/s of the median when it moves ``nbytes``."""
        median = statistics.median(runs)
        case = {"what": what, "runs": runs, "median_s": median, "min_s": min(runs), "extra": extra}
        if nbytes:
            case["nbytes"] = nbytes
            case["gbps"] = nbytes / median / GB
        self.cases[name] = case
        logger.info(
            "%s: median %.3f s of %s (load %.2f)", name, median, [round(r, 3) for r in runs], os.getloadavg()[0]
        )

    def both(self, call: Callable[[Any], Any]) -> list[Any]:
        """``call`` on both ranks at once; their results."""
        return ray.get([call(r) for r in self.ranks])

    def steps_loop(self, run: str, blocking_steps: list[int]) -> list[float]:
        """Blocking saves of both ranks at once, one per step: seconds until the slower rank's committed."""
        times = []
        for step in blocking_steps:
            times.append(max(c for _, c in self.both(lambda r, step=step: r.save.remote(run, step, True))))
        return times

    def train(self, run: str, steps: list[int]) -> list[float]:
        """Both ranks' loops of non-blocking saves: per save, what the slower rank was held."""
        per_rank = self.both(lambda r: r.train.remote(run, steps, self.args.step_s))
        return [max(b) for b in zip(*per_rank, strict=True)]

    # -- anchors
    def memcpy(self) -> None:
        self.both(lambda r: r.memcpy.remote())  # allocates and touches the buffers
        runs = [max(self.both(lambda r: r.memcpy.remote())) for _ in range(self.args.repeat)]
        self.both(lambda r: r.drop_copy.remote())
        self.record("memcpy", "each rank copies its half into preallocated buffers, both at once", runs, self.nbytes)

    def transfers(self) -> None:
        r0, r1 = self.ranks
        exchange = [max(ray.get([r0.send.remote(r1), r1.send.remote(r0)])) for _ in range(self.args.repeat + 1)]
        self.record(
            "transfer_exchange",
            "each rank ray.puts its half, the other rank ray.gets it on its node, both at once (1 replica's bytes)",
            exchange[1:],  # the first is a warm-up
            self.nbytes,
        )
        one_way = [ray.get(r0.send.remote(self.replacement)) for _ in range(self.args.repeat + 1)]
        self.record(
            "transfer_one_way",
            "rank 0's half ray.put on node_a, ray.get by an actor on node_c",
            one_way[1:],
            ray.get(r0.nbytes.remote()),
        )

    def storage_saves(self) -> str:
        """Blocking and non-blocking saves to the local disk, memory tier off; the run (kept for the loads)."""
        run = self.start_run("disk", "disk")
        repeat = self.args.repeat
        warmup = self.steps_loop(run, [1, 2])  # imports, directories, the first files, the first retention
        blocking = self.steps_loop(run, list(range(3, 3 + repeat)))
        self.record(
            "storage_save_blocking",
            "WorkerClient.save(blocking=True) to the local disk",
            blocking,
            self.nbytes,
            warmup_s=warmup,
        )
        first = 3 + repeat
        blocked = self.train(run, list(range(first, first + max(3, repeat) + 1)))[1:]  # the first allocates buffers
        self.record(
            "storage_save_blocked",
            f"seconds WorkerClient.save(blocking=False) to the local disk holds a loop stepping every "
            f"{self.args.step_s:g} s",
            blocked,
        )
        return run

    def load_disk_cold(self, run: str) -> None:
        ray.get(self.replacement.connect.remote(run))
        run_dir = os.path.join(self.workdir, "runs", run)
        runs, cached, step = [], [], None
        for i in range(self.args.repeat):
            cached.append(drop_from_page_cache(run_dir))
            got = ray.get(self.replacement.load.remote(run, i == 0))
            if i == 0 and not got["exact"]:
                raise AssertionError(f"the cold disk load of step {got['step']} is not what was saved")
            runs.append(got["seconds"])
            step = got["step"]
        self.record(
            "load_disk_cold",
            "replacement rank 1 on node_c: WorkerClient.load('latest', into=...) from the local disk, page cache "
            "dropped",
            runs,
            self.half_bytes,
            step=step,
            cached_bytes_before=cached,
        )

    def load_s3(self) -> None:
        run = self.start_run("s3", "s3")
        save = self.steps_loop(run, [1])
        ray.get(self.replacement.connect.remote(run))
        runs = []
        for i in range(self.args.repeat):
            got = ray.get(self.replacement.load.remote(run, i == 0))
            if i == 0 and not got["exact"]:
                raise AssertionError(f"the S3 load of step {got['step']} is not what was saved")
            runs.append(got["seconds"])
        self.record(
            "load_s3",
            "replacement rank 1 on node_c: WorkerClient.load('latest', into=...) from loopback S3",
            runs,
            self.half_bytes,
            save_s=save[0],
        )
        self.stop_run(run)

    def evaluators(self, name: str, what: str, run: str, step: int) -> None:
        """8 evaluators, 4 on node_a and 4 on node_b, load ``step`` at once: wall time and S3 bytes served."""
        actors = [Evaluator.options(**on(node)).remote(run) for node in NODES[:2] for _ in range(EVALUATORS_PER_NODE)]
        ray.get([a.ready.remote() for a in actors])
        expected = {
            **half_state(self.eval_bytes, self.args.layers, 0, step),
            **half_state(self.eval_bytes, self.args.layers, 1, step),
        }
        expected_ref = ray.put(expected)
        before = served_gets(self.s3)
        start_at = time.time() + 1.0
        got = ray.get([a.load.remote(step, start_at, expected_ref if i == 0 else None) for i, a in enumerate(actors)])
        after = served_gets(self.s3)
        served = {k: after[k] - before[k] for k in after}
        stored = stored_tensor_bytes(self.s3, f"{self.bucket}/runs/{run}/{step_dir(step)}")
        for actor in actors:
            ray.kill(actor)
        del expected_ref
        step_bytes = state_nbytes(expected)
        if not got[0]["exact"] or any(g["nbytes"] != step_bytes for g in got):
            raise AssertionError(f"{name}: an evaluator loaded something other than step {step}")
        wall = max(g["ended"] for g in got) - min(g["began"] for g in got)
        self.record(
            name,
            what,
            [wall],
            step_bytes * len(actors),
            per_evaluator_s=[g["ended"] - g["began"] for g in got],
            s3_get_requests=served["requests"],
            s3_bytes_served=served["bytes"],
            s3_tensor_file_bytes_served=served["tensor_file_bytes"],
            stored_tensor_file_bytes=stored,
            copies_read=served["tensor_file_bytes"] / stored,
        )

    def eval_independent(self) -> None:
        run = self.start_run("eval-s3", "s3")
        step = PERSIST_EVERY
        self.both(lambda r: r.save_other.remote(run, step, self.eval_bytes))
        self.evaluators(
            "eval_independent",
            f"8 evaluators (4 on node_a, 4 on node_b) EvalClient.load one {self.args.eval_size_mb} MiB step from "
            "loopback S3 at once: wall time",
            run,
            step,
        )
        self.stop_run(run)

    # -- the memory tier
    def memory_eval_cached(self) -> None:
        """The evaluators' step persisted by a memory run with an eval cache, no longer in memory."""
        run = self.start_run(
            "eval-mem",
            "s3",
            memory_replicas=1,
            memory_keep_last=1,
            persist_interval_steps=PERSIST_EVERY,
            eval_cache_bytes=2 * self.eval_bytes,
        )
        step = PERSIST_EVERY
        self.both(lambda r: r.save_other.remote(run, step, self.eval_bytes))  # persisted: blocking waits for S3
        self.both(lambda r: r.save_other.remote(run, step + 1, self.eval_bytes))  # step 10 leaves memory
        memory = self.handles[run].stats()["memory"]
        if step in memory["steps"]:
            raise AssertionError(f"step {step} is still in memory ({memory}): the case needs a persisted-only step")
        self.evaluators(
            "eval_cached",
            f"the same with eval_cache_bytes: 8 evaluators load one persisted-only {self.args.eval_size_mb} MiB "
            "step; each node's holder reads it from S3 once",
            run,
            step,
        )
        self.stop_run(run)

    def memory_saves_and_node_loss(self) -> None:
        """Steps 1..KILL_AT with the memory tier (every 10th persisted), node_b killed, rank 1 recovered on node_c."""
        run = self.start_run(
            "mem",
            "disk",
            memory_replicas=1,
            memory_keep_last=1,
            persist_interval_steps=PERSIST_EVERY,
            memory_budget_bytes=int(2.5 * self.total_bytes) + (64 << 20),
        )
        repeat = min(self.args.repeat, PERSIST_EVERY - 5)
        # warm-up: holders, routes, the first copies and the first step freed (the second save of a
        # run took 1.1-1.4 s more than the next ones at 16 MiB)
        warmup = self.steps_loop(run, [1, 2])
        blocking = self.steps_loop(run, list(range(3, 3 + repeat)))
        self.record(
            "memory_save_blocking",
            "WorkerClient.save(blocking=True), memory_replicas=1: committed with a copy on the rank's node and one "
            "on the other node",
            blocking,
            self.nbytes,
            warmup_s=warmup,
        )
        blocked = self.train(run, list(range(3 + repeat, PERSIST_EVERY)))[1:]  # the first allocates buffers
        persisted = self.steps_loop(run, [PERSIST_EVERY])
        blocked += self.train(run, list(range(PERSIST_EVERY + 1, KILL_AT + 1)))
        self.record(
            "memory_save_blocked",
            f"seconds WorkerClient.save(blocking=False), memory_replicas=1, holds a loop stepping every "
            f"{self.args.step_s:g} s",
            blocked,
        )
        self.record(
            "memory_save_persisted",
            f"WorkerClient.save(blocking=True) of step {PERSIST_EVERY}: committed in memory and on the local disk",
            persisted,
            self.nbytes,
        )
        handle = self.handles[run]
        deadline = time.monotonic() + 600
        while handle.stats()["memory"]["persisting"] and time.monotonic() < deadline:
            time.sleep(0.2)
        run_dir = os.path.join(self.workdir, "runs", run)
        on_disk = [s for s in range(1, KILL_AT + 1) if os.path.exists(os.path.join(run_dir, step_dir(s), MARKER_FILE))]

        kill_s = kill_node(self.cluster, self.nodes["node_b"])
        ray.get(self.replacement.connect.remote(run))
        loads, sources, logged, step = [], [], [], None
        for i in range(self.args.repeat):
            got = ray.get(self.replacement.load.remote(run, i == 0))
            if i == 0 and not got["exact"]:
                raise AssertionError(f"the recovery of step {got['step']} from memory is not what was saved")
            loads.append(got["seconds"])
            logged.append(got["logged"])
            sources.append(ray.get(self.replacement.load_source.remote(run)))
            step = got["step"]
        self.record(
            "recovery_memory",
            "node_b killed; replacement rank 1 on node_c: WorkerClient.load('latest', into=...) from the holders' "
            "memory (the first load is the recovery; later ones may find node_c's copies)",
            loads,
            self.half_bytes,
            step=step,
            sources=sources,
            first_s=loads[0],
            node_death_noticed_s=kill_s,
            logged=logged,
            node_ids={name: node.node_id for name, node in self.nodes.items()},
        )
        newest_persisted = max(on_disk, default=0)
        self.cases["lost_work"] = {
            "what": f"steps lost when node_b dies after step {KILL_AT}",
            "killed_after_step": KILL_AT,
            "memory_every_step": KILL_AT - (step or 0),
            "storage_every_10_steps": KILL_AT - newest_persisted,
            "resumed_step": step,
            "newest_persisted_step": newest_persisted,
        }
        started = time.perf_counter()
        flushed = handle.flush(timeout_s=900)
        self.record(
            "flush",
            "handle.flush() after the node loss: the newest memory step persisted to the local disk now",
            [time.perf_counter() - started],
            self.nbytes,
            step=flushed,
        )
        self.stop_run(run)


# -- driver ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_tier", description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=None, help="state MiB in all (default 1024; 16 with --quick)")
    p.add_argument("--eval-size-mb", type=int, default=None, help="evaluators' step MiB (default 256; 8 with --quick)")
    p.add_argument("--layers", type=int, default=8, help="linear layers (weight + bias + 2 Adam moments each)")
    p.add_argument("--repeat", type=int, default=None, help="runs per case (default 3; 1 with --quick)")
    p.add_argument("--step-s", type=float, default=None, help="simulated step seconds (default 4; 0.3 with --quick)")
    p.add_argument("--cases", nargs="+", choices=("anchors", "memory"), default=["anchors", "memory"])
    p.add_argument("--server-nice", type=int, default=0, help="nice of the moto server process")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run per case")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir under /tmp)")
    p.add_argument("--out", default="bench_out/memory_tier.json", help="JSON output path")
    args = p.parse_args(argv)
    args.size_mb = args.size_mb or (16 if args.quick else 1024)
    args.eval_size_mb = args.eval_size_mb or (8 if args.quick else 256)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.step_s = args.step_s if args.step_s is not None else (0.3 if args.quick else 4.0)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case of ``args.cases`` on one cluster; the results document."""
    own_workdir = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="ray-ckpt-memory-bench-")
    memory = "memory" in args.cases and memory_tier_ready()
    load_start = load_average()
    started = time.time()
    try:
        # the endpoint first: it sets the AWS variables the raylets (and so every actor) inherit
        with (
            s3_cases.moto_endpoint(args.server_nice) as s3,
            local_cluster(args.size_mb << 20, args.eval_size_mb << 20) as (
                cluster,
                nodes,
            ),
        ):
            bench = Bench(args, cluster, nodes, s3)
            if "anchors" in args.cases:
                bench.memcpy()
                bench.transfers()
                disk_run = bench.storage_saves()
                bench.load_disk_cold(disk_run)
                bench.stop_run(disk_run)
                bench.load_s3()
                bench.eval_independent()
            if memory:
                bench.memory_eval_cached()
                bench.memory_saves_and_node_loss()  # last: it kills node_b
            nbytes, half = bench.nbytes, bench.half_bytes
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
    doc = {
        "meta": {
            "argv": sys.argv[1:],
            "size_bytes": nbytes,
            "rank_bytes": half,
            "eval_size_bytes": args.eval_size_mb << 20,
            "layers": args.layers,
            "repeat": args.repeat,
            "step_s": args.step_s,
            "quick": args.quick,
            "cases": args.cases,
            "memory_tier": memory,
            "nproc": os.cpu_count(),
            "load_average": {"start": load_start, "end": load_average()},
            "seconds": time.time() - started,
            "python": platform.python_version(),
            "ray": ray.__version__,
            "s3": f"moto's server on 127.0.0.1 in a subprocess at nice {args.server_nice}",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "cases": bench.cases,
    }
    doc["targets"] = targets(doc["cases"])
    return doc


def targets(cases: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's figures from the cases measured (a figure whose cases did not run is left out)."""
    rows: list[dict[str, Any]] = []

    def median(name: str) -> float:
        return float(cases[name]["median_s"])

    def row(key: str, figure: str, value: float, detail: str) -> None:
        op, goal = TARGETS[key]
        ok = value <= goal if op == "<=" else value >= goal
        rows.append(
            {
                "key": key,
                "figure": figure,
                "value": value,
                "target": f"{op} {goal:g}x",
                "status": "pass" if ok else "short",
                "detail": detail,
            }
        )

    def have(*names: str) -> bool:
        return all(n in cases for n in names)

    if have("memory_save_blocked", "storage_save_blocked"):
        m, s = median("memory_save_blocked"), median("storage_save_blocked")
        row(
            "blocked",
            "loop blocked per non-blocking save: memory / storage",
            m / s,
            f"{m * 1e3:.1f} ms vs {s * 1e3:.1f} ms",
        )
    if have("memory_save_blocking", "memcpy", "transfer_exchange"):
        m, a = median("memory_save_blocking"), median("memcpy") + median("transfer_exchange")
        row("blocking", "blocking memory save / (snapshot memcpy + raw transfer)", m / a, f"{m:.3f} s vs {a:.3f} s")
    if have("recovery_memory"):
        first = cases["recovery_memory"]["extra"]["first_s"]
        for key, anchor, label in (
            ("recovery_s3", "load_s3", "loopback S3"),
            ("recovery_disk", "load_disk_cold", "the local disk, cold cache"),
            ("recovery_transfer", "transfer_one_way", "the raw object-store transfer"),
        ):
            if anchor in cases:
                a = median(anchor)
                row(
                    key,
                    f"recovery of a lost node's rank from memory, speed vs {label}",
                    a / first,
                    f"{first:.3f} s vs {a:.3f} s",
                )
    if have("eval_cached", "eval_independent"):
        c, i = median("eval_cached"), median("eval_independent")
        row(
            "eval_wall",
            "8 evaluators on 2 nodes, wall: eval cache / independent loads",
            c / i,
            f"{c:.2f} s vs {i:.2f} s",
        )
        copies = cases["eval_cached"]["extra"]["copies_read"]
        row(
            "eval_copies",
            "8 evaluators on 2 nodes, copies of the step read from S3 (eval cache)",
            copies,
            f"{copies:.2f} copies vs {cases['eval_independent']['extra']['copies_read']:.2f} independent",
        )
    return rows


def markdown(doc: dict[str, Any]) -> str:
    """The targets and every case as Markdown tables, with the run's heading line."""
    meta, cases = doc["meta"], doc["cases"]
    load = meta["load_average"]
    lines = [
        f"**{meta['size_bytes'] / 2**20:.0f} MiB model + Adam state ({meta['layers']} layers), 2 ranks on 2 of 3 "
        f"worker raylets + a head; evaluators' step {meta['eval_size_bytes'] / 2**20:.0f} MiB; median of "
        f"{meta['repeat']}; {meta['nproc']} cores; load average at start {load['start'][0]:.2f}, at end "
        f"{load['end'][0]:.2f} (1-min)**",
        "",
    ]
    if not meta["memory_tier"]:
        lines += ["The memory-tier cases did not run (not asked for, or this tree has no memory tier).", ""]
    if doc["targets"]:
        lines += ["| figure | ratio | target | status | detail |", "|---|---:|---:|---|---|"]
        lines += [
            f"| {r['figure']} | {r['value']:.2f}x | {r['target']} | {r['status']} | {r['detail']} |"
            for r in doc["targets"]
        ]
        lines.append("")
    if "lost_work" in cases:
        lost = cases["lost_work"]
        lines += [
            f"Lost work when node_b dies after step {lost['killed_after_step']}: memory every step + storage every "
            f"{PERSIST_EVERY} steps: {lost['memory_every_step']} steps (resumed at {lost['resumed_step']}); storage "
            f"every {PERSIST_EVERY} steps: {lost['storage_every_10_steps']} steps (newest persisted "
            f"{lost['newest_persisted_step']}).",
            "",
        ]
    lines += ["| case | what | median s | best s | runs | GB/s (median) |", "|---|---|---:|---:|---:|---:|"]
    for name, case in cases.items():
        if "median_s" not in case:
            continue
        gbps = f"{case['gbps']:.3f}" if "gbps" in case else "-"
        lines.append(
            f"| {name} | {case['what']} | {case['median_s']:.3f} | {case['min_s']:.3f} | {len(case['runs'])} | {gbps} |"
        )
    for name in ("eval_independent", "eval_cached"):
        if name in cases:
            extra = cases[name]["extra"]
            lines.append(
                f"\n{name}: {extra['s3_get_requests']} GETs, {extra['s3_bytes_served'] / 2**20:.1f} MiB served by S3, "
                f"{extra['copies_read']:.2f} copies of the step's tensor files "
                f"({extra['stored_tensor_file_bytes'] / 2**20:.1f} MiB)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("werkzeug", "botocore", "s3fs", "aiobotocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    doc = run(args)
    write_report(doc, args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
