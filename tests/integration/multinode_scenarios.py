"""Multi-node scenarios on a ``ray.cluster_utils.Cluster`` (several raylets on one machine).

Each scenario runs in its own process, because the pytest process already holds the session's
local Ray and a Cluster cannot live beside it::

    python -m tests.integration.multinode_scenarios <scenario> <storage_dir>

The last stdout line starting with ``RESULT `` is a JSON object that tests/integration/test_multinode.py
asserts on; the exit status is 0 only when every in-scenario check passed. The cluster is always
shut down in a ``finally`` block (and on SIGTERM), so no raylet outlives the scenario.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import ray_ckpt
from ray_ckpt import CheckpointConfig, CheckpointStore
from ray_ckpt.core.layout import step_dir

logger = logging.getLogger("multinode_scenarios")

NAMESPACE = "ray_ckpt_multinode"
OBJECT_STORE_BYTES = 120 * 1024 * 1024
PIN = 0.01  # a sliver of a node's custom resource pins an actor there without using it up
SAVE_TIMEOUT_S = 4.0
# Fast failure detection: the GCS declares a silent raylet dead after ~2 s instead of ~30 s.
HEAD_SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 4,
}


# -- cluster ------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_cluster(nodes: dict[str, dict[str, float]]) -> Iterator[tuple[Cluster, dict[str, Any]]]:
    """A head (resource ``head``) plus one raylet per entry of ``nodes`` (name -> extra resources)."""
    cluster: Cluster | None = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,  # every actor here asks for 0 CPUs; no idle workers prestarted per node
                "resources": {"head": 1},
                "object_store_memory": OBJECT_STORE_BYTES,
                "include_dashboard": False,
                "_system_config": HEAD_SYSTEM_CONFIG,
            },
        )
        handles = {
            name: cluster.add_node(
                wait=False,
                num_cpus=0,
                resources={name: 1.0, **extra},
                object_store_memory=OBJECT_STORE_BYTES,
            )
            for name, extra in nodes.items()
        }
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
        yield cluster, handles
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def kill_node(cluster: Cluster, node: Any, timeout_s: float = 30.0) -> float:
    """SIGKILL a node's processes (no graceful drain) and wait until the GCS marks it dead."""
    started = time.monotonic()
    cluster.remove_node(node, allow_graceful=False)
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if not any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"node {node.node_id} still alive {timeout_s}s after it was killed")


def pinned(node_name: str) -> dict[str, Any]:
    """Actor options that place an actor on the node carrying the custom resource ``node_name``."""
    return {"resources": {node_name: PIN}}


# -- state --------------------------------------------------------------------------------------
def rank_state(rank: int, step: int, numel: int = 300_000) -> dict[str, torch.Tensor]:
    """Replicated keys (identical on every rank) plus this rank's own partition, all > 100 KB.

    Bigger than Ray's inline limit, so gather mode really moves them through the object stores.
    """
    gen = torch.Generator().manual_seed(1000 + step)
    shared = {"embed.weight": torch.randn(128, 256, generator=gen), "norm.bias": torch.full((64,), float(step))}
    own = {
        f"layers.{rank}.weight": torch.arange(numel, dtype=torch.float32) * (rank + 1) + step,
        f"layers.{rank}.bias": torch.full((16,), float(rank)),
    }
    return {**shared, **own}


def expected_state(step: int, world_size: int) -> dict[str, torch.Tensor]:
    """What a step saved by ranks 0..world_size-1 must load as."""
    out: dict[str, torch.Tensor] = {}
    for rank in range(world_size):
        out.update(rank_state(rank, step))
    return out


def mismatches(store: CheckpointStore, step: int, world_size: int) -> list[str]:
    """Keys of ``step`` whose loaded tensor differs from the expected one (missing/extra included)."""
    loaded = store.load(step)
    expected = expected_state(step, world_size)
    bad = sorted(set(loaded) ^ set(expected))
    bad += [k for k in sorted(set(loaded) & set(expected)) if not torch.equal(loaded[k], expected[k])]
    store.verify(step)
    return bad


def make_config(storage: str, run_name: str, **overrides: Any) -> CheckpointConfig:
    """A small-shard config (several shards per step) for one run of a scenario."""
    options: dict[str, Any] = {
        "storage_uri": storage,
        "run_name": run_name,
        "metric_name": "loss",
        "mode": "min",
        "max_shard_size": "1MB",
        "save_timeout_s": SAVE_TIMEOUT_S,
    }
    options.update(overrides)
    return CheckpointConfig(**options)


