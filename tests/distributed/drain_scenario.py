"""Ray's drain signal on a real ``ray.cluster_utils.Cluster`` (head + 2 raylets), in its own process.

Run by tests/distributed/test_drain.py (the pytest process may already hold the session's local
Ray, and a driver cannot join a second cluster beside it)::

    python -m tests.distributed.drain_scenario drain <unused>

Prints ``RESULT {json}`` last, like tests/integration/multinode_scenarios.py, whose cluster
helpers it uses; the cluster is shut down in a ``finally`` block (and on SIGTERM).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
import traceback
from typing import Any

import ray

from ray_ckpt.distributed.drain import DrainRejected, DrainWatcher, draining_nodes, request_drain
from tests.integration.multinode_scenarios import local_cluster, pinned, wait_until

POLL_INTERVAL_S = 0.2
WAIT_S = 60.0  # generous under load; a quiet machine sees a drain within one poll


@ray.remote(num_cpus=0)
class Watcher:
    """Stands in for the checkpointer: a DrainWatcher over the training nodes, in an async actor."""

    def __init__(self) -> None:
        self.fired: list[tuple[str, float | None, float]] = []
        self.watcher: DrainWatcher | None = None

    async def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def draining(self) -> dict[str, float | None]:
        return await asyncio.to_thread(draining_nodes)  # the default: this actor's own cluster

    async def watch(self, nodes: list[str]) -> None:
        async def on_drain(node: str, deadline: float | None) -> None:
            self.fired.append((node, deadline, time.time()))

        self.watcher = DrainWatcher(lambda: nodes, on_drain, interval_s=POLL_INTERVAL_S)
        self.watcher.start()

    async def report(self) -> dict[str, Any]:
        assert self.watcher is not None
        return {"fired": self.fired, "reported": sorted(self.watcher.reported)}

    async def stop(self) -> None:
        assert self.watcher is not None
        await self.watcher.stop()


@ray.remote(num_cpus=0)
class Busy:
    """Anything running keeps a node from being idle; a drained idle node ends at once."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def scenario_drain() -> dict[str, Any]:
    """Drain a busy training node with reason PREEMPTION; the watcher on another node sees it once."""
    with local_cluster({"node_a": {}, "node_b": {}}) as (_cluster, handles):
        ids = {name: handle.node_id for name, handle in handles.items()}
        watcher = Watcher.options(**pinned("node_a")).remote()
        busy = Busy.options(**pinned("node_b")).remote()
        assert ray.get(watcher.node.remote()) == ids["node_a"]
        assert ray.get(busy.node.remote()) == ids["node_b"]
        before = ray.get(watcher.draining.remote())
        ray.get(watcher.watch.remote(sorted(ids.values())))

        try:  # Ray refuses an idle termination of a node that runs something
            request_drain(ids["node_b"], deadline_s=None, reason="idle_termination")
            idle_rejection = None
        except DrainRejected as exc:
            idle_rejection = str(exc)

        deadline = time.time() + 30.0
        requested = time.time()
        accepted = request_drain(ids["node_b"], deadline_s=deadline, message="drain_scenario")
        seen: dict[str, float | None] = {}

        def drain_seen() -> bool:
            seen.update(ray.get(watcher.draining.remote()))
            return ids["node_b"] in seen

        wait_until(drain_seen, WAIT_S, "node_b listed by draining_nodes() in an actor")
        seen_after_s = time.time() - requested
        wait_until(lambda: ray.get(watcher.report.remote())["fired"], WAIT_S, "the drain callback")
        # a second request replaces the deadline (here: none); more polls of the same drain fire nothing
        redrain_accepted = request_drain(ids["node_b"], deadline_s=None, message="drain_scenario again")
        wait_until(lambda: draining_nodes().get(ids["node_b"], 0.0) is None, WAIT_S, "the deadline replaced")
        time.sleep(5 * POLL_INTERVAL_S)
        while_draining = ray.get(watcher.report.remote())
        alive_while_draining = {n["NodeID"]: n["Alive"] for n in ray.nodes()}

        ray.kill(busy)  # its last worker gone, a draining node ends: the drain completes
        wait_until(lambda: ids["node_b"] not in draining_nodes(), WAIT_S, "node_b leaving the draining table")
        wait_until(lambda: not ray.get(watcher.report.remote())["reported"], WAIT_S, "the watcher forgetting node_b")
        dead = {n["NodeID"]: (n["Alive"], n["DeathReason"], n["DeathReasonMessage"]) for n in ray.nodes()}
        ray.get(watcher.stop.remote())
        after = ray.get(watcher.report.remote())
        return {
            "node_ids": ids,
            "before": before,
            "idle_rejection": idle_rejection,
            "accepted": accepted,
            "deadline_sent": deadline,
            "seen": seen,
            "seen_after_s": seen_after_s,
            "redrain_accepted": redrain_accepted,
            "while_draining": while_draining,
            "alive_while_draining": alive_while_draining,
            "node_b_after": dead[ids["node_b"]],
            "after": after,
        }


def _terminate(signum: int, _frame: Any) -> None:
    """SIGTERM -> SystemExit, so the cluster's finally block still runs."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    if len(sys.argv) != 3 or sys.argv[1] != "drain":
        raise SystemExit("usage: python -m tests.distributed.drain_scenario drain STORAGE")
    started = time.monotonic()
    try:
        output = {"scenario": "drain", "seconds": None, "result": scenario_drain()}
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        raise SystemExit(1) from None
    output["seconds"] = time.monotonic() - started
    print("RESULT " + json.dumps(output, default=str), flush=True)
