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


def test_memory_tier_benchmark_state_halves_and_targets() -> None:
    """The memory benchmark's state splits into two disjoint halves of the asked size; its ratios and
    statuses follow the cases measured (a figure whose cases did not run is left out)."""
    from benchmarks.memory_tier import half_shapes, markdown, parse_args, targets

    total = 64 << 20
    halves = [half_shapes(total, 8, rank) for rank in (0, 1)]
    assert not set(halves[0]) & set(halves[1])
    values = sum(math.prod(shape) for half in halves for shape in half.values())
    assert 0.95 * total <= 4 * values <= total
    assert any(k.endswith(".exp_avg_sq") for k in halves[1]) and "layers.0.weight" in halves[0]

    def case(median: float, **extra: Any) -> dict[str, Any]:
        return {"what": "-", "runs": [median], "median_s": median, "min_s": median, "extra": extra}

    cases = {
        "memcpy": case(0.1),
        "transfer_exchange": case(0.9),
        "transfer_one_way": case(1.0),
        "storage_save_blocked": case(0.2),
        "load_s3": case(20.0),
        "load_disk_cold": case(0.5),
        "memory_save_blocked": case(0.1),
        "memory_save_blocking": case(2.0),
        "recovery_memory": case(1.5, first_s=2.0),
    }
    rows = {r["key"]: r for r in targets(cases)}
    assert set(rows) == {"blocked", "blocking", "recovery_s3", "recovery_disk", "recovery_transfer"}
    assert rows["blocked"]["value"] == pytest.approx(0.5) and rows["blocked"]["status"] == "pass"
    assert rows["blocking"]["value"] == pytest.approx(2.0) and rows["blocking"]["status"] == "short"
    assert rows["recovery_s3"]["value"] == pytest.approx(10.0) and rows["recovery_s3"]["status"] == "pass"
    assert rows["recovery_transfer"]["value"] == pytest.approx(0.5) and rows["recovery_transfer"]["status"] == "short"
    assert [r["key"] for r in targets({k: cases[k] for k in ("memcpy", "transfer_exchange")})] == []
    args = parse_args(["--quick"])
    doc = {
        "meta": {
            "size_bytes": total,
            "eval_size_bytes": 8 << 20,
            "layers": 8,
            "repeat": args.repeat,
            "nproc": 2,
            "memory_tier": True,
            "load_average": {"start": (1.0, 1.0, 1.0), "end": (2.0, 2.0, 2.0)},
        },
        "cases": cases,
        "targets": list(rows.values()),
    }
    text = markdown(doc)
    assert "| blocking memory save / (snapshot memcpy + raw transfer) | 2.00x | <= 1.5x | short |" in text
    assert "load average at start 1.00" in text


def test_loopback_s3_endpoint_counts_the_bytes_it_serves(tmp_path: Path) -> None:
    """The benchmarks' moto endpoint counts GET requests and body bytes, whoever the client is."""
    import boto3

    from benchmarks import s3_cases

    with s3_cases.moto_endpoint() as options:
        bucket = s3_cases.make_bucket(options)
        client = boto3.client(
            "s3",
            endpoint_url=options["client_kwargs"]["endpoint_url"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.put_object(Bucket=bucket, Key="k.safetensors", Body=b"x" * 300_000)
        client.put_object(Bucket=bucket, Key="k.json", Body=b"{}")
        before = s3_cases.served(options)
        assert client.get_object(Bucket=bucket, Key="k.safetensors")["Body"].read() == b"x" * 300_000
        client.get_object(Bucket=bucket, Key="k.safetensors", Range="bytes=0-999")["Body"].read()
        client.get_object(Bucket=bucket, Key="k.json")["Body"].read()
        after = s3_cases.served(options)

    def grew(kind: str, field: str) -> int:
        return after[kind][field] - before.get(kind, {}).get(field, 0)

    assert grew("GET", "requests") == 3 and grew("GET", "bytes") == 301_002
    assert grew("GET *.safetensors", "requests") == 2 and grew("GET *.safetensors", "bytes") == 301_000


def test_memory_benchmark_drops_a_run_from_the_page_cache(tmp_path: Path) -> None:
    """The cold-cache load's preparation: every file of a run leaves the page cache (checked with fincore)."""
    import shutil

    from benchmarks.memory_tier import drop_from_page_cache

    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux) is not installed")
    (tmp_path / "step").mkdir()
    for name in ("a", "step/b"):
        (tmp_path / name).write_bytes(os.urandom(1 << 20))
        (tmp_path / name).read_bytes()
    if tmp_path.stat().st_dev == os.stat("/dev/shm").st_dev:
        pytest.skip("tmpfs keeps its pages")
    assert drop_from_page_cache(str(tmp_path)) == 0