def node_of(actor: Any) -> str:
    """The node id an actor runs on."""
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)


def pid_of(actor: Any) -> int:
    """The process id of an actor."""
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def restarted_pid(actor: Any, pid_before: int) -> int | None:
    """The actor's pid once a new incarnation answers (None while it is down or still the old one)."""
    try:
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
        return None
    return pid if pid != pid_before else None


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


# -- actors -------------------------------------------------------------------------------------
@ray.remote(num_cpus=0, max_restarts=0)
class Rank:
    """A training rank: saves deterministic state for (rank, step) through WorkerClient.

    ``connect`` (re)binds it to a run, so one process serves several runs of a scenario.
    """

    def __init__(self) -> None:
        self.client: ray_ckpt.WorkerClient | None = None
        self.rank = 0
        self.future: Any = None

    def connect(self, run_name: str, rank: int, world_size: int) -> str:
        """Become ``rank`` of ``world_size`` in ``run_name``; returns this actor's node id."""
        self.client = ray_ckpt.WorkerClient(run_name, rank, world_size)
        self.rank = rank
        return ray.get_runtime_context().get_node_id()

    def save(self, step: int, timeout_s: float = 60.0) -> dict[str, Any]:
        """Save and wait for the commit."""
        assert self.client is not None
        started = time.perf_counter()
        trainer = {"step": step, "momentum": torch.ones(4) * step} if self.rank == 0 else None
        info = self.client.save(step, rank_state(self.rank, step), metrics={"loss": 1.0 / step}, trainer_state=trainer)
        info = info.result(timeout_s)
        return {"step": info.step, "world_size": info.world_size, "seconds": time.perf_counter() - started}

    def start_save(self, step: int, handed_over: bool = False) -> None:
        """Start a non-blocking save and return (the step stays pending until every rank is in);
        with ``handed_over``, once this rank's share is with the checkpointer."""
        assert self.client is not None
        self.future = self.client.save(step, rank_state(self.rank, step), metrics={"loss": 1.0 / step})
        if handed_over:
            assert self.future.handed_over(60), "the share never reached the checkpointer"

    def start_slow_direct_save(self, step: int, marker: str, hold_s: float) -> None:
        """Direct mode: write the first planned shard, touch ``marker``, then stall (a rank dying mid-write)."""
        import ray_ckpt.core.writer as writer_module

        real = writer_module.write_planned_file

        def write_then_stall(*args: Any, **kwargs: Any) -> Any:
            digest = real(*args, **kwargs)
            Path(marker).touch()
            time.sleep(hold_s)
            return digest

        writer_module.write_planned_file = write_then_stall
        self.start_save(step)

    def outcome(self, timeout_s: float) -> dict[str, Any]:
        """How the save started by start_save ended: committed step or the error it raised."""
        started = time.perf_counter()
        try:
            info = self.future.result(timeout_s)
            return {"ok": True, "step": info.step, "waited_s": time.perf_counter() - started}
        except Exception as exc:
            return {
                "ok": False,
                "save_aborted": isinstance(exc, ray_ckpt.SaveAbortedError),
                "error_type": type(exc).__name__,
                "error": str(exc).splitlines()[-1] if str(exc) else "",
                "waited_s": time.perf_counter() - started,
            }


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)
class Evaluator:
    """An evaluation actor holding one EvalClient per run (threaded: a blocking wait leaves queries free)."""

    def __init__(self) -> None:
        self.ev: ray_ckpt.EvalClient | None = None

    def connect(self, run_name: str) -> str:
        """Open an EvalClient on ``run_name``; returns this actor's node id."""
        self.ev = ray_ckpt.EvalClient(run_name, retry_s=90.0)
        return ray.get_runtime_context().get_node_id()

    def steps(self) -> list[int]:
        assert self.ev is not None
        return [i.step for i in self.ev.list()]

    def best(self, metric: str, mode: str) -> int | None:
        assert self.ev is not None
        info = self.ev.best(metric, mode)
        return info.step if info else None

    def wait_for(self, after_step: int, timeout_s: float) -> int | None:
        assert self.ev is not None
        info = self.ev.wait_for_checkpoint(after_step, timeout_s)
        return info.step if info else None

    def load_matches(self, step: int, world_size: int) -> list[str]:
        """Load a step from storage on this node; the keys that differ from the expected state."""
        assert self.ev is not None
        loaded = self.ev.load(step)
        expected = expected_state(step, world_size)
        bad = sorted(set(loaded) ^ set(expected))
        return bad + [k for k in sorted(set(loaded) & set(expected)) if not torch.equal(loaded[k], expected[k])]


