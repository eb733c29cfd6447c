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


def test_gpu_benchmark_exits_clearly_without_cuda_and_dry_runs_on_cpu(tmp_path: Path) -> None:
    """benchmarks.gpu says why it cannot run without CUDA; --dry-run goes through its logic on CPU tensors."""
    import torch

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not torch.cuda.is_available():
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu"], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr, proc.stderr[-2000:]
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--size", "4MiB", "--steps", "2", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    doc = json.loads(out.read_text())
    assert doc["saved_correctly"] and doc["meta"]["dry_run"]
    assert set(doc["summary"]) == {"ray_ckpt", "dcp_sync_staging"}
    assert all(s["blocked_median_s"] > 0 for s in doc["summary"].values())


def test_sharded_benchmark_packs_hf_files_like_max_shard_size() -> None:
    """The DCP HF side writes as many files as ray-ckpt: tensors packed in order up to max_shard_size."""
    from benchmarks.sharded import hf_mapping, parse_args

    assert hf_mapping({f"{i}.weight": 10 for i in range(5)}, 20) == {
        "0.weight": 1,
        "1.weight": 1,
        "2.weight": 2,
        "3.weight": 2,
        "4.weight": 3,
    }
    assert hf_mapping({"big": 50, "small": 1}, 20) == {"big": 1, "small": 2}
    quick = parse_args(["--quick"])
    assert quick.size == "256MiB" and quick.repeat == 2
    assert parse_args([]).size == "1GiB"
