"""The memory tier on a ``ray.cluster_utils.Cluster`` (head + 3 raylets, more added as nodes die).

Run by tests/integration/test_memory_tier.py in its own process, like the multi-node scenarios
(the pytest process already holds the session's local Ray)::

    python -m tests.integration.memory_scenarios memory_tier <storage_dir>

One cluster walks through the failures in order, each check an assertion here: saves commit in
memory with a replica on the other training node and every third step persists; a killed rank
resumes from the newest memory step; evaluators on two nodes read a persisted-only step from
storage once per node; the checkpointer restarts and lists its memory steps again; a lost node's
rank resumes resharded (2 -> 3 ranks) from the surviving replicas; a node lost mid-replication
leaves its step invisible and the next step commits; Ray's drain of a node flushes the newest
memory step to storage; losing a step's every copy falls back to the newest persisted step.
Prints ``RESULT {json}`` last; the cluster is shut down in a ``finally`` block (and on SIGTERM).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig, EvalClient, WorkerClient, start_checkpointer
from ray_ckpt.distributed.drain import request_drain
from tests.integration.multinode_scenarios import OBJECT_STORE_BYTES, kill_node, local_cluster, pinned, wait_until

logger = logging.getLogger("memory_scenarios")

RUN = "mem"
ROWS, COLS = 1024, 128  # 512 KiB of float32 per tensor: bigger than Ray's inline limit
WAIT_S = 120.0  # generous under load


def full(step: int, salt: float = 0.0) -> torch.Tensor:
    """The whole tensor as step ``step`` saved it."""
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + step * 1000.0 + salt


def rows(rank: int, world: int) -> tuple[int, int]:
    """The rows a rank holds (dim-0 shards, uneven when ``ROWS % world``)."""
    base, extra = divmod(ROWS, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@ray.remote(num_cpus=0)
class Rank:
    """One training rank: saves its rows of ``w`` (and Adam-like trainer state), loads any box."""

    def __init__(self, rank: int, world: int) -> None:
        logging.basicConfig(level=logging.WARNING)
        self.rank, self.world = rank, world
        self.client = WorkerClient(RUN, rank, world)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _state(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        lo, hi = rows(self.rank, self.world)
        model = {"w": ray_ckpt.Shard(full(step)[lo:hi].clone(), (ROWS, COLS), (lo, 0))}
        trainer = {"exp_avg": ray_ckpt.Shard(full(step, 0.5)[lo:hi].clone(), (ROWS, COLS), (lo, 0)), "step": step}
        return model, trainer

    def save(self, step: int, gate: str | None = None, persist: bool | None = None) -> list[str]:
        """A blocking save; with ``gate`` the rank stops after its route (before its holder copies)
        until the driver creates ``gate.go``: the driver kills a node mid-replication there."""
        if gate is not None:
            from ray_ckpt.distributed import worker

            put = worker._put

            def gated(flat: Any) -> Any:
                Path(f"{gate}.ready.{self.rank}").touch()
                deadline = time.monotonic() + WAIT_S
                while not Path(f"{gate}.go").exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError("the driver never opened the gate")
                    time.sleep(0.05)
                worker._put = put
                return put(flat)

            worker._put = gated
        model, trainer = self._state(step)
        return self.client.save(step, model, trainer_state=trainer, blocking=True, persist=persist).result().durability

    def load(self, step: Any = "latest") -> dict[str, Any]:
        """Load this rank's box; whether it equals the saved step's rows exactly."""
        lo, hi = rows(self.rank, self.world)
        into = {"w": ray_ckpt.Shard(torch.zeros(hi - lo, COLS), (ROWS, COLS), (lo, 0))}
        trainer = {"exp_avg": ray_ckpt.Shard(torch.zeros(hi - lo, COLS), (ROWS, COLS), (lo, 0))}
        got = self.client.load(step, into=into, trainer_into=trainer)
        exact = torch.equal(into["w"].local, full(got)[lo:hi]) and torch.equal(
            trainer["exp_avg"].local, full(got, 0.5)[lo:hi]
        )
        return {"step": got, "source": self.client.last_load_source, "exact": exact}


@ray.remote(num_cpus=0)
class Evaluator:
    """An evaluation worker; reports the bytes its process read (``/proc/self/io`` rchar)."""

    def __init__(self) -> None:
        self.client = EvalClient(RUN, follow_index=False)

    def load(self, step: int) -> dict[str, Any]:
        before = _rchar()
        state = self.client.load(step)
        return {"read": _rchar() - before, "exact": torch.equal(state["w"], full(step))}


def _rchar(pid: int | str = "self") -> int:
    """Bytes a process read through read/pread calls (page-cache hits included)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/<pid>/io")