def connect(pairs: list[tuple[Any, int]], run_name: str, world_size: int) -> list[str]:
    """Bind each (Rank actor, rank) to a run and wait until all are up; their node ids."""
    return ray.get([actor.connect.remote(run_name, rank, world_size) for actor, rank in pairs], timeout=120)


# -- scenarios ----------------------------------------------------------------------------------
def scenario_modes(storage: str) -> dict[str, Any]:
    """Gather and direct mode across nodes: checkpointer on node_a, 4 ranks on node_b/node_c."""
    result: dict[str, Any] = {}
    with local_cluster({"node_a": {}, "node_b": {}, "node_c": {}}) as (_, nodes):
        world_size = 4
        ranks = [Rank.options(**pinned("node_b" if r % 2 == 0 else "node_c")).remote() for r in range(world_size)]
        evaluator = Evaluator.options(**pinned("node_c")).remote()
        for mode in ("gather", "direct"):
            run = f"modes-{mode}"
            config = make_config(storage, run, write_mode=mode, save_timeout_s=60.0)
            handle = ray_ckpt.start_checkpointer(config, **pinned("node_a"))
            rank_nodes = connect([(r, i) for i, r in enumerate(ranks)], run, world_size)
            saves = {step: ray.get([r.save.remote(step) for r in ranks], timeout=120) for step in (1, 2)}
            store = CheckpointStore(config=config)
            ray.get(evaluator.connect.remote(run), timeout=120)
            bad = {step: mismatches(store, step, world_size) for step in (1, 2)}
            trainer = store.load_trainer_state(2)
            result[mode] = {
                "checkpointer_node": node_of(handle.actor),
                "rank_nodes": rank_nodes,
                "node_ids": {name: n.node_id for name, n in nodes.items()},
                "committed": [i.step for i in store.list()],
                "world_sizes": sorted({s["world_size"] for rs in saves.values() for s in rs}),
                "mismatches": bad,
                "remote_load_mismatches": ray.get(evaluator.load_matches.remote(2, world_size), timeout=60),
                "trainer_ok": trainer["step"] == 2 and torch.equal(trainer["momentum"], torch.ones(4) * 2),
                "shards": len([f for f in store.read_manifest(2).files if f.startswith("model-")]),
                "save_seconds": max(s["seconds"] for s in saves[2]),
            }
            assert result[mode]["checkpointer_node"] == nodes["node_a"].node_id
            assert nodes["node_a"].node_id not in result[mode]["rank_nodes"]
            assert result[mode]["committed"] == [1, 2] and not any(bad.values()), result[mode]
            handle.shutdown()
    return result


def _abort_checks(store: CheckpointStore, handle: Any, step: int, committed: list[int]) -> dict[str, Any]:
    """What a reader sees of an aborted step: nothing committed, no step directory, nothing pending.

    The abort removes the step directory on the writer thread after the ranks hear of it, so
    allow it a few seconds.
    """
    found = [i.step for i in store.list()]
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not store.storage.exists(step_dir(step)), 15, f"step {step}'s directory to go")
    return {
        "committed": found,
        "step_dir_exists": store.storage.exists(step_dir(step)),
        "pending": handle.stats()["pending"],
        "expected_committed": committed,
    }


