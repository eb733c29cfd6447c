"""The memory tier end to end on a multi-raylet cluster (tests/integration/memory_scenarios.py).

One scenario, one cluster, every failure in order; the scenario asserts each step itself and
this test checks what it reports.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_multinode import run_scenario


def test_memory_tier_saves_recovers_and_falls_back_on_a_multi_node_cluster(tmp_path: Path) -> None:
    result = run_scenario("memory_tier", tmp_path, timeout_s=420, module="tests.integration.memory_scenarios")
    # 2 memory steps x (own rank's copy + the other rank's replica) on each training node
    assert len(result["bytes_held"]) == 2
    assert all(v == 2 * 1024 * 128 * 4 * 2 for v in result["bytes_held"].values())
    # the step lost mid-replication never showed; the next ones did, step 9 persisted
    assert result["after_mid_replication"] == {
        "3": ["local"],
        "6": ["local"],
        "9": ["memory", "local"],
        "10": ["memory"],
    }
    # after every copy of step 11 was lost only persisted steps remain
    assert result["final"] == {"3": ["local"], "6": ["local"], "7": ["local"], "9": ["local"], "10": ["local"]}
