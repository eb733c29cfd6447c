"""Multi-node Ray: a ray.cluster_utils.Cluster of 4-6 raylets on this machine, one per scenario.

The pytest process already holds the session's local Ray, so each scenario of
tests/integration/multinode_scenarios.py runs in a subprocess; its last ``RESULT {json}`` line
is checked here (the scenario also checks itself and exits non-zero on any failure).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def run_scenario(
    name: str, storage: Path, timeout_s: float = 240.0, module: str = "tests.integration.multinode_scenarios"
) -> dict[str, Any]:
    """Run one scenario of ``module`` in its own process group; SIGTERM (then SIGKILL) it on timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, name, str(storage)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the scenario shuts its cluster down on SIGTERM
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"scenario {name} ran over {timeout_s}s\n{_tail(err)}")
    assert proc.returncode == 0, f"scenario {name} failed (exit {proc.returncode})\n{_tail(err)}"
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"scenario {name} printed no RESULT line\n{_tail(err)}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["scenario"] == name
    return result["result"]


def _tail(text: str, lines: int = 60) -> str:
    """The last lines of a scenario's stderr, without Ray's raylet state dumps."""
    kept = [line for line in text.splitlines() if "[state-dump]" not in line]
    return "\n".join(kept[-lines:])


def test_gather_and_direct_cross_nodes(tmp_path: Path) -> None:
    result = run_scenario("modes", tmp_path / "store")
    for mode in ("gather", "direct"):
        data = result[mode]
        nodes = data["node_ids"]
        # the master on node_a, ranks alternating over node_b and node_c: every gather crosses object stores
        assert data["checkpointer_node"] == nodes["node_a"]
        assert data["rank_nodes"] == [nodes["node_b"], nodes["node_c"], nodes["node_b"], nodes["node_c"]]
        assert data["committed"] == [1, 2] and data["world_sizes"] == [4]
        assert data["mismatches"] == {"1": [], "2": []}  # every tensor of both steps loads bit-identical
        assert data["remote_load_mismatches"] == []  # and from an evaluator on a third node
        assert data["trainer_ok"] and data["shards"] > 4


def test_worker_node_dies_mid_save(tmp_path: Path) -> None:
    result = run_scenario("worker_node_failure", tmp_path / "store")
    assert set(result) == {"gather_before_report", "gather_object_lost", "direct_mid_write"}
    for case, data in result.items():
        outcome = data["outcome"]
        assert not outcome["ok"] and outcome["save_aborted"], (case, outcome)
        assert data["committed"] == data["expected_committed"], case  # nothing of the step is visible
        assert not data["step_dir_exists"] and data["pending"] == [], case
        assert data["after_replacement"] == data["expected_committed"] + [data["replacement_step"]], case
        assert data["replacement_mismatches"] == [], case
    assert "ranks [1] did not report within save_timeout_s" in result["gather_before_report"]["outcome"]["error"]
    assert "ranks [1] did not finish writing their share" in result["direct_mid_write"]["outcome"]["error"]
    assert result["direct_mid_write"]["partial_step_dir_before_kill"]  # the victim really was mid-write
    lost = result["gather_object_lost"]
    assert "rank 1's state was lost" in lost["outcome"]["error"]
    assert lost["aborted_after_s"] < 30  # the fetch failed fast instead of waiting out save_timeout_s=60


def test_checkpointer_node_dies_and_restarts_elsewhere(tmp_path: Path) -> None:
    result = run_scenario("checkpointer_node_failure", tmp_path / "store")
    nodes, before, after = result["node_ids"], result["before"], result["after"]
    assert before["node"] == nodes["node_a"] and after["node"] == nodes["node_b"]
    assert after["pid"] != before["pid"]
    # the index was rebuilt from storage, eval metrics included
    assert after["steps"] == [1, 2, 3] and after["stats"]["indexed"] == 3 and after["stats"]["pending"] == []
    assert after["best_eval"] == 2
    # clients created before the failure carry on: the driver's, an evaluator actor's, and a blocked wait
    assert after["evaluator_steps"] == [1, 2, 3] and after["evaluator_best_eval"] == 2
    assert result["waiter_got"] == 4
    # the save in flight was aborted (never half-committed) and its retry commits
    assert result["in_flight_save"]["save_aborted"] and "checkpointer died" in result["in_flight_save"]["error"]
    assert not after["step_4_dir_exists"]
    assert result["committed"] == [1, 2, 3, 4] and result["latest_after_retry"] == 4
    assert result["mismatches"] == []