def scenario_worker_node_failure(storage: str) -> dict[str, Any]:
    """A worker's node dies mid-save (gather: before/after it reported; direct: mid-write).

    Every case: the step aborts, nothing of it is visible, and the next step commits with a
    replacement rank on another node (``spare``, on node_b).
    """
    result: dict[str, Any] = {}
    names = ["node_a", "node_b", "victim_1", "victim_2", "victim_3"]
    with local_cluster({n: {} for n in names}) as (cluster, nodes):
        r0, r2, spare = (Rank.options(**pinned("node_b")).remote() for _ in range(3))
        victims = {n: Rank.options(**pinned(n)).remote() for n in names[2:]}

        # 1. gather: rank 1's node dies before it reports -> abort after save_timeout_s.
        config = make_config(storage, "wf-gather", write_mode="gather")
        handle = ray_ckpt.start_checkpointer(config, **pinned("node_a"))
        store = CheckpointStore(config=config)
        connect([(r0, 0), (victims["victim_1"], 1)], "wf-gather", 2)
        ray.get([r0.save.remote(1), victims["victim_1"].save.remote(1)], timeout=60)
        ray.get(r0.start_save.remote(2), timeout=60)
        wait_until(lambda: handle.stats()["pending"] == [2], 30, "step 2 pending")
        dead_after = kill_node(cluster, nodes["victim_1"])
        outcome = ray.get(r0.outcome.remote(60), timeout=90)
        checks = _abort_checks(store, handle, 2, [1])
        connect([(spare, 1)], "wf-gather", 2)
        ray.get([r0.save.remote(3), spare.save.remote(3)], timeout=60)
        result["gather_before_report"] = {
            "outcome": outcome,
            "node_dead_after_s": dead_after,
            **checks,
            "replacement_step": 3,
            "after_replacement": [i.step for i in store.reload().list()],
            "replacement_mismatches": mismatches(store, 3, 2),
        }
        handle.shutdown()

        # 2. gather, 3 ranks: rank 1 reports, then its node dies before the master fetched its
        #    object; the last rank's report starts the fetch, which must fail fast, not hang.
        config = make_config(storage, "wf-lost", write_mode="gather", save_timeout_s=60.0)
        handle = ray_ckpt.start_checkpointer(config, **pinned("node_a"))
        store = CheckpointStore(config=config)
        connect([(r0, 0), (victims["victim_2"], 1), (r2, 2)], "wf-lost", 3)
        ray.get([r0.start_save.remote(1, True), victims["victim_2"].start_save.remote(1, True)], timeout=60)
        dead_after = kill_node(cluster, nodes["victim_2"])
        started = time.monotonic()
        ray.get(r2.start_save.remote(1), timeout=60)
        outcome = ray.get(r0.outcome.remote(90), timeout=120)
        aborted_after = time.monotonic() - started
        checks = _abort_checks(store, handle, 1, [])
        connect([(spare, 1)], "wf-lost", 3)
        ray.get([r0.save.remote(2), spare.save.remote(2), r2.save.remote(2)], timeout=60)
        result["gather_object_lost"] = {
            "outcome": outcome,
            "node_dead_after_s": dead_after,
            "aborted_after_s": aborted_after,
            **checks,
            "replacement_step": 2,
            "after_replacement": [i.step for i in store.reload().list()],
            "replacement_mismatches": mismatches(store, 2, 3),
        }
        handle.shutdown()

        # 3. direct: rank 1 wrote one shard of its plan and stalls; its node dies mid-write.
        config = make_config(storage, "wf-direct", write_mode="direct", max_shard_size="256KB")
        handle = ray_ckpt.start_checkpointer(config, **pinned("node_a"))
        store = CheckpointStore(config=config)
        connect([(r0, 0), (victims["victim_3"], 1)], "wf-direct", 2)
        ray.get([r0.save.remote(1), victims["victim_3"].save.remote(1)], timeout=60)
        marker = os.path.join(tempfile.mkdtemp(prefix="ray-ckpt-mn-"), "victim-wrote-a-shard")
        ray.get([r0.start_save.remote(2), victims["victim_3"].start_slow_direct_save.remote(2, marker, 600.0)])
        wait_until(lambda: os.path.exists(marker), 30, "the victim's first shard")
        partial = store.storage.exists(step_dir(2))
        dead_after = kill_node(cluster, nodes["victim_3"])
        outcome = ray.get(r0.outcome.remote(60), timeout=90)
        checks = _abort_checks(store, handle, 2, [1])
        connect([(spare, 1)], "wf-direct", 2)
        ray.get([r0.save.remote(3), spare.save.remote(3)], timeout=60)
        result["direct_mid_write"] = {
            "outcome": outcome,
            "partial_step_dir_before_kill": partial,
            "node_dead_after_s": dead_after,
            **checks,
            "replacement_step": 3,
            "after_replacement": [i.step for i in store.reload().list()],
            "replacement_mismatches": mismatches(store, 3, 2),
        }
        handle.shutdown()
    for case, data in result.items():
        assert data["outcome"]["save_aborted"] and "rank" in data["outcome"]["error"], (case, data)
        assert data["committed"] == data["expected_committed"] and not data["step_dir_exists"], (case, data)
        assert data["after_replacement"] == data["expected_committed"] + [data["replacement_step"]], (case, data)
        assert not data["replacement_mismatches"], (case, data)
    return result