def _add_node(cluster: Any, name: str) -> Any:
    node = cluster.add_node(num_cpus=0, resources={name: 1.0}, object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    return node


def _listed(handle: Any) -> dict[int, list[str]]:
    return {info.step: info.durability for info in handle.list()}


def scenario_memory_tier(storage: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with local_cluster({"a": {}, "b": {}, "c": {}}) as (cluster, nodes):
        config = CheckpointConfig(
            storage_uri=storage,
            run_name=RUN,
            memory_replicas=1,
            memory_keep_last=2,
            persist_interval_steps=3,
            eval_cache_bytes="64MB",
            save_timeout_s=60,
        )
        handle = start_checkpointer(config, resources={"head": 0.01})
        ranks = [Rank.options(**pinned("a")).remote(0, 2), Rank.options(**pinned("b")).remote(1, 2)]
        node_ids = {name: node.node_id for name, node in nodes.items()}

        # 1. every save commits in memory (1 + 1 copies on the two training nodes); every third persists
        for step in range(1, 7):
            durability = ray.get([r.save.remote(step) for r in ranks])
            expected = ["memory", "local"] if step % 3 == 0 else ["memory"]
            assert durability == [expected, expected], (step, durability)
        listed = _listed(handle)
        assert listed == {3: ["local"], 5: ["memory"], 6: ["memory", "local"]}, listed  # keep_last 2 in memory
        memory = handle.stats()["memory"]
        assert memory["steps"] == [5, 6], memory
        assert set(memory["holders"]) == {node_ids["a"], node_ids["b"]}, memory  # never the head's node
        step_bytes = 2 * ROWS * COLS * 4  # model + trainer tensors, both ranks
        for node in (node_ids["a"], node_ids["b"]):  # each node: its rank's copy + the other's replica
            assert memory["bytes_held"][node] == 2 * step_bytes, memory
        result["bytes_held"] = memory["bytes_held"]

        # 2. a rank crashes: its replacement resumes from the newest memory step, bit-exact
        ray.kill(ranks[0], no_restart=True)
        ranks[0] = Rank.options(**pinned("a")).remote(0, 2)
        loaded = ray.get(ranks[0].load.remote())
        assert loaded == {"step": 6, "source": "memory", "exact": True}, loaded

        # 3. evaluators on two nodes read a persisted-only step from storage once per node
        evaluators = [Evaluator.options(**pinned(n)).remote() for n in ("a", "a", "c", "c")]
        reads = [ray.get(e.load.remote(3)) for e in evaluators]  # one after another: the cache is per node
        assert all(r["exact"] for r in reads), reads
        holders = handle.stats()["memory"]["holders"]
        model_bytes = ROWS * COLS * 4
        assert {holders[node_ids[n]]["cache_loads"] for n in ("a", "c")} == {1}, holders
        assert all(r["read"] < model_bytes // 4 for r in reads), reads  # none read the step's bytes itself
        memory_read = ray.get(evaluators[2].load.remote(6))  # a memory step: from the holders, not storage
        assert memory_read["exact"] and memory_read["read"] < model_bytes // 4, memory_read
        result["eval_reads"] = [r["read"] for r in reads]

        # 4. the checkpointer restarts: it lists its memory steps again (from the holders)
        ray.kill(handle.actor, no_restart=False)
        wait_until(lambda: _safe_list(handle) == listed, WAIT_S, "the restarted checkpointer lists its steps")
        loaded = ray.get(ranks[0].load.remote())
        assert loaded == {"step": 6, "source": "memory", "exact": True}, loaded

        # 5. node b dies (rank 1 and its holder): 3 ranks resume resharded from the replicas on a
        kill_node(cluster, nodes["b"])
        wait_until(lambda: node_ids["b"] not in handle.stats()["memory"]["holders"], WAIT_S, "node b's holder dropped")
        assert _listed(handle) == listed, _listed(handle)  # every step still whole: the replicas serve
        resumed = [Rank.options(**pinned(n)).remote(r, 3) for r, n in enumerate(("a", "c", "c"))]
        loads = ray.get([r.load.remote() for r in resumed])
        assert loads == [{"step": 6, "source": "memory", "exact": True}] * 3, loads
        for rank in resumed:
            ray.kill(rank, no_restart=True)

        # 6. training goes on on a and c; node c dies mid-replication: that step never shows
        ranks = [ranks[0], Rank.options(**pinned("c")).remote(1, 2)]
        assert ray.get([r.save.remote(7, persist=True) for r in ranks]) == [["memory", "local"]] * 2
        gate = f"{storage}/gate"
        pending = [r.save.remote(8, gate) for r in ranks]
        wait_until(lambda: all(Path(f"{gate}.ready.{r}").exists() for r in (0, 1)), WAIT_S, "both ranks routed step 8")
        kill_node(cluster, nodes["c"])
        Path(f"{gate}.go").touch()
        outcomes = []
        for ref in pending:
            try:
                outcomes.append(ray.get(ref))
            except ray_ckpt.SaveAbortedError:
                outcomes.append("aborted")
            except ray.exceptions.RayActorError:
                outcomes.append("rank died")
        assert outcomes == ["aborted", "rank died"], outcomes
        assert 8 not in _listed(handle), _listed(handle)
        nodes["d"] = _add_node(cluster, "d")
        node_ids["d"] = nodes["d"].node_id
        ranks[1] = Rank.options(**pinned("d")).remote(1, 2)
        assert ray.get([r.save.remote(9) for r in ranks]) == [["memory", "local"]] * 2  # 9 % 3 == 0
        assert ray.get([r.save.remote(10) for r in ranks]) == [["memory"], ["memory"]]
        result["after_mid_replication"] = _listed(handle)

        # 7. Ray drains node d (a preemption notice): the newest memory step is flushed to storage
        request_drain(node_ids["d"], deadline_s=time.time() + 60, reason="preemption")
        wait_until(lambda: _listed(handle).get(10) == ["memory", "local"], WAIT_S, "step 10 flushed on the drain")
        assert ray.get([r.save.remote(11) for r in ranks]) == [["memory"], ["memory"]]

        # 8. nodes a and d die: step 11 loses every copy and leaves the index; a new rank resumes
        # from the newest persisted step (10), whole, never a mix of steps
        for name in ("a", "d"):
            kill_node(cluster, nodes[name])
        wait_until(lambda: 11 not in (_safe_list(handle) or {11: []}), WAIT_S, "step 11 leaves the index")
        nodes["e"] = _add_node(cluster, "e")
        survivor = Rank.options(**pinned("e")).remote(0, 1)
        loaded = ray.get(survivor.load.remote())
        assert loaded == {"step": 10, "source": "storage", "exact": True}, loaded
        assert handle.stats()["memory"]["lost"] == [11], handle.stats()["memory"]
        result["final"] = _safe_list(handle)
        handle.shutdown()
    return result


def _safe_list(handle: Any) -> dict[int, list[str]] | None:
    """The served index, or None while the checkpointer restarts."""
    try:
        return _listed(handle)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        return None


SCENARIOS = {"memory_tier": scenario_memory_tier}


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        started = time.monotonic()
        output = {"scenario": sys.argv[1], "result": SCENARIOS[sys.argv[1]](sys.argv[2])}
        output["seconds"] = time.monotonic() - started
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        raise SystemExit(1) from None
    print("RESULT " + json.dumps(output, default=str), flush=True)
