"""The benchmark runs end to end in --quick mode and reports every case with positive numbers.

No timing assertions: the numbers depend on the machine and its load; only their presence is checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.run import CASES, GROUPS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One --quick run of every group, in a subprocess of its own (it starts a private Ray)."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "| figure | measured | target | status |" in proc.stdout
    return json.loads(out.read_text())


def test_every_case_is_reported_with_positive_numbers(quick_results: dict[str, Any]) -> None:
    cases = quick_results["cases"]
    expected = [name for group in GROUPS for name in CASES[group]]
    assert sorted(cases) == sorted(expected)
    for name in expected:
        metrics = cases[name]["metrics"]
        assert metrics, name
        for key, value in metrics.items():
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, key, value)


def test_throughput_cases_carry_bytes_and_runs(quick_results: dict[str, Any]) -> None:
    for name, case in quick_results["cases"].items():
        if "gbps" in case["metrics"]:
            assert case["extra"]["nbytes"] > 0, name
            assert case["runs"] and all(r > 0 for r in case["runs"]), name


def test_every_target_is_evaluated(quick_results: dict[str, Any]) -> None:
    rows = quick_results["targets"]
    assert rows
    for row in rows:
        assert row["status"] in ("pass", "short"), row
        assert row["value"] is not None and row["value"] > 0, row


def test_meta_records_the_machine_and_its_load(quick_results: dict[str, Any]) -> None:
    meta = quick_results["meta"]
    assert meta["quick"] is True
    assert meta["size_bytes"] > 0 and meta["tensors"] == 16
    assert len(meta["load_average"]["start"]) == 3 and len(meta["load_average"]["end"]) == 3
    assert meta["filesystem"]