def scenario_checkpointer_node_failure(storage: str) -> dict[str, Any]:
    """The checkpointer's node dies: it restarts on the surviving ckpt_host node and eval clients carry on."""
    host = {"ckpt_host": 1.0}
    with local_cluster({"node_a": host, "node_b": host, "node_c": {}}) as (cluster, nodes):
        run = "cf-direct"
        config = make_config(storage, run, write_mode="direct", max_restarts=2)
        ranks = [Rank.options(**pinned("node_c")).remote() for _ in range(2)]
        evaluator = Evaluator.options(**pinned("node_c")).remote()
        # Soft affinity puts it on node_a; the shared ckpt_host resource lets it restart on node_b.
        strategy = NodeAffinitySchedulingStrategy(nodes["node_a"].node_id, soft=True)
        handle = ray_ckpt.start_checkpointer(config, resources={"ckpt_host": PIN}, scheduling_strategy=strategy)
        connect([(r, i) for i, r in enumerate(ranks)], run, 2)
        for step in (1, 2, 3):
            ray.get([r.save.remote(step) for r in ranks], timeout=60)
        # in the driver: no index follower, whose thread would race the cluster shutdown below (see eval.py)
        ev = ray_ckpt.EvalClient(run, retry_s=90.0, follow_index=False)
        ray.get(evaluator.connect.remote(run), timeout=120)
        ev.report_eval(2, {"eval/score": 9.0})
        ev.report_eval(3, {"eval/score": 1.0})
        before = {
            "node": node_of(handle.actor),
            "pid": pid_of(handle.actor),
            "steps": ray.get(evaluator.steps.remote(), timeout=60),
        }
        assert before["node"] == nodes["node_a"].node_id, before
        # in flight when the node dies: a blocking wait for the next checkpoint, and half a save
        waiting = evaluator.wait_for.remote(3, 120.0)
        ray.get(ranks[0].start_save.remote(4), timeout=60)
        wait_until(lambda: handle.stats()["pending"] == [4], 30, "step 4 pending")
        dead_after = kill_node(cluster, nodes["node_a"])
        started = time.monotonic()
        in_flight = ray.get(ranks[0].outcome.remote(60), timeout=90)
        wait_until(lambda: restarted_pid(handle.actor, before["pid"]) is not None, 120, "the checkpointer's restart")
        back_after = time.monotonic() - started
        steps_after = [i.step for i in ev.list()]
        after = {
            "node": node_of(handle.actor),
            "pid": pid_of(handle.actor),
            "steps": steps_after,
            "stats": handle.stats(),
            "best_eval": ev.best("eval/score", "max").step,
            "evaluator_steps": ray.get(evaluator.steps.remote(), timeout=60),
            "evaluator_best_eval": ray.get(evaluator.best.remote("eval/score", "max"), timeout=60),
            "step_4_dir_exists": CheckpointStore(config=config).storage.exists(step_dir(4)),
        }
        ray.get([r.save.remote(4) for r in ranks], timeout=60)  # the retried save commits
        store = CheckpointStore(config=config)
        result = {
            "node_ids": {name: n.node_id for name, n in nodes.items()},
            "before": before,
            "after": after,
            "node_dead_after_s": dead_after,
            "queries_back_after_s": back_after,
            "in_flight_save": in_flight,
            "waiter_got": ray.get(waiting, timeout=120),
            "latest_after_retry": ev.latest().step,
            "committed": [i.step for i in store.list()],
            "mismatches": mismatches(store, 4, 2),
        }
    assert result["after"]["node"] == result["node_ids"]["node_b"], result
    assert result["after"]["steps"] == [1, 2, 3] and result["after"]["best_eval"] == 2, result
    assert result["waiter_got"] == 4 and result["committed"] == [1, 2, 3, 4] and not result["mismatches"], result
    return result


SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {
    "modes": scenario_modes,
    "worker_node_failure": scenario_worker_node_failure,
    "checkpointer_node_failure": scenario_checkpointer_node_failure,
}


def main(scenario: str, storage: str) -> dict[str, Any]:
    """Run one scenario against a fresh cluster; returns its JSON-able result."""
    if scenario not in SCENARIOS:
        raise SystemExit(f"unknown scenario {scenario!r}; choose from {sorted(SCENARIOS)}")
    started = time.monotonic()
    result = SCENARIOS[scenario](storage)
    return {"scenario": scenario, "seconds": time.monotonic() - started, "result": result}


def _terminate(signum: int, _frame: Any) -> None:
    """SIGTERM -> SystemExit, so the cluster's finally block still runs."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: python -m tests.integration.multinode_scenarios {{{'|'.join(SCENARIOS)}}} STORAGE")
    try:
        output = main(sys.argv[1], sys.argv[2])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        raise SystemExit(1) from None
    print("RESULT " + json.dumps(output, default=str), flush=True)
