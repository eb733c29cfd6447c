"""Tensor-sharded saves and loads: 4 FSDP2 ranks (Ray actors, gloo, CPU) with ray-ckpt vs DCP, side by side.

    python -m benchmarks.sharded [--quick] [--size 1GiB] [--repeat 3] [--out bench_out/sharded.json]

Four Ray actors form a gloo group, shard a stack of ``nn.Linear`` layers (``--size`` of fp32
weights) with FSDP2 (``fully_shard``) and give it Adam state (one optimizer step: model + 2x Adam
= 3x ``--size`` of state). From ``get_state_dict(model, optim)`` on the same ranks, in one run:

* **save**: ray-ckpt ``WorkerClient.save(..., blocking=True)`` in direct and in gather mode vs
  ``dcp.save`` (``FileSystemWriter``): seconds from a barrier until every rank returned (committed);
* **HF-loadable model**: ray-ckpt's model-only save (its step is a Hugging Face folder) vs
  ``dcp.save`` with ``HuggingFaceStorageWriter(save_distributed=True)`` +
  ``consolidate_safetensors_files_on_every_rank`` (one output file per rank at a time) + fsync;
* **resharded load 4 -> 2**: two of the ranks rejoin as a 2-rank group with a fresh model and
  load model + Adam state: ``WorkerClient.load(into=...)`` vs ``dcp.load``, each followed by
  ``set_state_dict``; page cache dropped before every load; the two results are compared;
* **whole-step load**: the driver loads the model of the step the 4 -> 2 case read with
  ``CheckpointStore.load`` (every block digest checked) vs ``safetensors.torch.load_file`` of the
  same files with ``backend="pread"`` (tensors materialised in memory, as a load does; its default
  maps the files and reads nothing until a tensor is used; nothing checked); page cache dropped
  before each;
* **master memory**: the gather-mode checkpointer's process sampled from ``/proc`` every 2 ms
  during a gather save: peak growth of RssAnon (private anonymous memory; also USS from
  ``smaps_rollup`` and VmRSS) vs ``max_shard_size``;
* **non-blocking save**: seconds ``save(blocking=False)`` (direct mode) holds the loop (slowest
  rank) vs the median blocking direct save; run after the other saves (the snapshot buffers, a
  second copy of the state, stay allocated) and reused: the first non-blocking save is untimed.

Rounds alternate the order of the save cases; ``os.sync()`` before each save, old steps deleted
untimed; medians over ``--repeat`` rounds are the headline (every run is in the JSON).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

import ray
import torch

from benchmarks.measure import drop_page_cache, fsync_file, load_average, write_report
from benchmarks.ray_cases import ProcSampler
from ray_ckpt import CheckpointConfig, CheckpointStore, start_checkpointer
from ray_ckpt.core.config import parse_size
from ray_ckpt.core.layout import step_dir

logger = logging.getLogger("benchmarks.sharded")

NAMESPACE = "ray_ckpt_bench_sharded"
WORLD = 4
RESHARD_WORLD = 2
LAYERS = 16
SAVE_CASES = ("ours_direct", "ours_gather", "dcp", "ours_hf", "dcp_hf")
LOAD_CASES = ("ours_load", "dcp_load")
WHOLE_LOAD_CASES = ("ours_whole_load", "safetensors_load_file")
# the snapshot is the same code in both modes; direct needs no object-store copy (memory: 23 GiB shared)
NONBLOCKING_MODE = "direct"
# figure, value key, op, bound
TARGETS = (
    ("save, direct mode: dcp.save s / ray-ckpt s", "save_direct_ratio", ">=", 1.2),
    ("save, gather mode: dcp.save s / ray-ckpt s", "save_gather_ratio", ">=", 1.5),
    ("HF-loadable model: (dcp.save HF + consolidate) s / ray-ckpt s", "hf_ratio", ">=", 1.5),
    ("resharded load 4 -> 2, every byte verified: dcp.load s / ray-ckpt s", "load_ratio", ">=", 1.1),
    (
        "whole-step load, checksums: safetensors.load_file(pread) s / CheckpointStore.load s",
        "whole_load_ratio",
        ">=",
        0.9,
    ),
    ("non-blocking save (direct): loop blocked / blocking save", "nonblocking_ratio", "<=", 0.1),
)


def _rank_env() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@ray.remote(num_cpus=0)
class FsdpRank:
    """One training process: joins a gloo group, holds an FSDP2 model + Adam, saves and loads it."""

    def __init__(self) -> None:
        _rank_env()
        self.model: Any = None
        self.optim: Any = None
        self.clients: dict[str, Any] = {}

    def join(self, rank: int, world: int, port: int, hidden: int, layers: int, seed: int) -> int:
        """Join a ``world``-rank group, build the sharded model and its Adam state; this rank's state bytes."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.leave()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        self.rank, self.world = rank, world
        with torch.device("meta"):  # no full copy of the model in any rank
            model = torch.nn.Sequential(*(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers)))
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        with torch.no_grad():
            for p in model.parameters():
                local = p.to_local()
                local.copy_(torch.rand(local.shape, generator=gen) - 0.5)
        optim = torch.optim.Adam(model.parameters(), lr=1e-3)
        for p in model.parameters():  # random gradients: Adam state of real (incompressible) values
            p.grad = p.detach().clone()
        optim.step()
        optim.zero_grad(set_to_none=True)
        self.model, self.optim = model, optim
        gc.collect()
        return self.local_bytes()

    def local_bytes(self) -> int:
        """Bytes of this rank's local shards (model + optimizer state)."""
        model_sd, optim_sd = self._states()
        total = 0
        for value in [*model_sd.values(), *(v for e in optim_sd["state"].values() for v in e.values())]:
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
        return total

    def _states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.model, self.optim)

    def _client(self, run: str) -> Any:
        from ray_ckpt.distributed.worker import WorkerClient

        if run not in self.clients:
            self.clients[run] = WorkerClient(run, self.rank, self.world, namespace=NAMESPACE)
        return self.clients[run]

    def warm_up(self, runs: list[str], path: str) -> bool:
        """First-call costs off the clock: a tiny save to each run and a tiny dcp.save (plain and HF)."""
        import torch.distributed.checkpoint as dcp

        small = {f"warm.{self.rank}": torch.rand(256, 256)}
        for run in runs:
            self._client(run).save(0, small, blocking=True)
        dcp.save({"warm": small}, checkpoint_id=os.path.join(path, "plain"))
        shared = {"warm": torch.rand(256, 256)}
        dcp.save(shared, storage_writer=dcp.HuggingFaceStorageWriter(os.path.join(path, "hf"), save_distributed=True))
        return True

    def save(self, kind: str, run: str, step: int, path: str, mapping: dict[str, int]) -> float:
        """One timed save of this rank's share: seconds from a barrier until it returned (durable)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = self._states()
        dist.barrier()
        started = time.perf_counter()
        if kind in ("ours_direct", "ours_gather"):
            self._client(run).save(step, model_sd, trainer_state={"optim": optim_sd}, blocking=True)
        elif kind == "ours_hf":
            self._client(run).save(step, model_sd, blocking=True)
        elif kind == "dcp":
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(path))
        elif kind == "dcp_hf":
            from torch.distributed.checkpoint._consolidate_hf_safetensors import (
                consolidate_safetensors_files_on_every_rank,
            )

            sharded = os.path.join(path, "sharded")
            writer = dcp.HuggingFaceStorageWriter(sharded, fqn_to_index_mapping=mapping, save_distributed=True)
            dcp.save(model_sd, storage_writer=writer)
            consolidate_safetensors_files_on_every_rank(sharded, path, mapping)
            for name in os.listdir(path):  # durable like the others: the consolidated files are not fsync'd
                if os.path.isfile(os.path.join(path, name)):
                    fsync_file(os.path.join(path, name))
            fsync_file(path)
            dist.barrier()
        else:
            raise ValueError(kind)
        return time.perf_counter() - started

    def save_nonblocking(self, run: str, step: int) -> tuple[float, float]:
        """(seconds save(blocking=False) held the loop, seconds until committed)."""
        import torch.distributed as dist

        model_sd, optim_sd = self._states()
        dist.barrier()
        started = time.perf_counter()
        future = self._client(run).save(step, model_sd, trainer_state={"optim": optim_sd}, blocking=False)
        returned = time.perf_counter() - started
        future.result(600)
        return returned, time.perf_counter() - started

    def load(self, kind: str, run: str, step: int, path: str) -> float:
        """One timed load of model + Adam state into this rank's layout, then ``set_state_dict``."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_sd, optim_sd = self._states()
        dist.barrier()
        started = time.perf_counter()
        if kind == "ours_load":
            self._client(run).load(step, into=model_sd, trainer_into={"optim": optim_sd})
        elif kind == "dcp_load":
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=path)
            model_sd, optim_sd = state["model"], state["optim"]
        else:
            raise ValueError(kind)
        set_state_dict(self.model, self.optim, model_state_dict=model_sd, optim_state_dict=optim_sd)
        dist.barrier()
        return time.perf_counter() - started

    def scramble(self) -> bool:
        """Overwrite the local model and Adam state (a load must restore every byte)."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.to_local().fill_(7.0)
            for entry in self.optim.state.values():
                for value in entry.values():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        (value.to_local() if hasattr(value, "to_local") else value).fill_(7.0)
        return True

    def digest(self) -> str:
        """xxh3 of this rank's local model and Adam bytes (compares the two loads)."""
        import xxhash

        h = xxhash.xxh3_64()
        model_sd, optim_sd = self._states()
        flat = {**model_sd, **{f"{k}.{n}": v for k, e in optim_sd["state"].items() for n, v in e.items()}}
        for key in sorted(flat):
            value = flat[key]
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                h.update(key.encode())
                h.update(local.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def leave(self) -> bool:
        """Leave the group and free the model, the optimizer and the clients' snapshot buffers."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.model = self.optim = None
        self.clients = {}
        gc.collect()
        return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_memory(pid: int) -> dict[str, int]:
    """RssAnon, VmRSS (``/proc/<pid>/status``) and USS = Private_Clean + Private_Dirty (``smaps_rollup``), bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    try:
        uss = 0
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Private_Clean", "Private_Dirty"):
                    uss += int(rest.split()[0]) * 1024
        out["USS"] = uss
    except OSError:
        pass
    return out


def MemorySampler(pid: int) -> ProcSampler:  # noqa: N802 - reads like the class it returns
    """Peaks of the process's private and resident memory while a save runs."""
    return ProcSampler(pid, read=_proc_memory)


def hf_mapping(keys_bytes: dict[str, int], max_shard_size: int) -> dict[str, int]:
    """Pack tensors in order into files of at most ``max_shard_size`` (1-based indices), as HF writers do."""
    mapping: dict[str, int] = {}
    index, used = 1, 0
    for key, nbytes in keys_bytes.items():
        if used and used + nbytes > max_shard_size:
            index, used = index + 1, 0
        mapping[key] = index
        used += nbytes
    return mapping


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharded", description=__doc__.splitlines()[0])
    p.add_argument("--size", default=None, help="model fp32 bytes (default 1GiB; 256MiB with --quick)")
    p.add_argument("--max-shard-size", default=None, help="checkpointer max_shard_size (default size/4)")
    p.add_argument("--repeat", type=int, default=None, help="rounds (default 3; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="a 256 MiB model (768 MiB of state), 2 rounds")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir under /tmp)")
    p.add_argument("--out", default="bench_out/sharded.json", help="JSON output path")
    args = p.parse_args(argv)
    args.size = args.size or ("256MiB" if args.quick else "1GiB")
    args.repeat = args.repeat or (2 if args.quick else 3)
    return args


def _init_ray(state_bytes: int) -> None:
    """A private local Ray: object store for two gather saves of the whole state."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(
        address="local",
        num_cpus=4,
        namespace=NAMESPACE,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        object_store_memory=max(512 << 20, int(2.2 * state_bytes)),
        runtime_env={"env_vars": {"PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", "")}},
    )


class Bench:
    """The driver: three checkpointers (direct, gather, HF model-only), four ranks, the rounds."""

    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        size = int(parse_size(args.size, field_name="--size"))
        self.hidden = max(64, int(math.sqrt(size / 4 / LAYERS)) // 64 * 64)
        self.model_bytes = self.hidden * self.hidden * 4 * LAYERS
        self.max_shard = int(parse_size(args.max_shard_size)) if args.max_shard_size else self.model_bytes // 4
        suffix = uuid.uuid4().hex[:8]
        self.runs = {kind: f"bench-sharded-{kind}-{suffix}" for kind in ("ours_direct", "ours_gather", "ours_hf")}
        modes = {"ours_direct": "direct", "ours_gather": "gather", "ours_hf": "direct"}
        self.configs = {
            kind: CheckpointConfig(
                storage_uri=os.path.join(workdir, "ray_runs"),
                run_name=run,
                write_mode=modes[kind],
                max_shard_size=self.max_shard,
                metric_name="loss",
                save_timeout_s=600,
            )
            for kind, run in self.runs.items()
        }
        self.steps = dict.fromkeys(self.runs, 0)
        self.mapping = hf_mapping({f"{i}.weight": self.hidden * self.hidden * 4 for i in range(LAYERS)}, self.max_shard)

    def _group(self, world: int, seed: int) -> int:
        port = _free_port()
        members = self.ranks[:world]
        got = ray.get([r.join.remote(i, world, port, self.hidden, LAYERS, seed) for i, r in enumerate(members)])
        return sum(got)

    def _cleanup(self, kind: str) -> None:
        """Every step of a ray-ckpt run but the latest deleted, untimed; the checkpointer resynced."""
        store = CheckpointStore(config=self.configs[kind])
        for info in store.list()[:-1]:
            store.delete(info.step)
        ray.get(self.handles[kind].actor.refresh.remote())

    def _dcp_path(self, kind: str, step: int) -> str:
        return os.path.join(self.workdir, kind, f"step_{step:03d}")

    def save_case(self, kind: str, round_: int) -> float:
        """One save by all four ranks: the slowest rank's seconds."""
        run_kind = kind if kind.startswith("ours") else None
        step = round_ + 1
        if run_kind:
            self.steps[run_kind] += 1
            step = self.steps[run_kind]
        path = self._dcp_path(kind, step)
        os.sync()
        run = self.runs.get(kind, "")
        seconds = max(ray.get([r.save.remote(kind, run, step, path, self.mapping) for r in self.ranks]))
        if run_kind:
            self._cleanup(run_kind)
        else:
            previous = self._dcp_path(kind, step - 1)
            shutil.rmtree(previous, ignore_errors=True)
        logger.info("round %d %s: %.2f s (load %.2f)", round_, kind, seconds, os.getloadavg()[0])
        return seconds

    def nonblocking(self) -> tuple[float, float]:
        """A non-blocking save (``NONBLOCKING_MODE``): (slowest rank's blocked seconds, slowest rank's to commit)."""
        kind = f"ours_{NONBLOCKING_MODE}"
        self.steps[kind] += 1
        os.sync()
        run, step = self.runs[kind], self.steps[kind]
        got = ray.get([r.save_nonblocking.remote(run, step) for r in self.ranks])
        self._cleanup(kind)
        return max(g[0] for g in got), max(g[1] for g in got)

    def memory(self, pid: int) -> dict[str, Any]:
        """The gather checkpointer's memory growth during one blocking gather save (sampled every 2 ms)."""
        self.steps["ours_gather"] += 1
        gc_before = _proc_memory(pid)
        os.sync()
        with MemorySampler(pid) as sampler:
            ray.get(
                [
                    r.save.remote("ours_gather", self.runs["ours_gather"], self.steps["ours_gather"], "", {})
                    for r in self.ranks
                ]
            )
        self._cleanup("ours_gather")
        growth = {k: max(0, sampler.peak.get(k, 0) - gc_before.get(k, 0)) for k in gc_before}
        return {"growth_bytes": growth, "before": gc_before, "samples": sampler.samples}

    def run(self) -> dict[str, Any]:
        """Every case: warm-up, the save rounds on 4 ranks, then the 4 -> 2 load rounds."""
        self.handles = {kind: start_checkpointer(cfg, namespace=NAMESPACE) for kind, cfg in self.configs.items()}
        self.ranks = [FsdpRank.remote() for _ in range(WORLD)]
        try:
            return self._run()
        finally:
            for r in self.ranks:
                ray.kill(r)
            for handle in self.handles.values():
                handle.shutdown()

    def _run(self) -> dict[str, Any]:
        args = self.args
        state_bytes = self._group(WORLD, seed=0)
        logger.info(
            "4 ranks: %.2f GiB of model + Adam state (hidden %d x %d layers)", state_bytes / 2**30, self.hidden, LAYERS
        )
        ray.get([r.warm_up.remote(list(self.runs.values()), os.path.join(self.workdir, "warm")) for r in self.ranks])
        for kind in self.runs:
            self._cleanup(kind)
        pid = ray.get(self.handles["ours_gather"].actor.__ray_call__.remote(lambda _self: os.getpid()))
        saves: dict[str, list[float]] = {kind: [] for kind in SAVE_CASES}
        blocked: list[float] = []
        nonblocking_total: list[float] = []
        memory: list[dict[str, Any]] = []
        for round_ in range(args.repeat):
            order = SAVE_CASES if round_ % 2 == 0 else SAVE_CASES[::-1]
            for kind in order:
                saves[kind].append(self.save_case(kind, round_))
            memory.append(self.memory(pid))
            logger.info("round %d master growth: %s", round_, memory[-1]["growth_bytes"])
        # last: the snapshot buffers (another copy of the state in every rank) stay allocated from here on
        first_blocked, _ = self.nonblocking()  # allocates the snapshot buffers: untimed
        for round_ in range(args.repeat):
            b, t = self.nonblocking()
            blocked.append(b)
            nonblocking_total.append(t)
            logger.info("round %d non-blocking: blocked %.3f s, committed %.2f s", round_, b, t)
        hf_store = CheckpointStore(config=self.configs["ours_hf"])
        manifest = hf_store.read_manifest(hf_store.list()[-1].step)
        self.ours_hf_files = len([n for n in manifest.files if n.startswith("model-") and n.endswith(".safetensors")])
        # 4 -> 2: ranks 0 and 1 rejoin with a fresh model; the others free their state
        ray.get([r.leave.remote() for r in self.ranks])
        self._group(RESHARD_WORLD, seed=1)
        two = self.ranks[:RESHARD_WORLD]
        ours_step = CheckpointStore(config=self.configs["ours_direct"]).list()[-1].step
        dcp_path = self._dcp_path("dcp", args.repeat)
        loads: dict[str, list[float]] = {kind: [] for kind in LOAD_CASES}
        digests: dict[str, list[str]] = {}
        cold = []
        for round_ in range(args.repeat):
            order = LOAD_CASES if round_ % 2 == 0 else LOAD_CASES[::-1]
            for kind in order:
                ray.get([r.scramble.remote() for r in two])
                cold.append(drop_page_cache())
                got = ray.get([r.load.remote(kind, self.runs["ours_direct"], ours_step, dcp_path) for r in two])
                loads[kind].append(max(got))
                logger.info("round %d %s 4 -> 2: %.2f s (load %.2f)", round_, kind, max(got), os.getloadavg()[0])
                digests[kind] = ray.get([r.digest.remote() for r in two])
        if digests["ours_load"] != digests["dcp_load"]:
            raise AssertionError("the ray-ckpt and DCP 4 -> 2 loads differ")
        loads.update(self.whole_loads(ours_step, cold))
        return self._document(saves, loads, blocked, nonblocking_total, first_blocked, memory, state_bytes, all(cold))

    def whole_loads(self, step: int, cold: list[bool]) -> dict[str, list[float]]:
        """The whole model of ``step`` into this process: CheckpointStore.load vs safetensors.load_file, cold."""
        from safetensors.torch import load_file

        store = CheckpointStore(config=self.configs["ours_direct"])
        directory = store.storage.local_path(step_dir(step))
        files = sorted(
            {f for f in store.read_manifest(step).files if f.startswith("model") and f.endswith(".safetensors")}
        )
        cases = {
            "ours_whole_load": lambda: store.load(step),
            "safetensors_load_file": lambda: {f: load_file(os.path.join(directory, f), backend="pread") for f in files},
        }
        out: dict[str, list[float]] = {kind: [] for kind in WHOLE_LOAD_CASES}
        for round_ in range(self.args.repeat):
            for kind in WHOLE_LOAD_CASES if round_ % 2 == 0 else WHOLE_LOAD_CASES[::-1]:
                cold.append(drop_page_cache())
                started = time.perf_counter()
                loaded = cases[kind]()
                out[kind].append(time.perf_counter() - started)
                del loaded
                gc.collect()
                logger.info("round %d %s: %.2f s", round_, kind, out[kind][-1])
        return out

    def _document(
        self,
        saves: dict[str, list[float]],
        loads: dict[str, list[float]],
        blocked: list[float],
        nonblocking_total: list[float],
        first_blocked: float,
        memory: list[dict[str, Any]],
        state_bytes: int,
        cold: bool,
    ) -> dict[str, Any]:
        med = {k: statistics.median(v) for k, v in {**saves, **loads}.items()}
        peak = {k: max(m["growth_bytes"].get(k, 0) for m in memory) for k in ("RssAnon", "USS", "VmRSS")}
        figures = {
            "save_direct_ratio": med["dcp"] / med["ours_direct"],
            "save_gather_ratio": med["dcp"] / med["ours_gather"],
            "hf_ratio": med["dcp_hf"] / med["ours_hf"],
            "load_ratio": med["dcp_load"] / med["ours_load"],
            "whole_load_ratio": med["safetensors_load_file"] / med["ours_whole_load"],
            "nonblocking_ratio": statistics.median(blocked) / med[f"ours_{NONBLOCKING_MODE}"],
            "master_rss_anon_growth_bytes": peak["RssAnon"],
            "master_uss_growth_bytes": peak["USS"],
            "master_vmrss_growth_bytes": peak["VmRSS"],
        }
        targets = []
        for figure, key, op, bound in TARGETS:
            value = figures[key]
            ok = value >= bound if op == ">=" else value <= bound
            targets.append(
                {
                    "figure": figure,
                    "value": value,
                    "target": f"{op} {bound:g}x",
                    "unit": "x",
                    "status": "pass" if ok else "short",
                }
            )
        limit = self.max_shard * 1.1
        targets.append(
            {
                "figure": "master peak private (RssAnon) growth, gather save",
                "value": peak["RssAnon"] / 2**20,
                "unit": " MiB",
                "target": f"<= {limit / 2**20:.0f} MiB (max_shard_size {self.max_shard / 2**20:.0f} MiB + 10%)",
                "status": "pass" if peak["RssAnon"] <= limit else "short",
            }
        )
        return {
            "meta": {
                "argv": sys.argv[1:],
                "quick": self.args.quick,
                "size_human": self.args.size,
                "model_bytes": self.model_bytes,
                "state_bytes": state_bytes,
                "hidden": self.hidden,
                "layers": LAYERS,
                "world": WORLD,
                "reshard_world": RESHARD_WORLD,
                "max_shard_size": self.max_shard,
                "hf_files": max(self.mapping.values()),
                "ours_hf_files": self.ours_hf_files,
                "repeat": self.args.repeat,
                "nproc": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "ray": ray.__version__,
                "loads_cold": cold,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            "seconds": {**saves, **loads},
            "median_s": med,
            "nonblocking": {"blocked_s": blocked, "committed_s": nonblocking_total, "first_blocked_s": first_blocked},
            "memory": memory,
            "figures": figures,
            "targets": targets,
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark in a private Ray; the result document."""
    size = int(parse_size(args.size, field_name="--size"))
    workdir = args.workdir or tempfile.mkdtemp(prefix="ray-ckpt-sharded-bench-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    load_start = load_average()
    started = time.time()
    _init_ray(3 * size)
    try:
        doc = Bench(args, workdir).run()
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    doc["meta"]["load_average"] = {"start": load_start, "end": load_average()}
    doc["meta"]["seconds"] = time.time() - started
    return doc


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(doc: dict[str, Any]) -> str:
    """The targets table and the seconds of every case, with a heading line."""
    meta, med = doc["meta"], doc["median_s"]
    load = meta["load_average"]
    lines = [
        f"**FSDP2, {meta['world']} ranks (gloo, CPU): {meta['layers']} x Linear({meta['hidden']}, {meta['hidden']}) "
        f"= {_gib(meta['model_bytes'])} fp32 model + Adam = {_gib(meta['state_bytes'])} of state; max_shard_size "
        f"{_gib(meta['max_shard_size'])} ({meta['ours_hf_files']} model files, DCP HF {meta['hf_files']}); "
        f"medians of {meta['repeat']} rounds; "
        f"{meta['nproc']} cores; load average at start {load['start'][0]:.2f}, at end {load['end'][0]:.2f} (1-min); "
        f"loads {'cold (page cache dropped)' if meta['loads_cold'] else 'page cache NOT dropped'}**",
        "",
        "| figure | measured | target | status |",
        "|---|---:|---:|---|",
    ]
    for row in doc["targets"]:
        unit = row["unit"]
        value = f"{row['value']:.3g}x" if unit == "x" else f"{row['value']:.0f}{unit}"
        lines.append(f"| {row['figure']} | {value} | {row['target']} | {row['status']} |")
    what = {
        "ours_direct": "ray-ckpt save, direct mode (model + Adam), blocking",
        "ours_gather": "ray-ckpt save, gather mode (model + Adam), blocking",
        "dcp": "dcp.save, FileSystemWriter (model + Adam)",
        "ours_hf": "ray-ckpt save of the model only (direct): an HF folder",
        "dcp_hf": "dcp.save HuggingFaceStorageWriter + consolidate on every rank + fsync (model only)",
        "ours_load": "ray-ckpt WorkerClient.load(into=) 4 -> 2 + set_state_dict (ranged reads, every block checked)",
        "dcp_load": "dcp.load 4 -> 2 + set_state_dict (nothing checked)",
        "ours_whole_load": "CheckpointStore.load of the whole model, in the driver (every block checked)",
        "safetensors_load_file": "safetensors.torch.load_file(backend='pread') of the same files (nothing checked)",
    }
    lines += ["", "| case | what | median s | runs s |", "|---|---|---:|---|"]
    for kind, runs in doc["seconds"].items():
        lines.append(f"| {kind} | {what[kind]} | {med[kind]:.2f} | {', '.join(f'{r:.2f}' for r in runs)} |")
    nb = doc["nonblocking"]
    growth = doc["figures"]
    lines += [
        "",
        f"- non-blocking {NONBLOCKING_MODE} save: blocked {statistics.median(nb['blocked_s']):.3f} s median "
        f"(runs {', '.join(f'{b:.3f}' for b in nb['blocked_s'])}; first save, buffers allocated: "
        f"{nb['first_blocked_s']:.3f} s), committed {statistics.median(nb['committed_s']):.2f} s",
        f"- master memory growth during a gather save (peak over rounds): RssAnon "
        f"{growth['master_rss_anon_growth_bytes'] / 2**20:.0f} MiB, USS "
        f"{growth['master_uss_growth_bytes'] / 2**20:.0f} MiB, "
        f"VmRSS {growth['master_vmrss_growth_bytes'] / 2**20:.0f} MiB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    doc = run(args)
    write_report(doc, args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
