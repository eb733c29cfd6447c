"""``ray-ckpt ls --address``: a run as its live checkpointer serves it (memory-only steps too).

Against the session's real local Ray: a plain checkpointer with a committed step, listed by a
``ray-ckpt`` process that connects to that cluster by address (in whichever namespace holds the
checkpointer, or the one ``--namespace`` names); a run with no checkpointer there is an error
that says what plain ``ls`` shows instead. A memory tier needs two nodes to commit a step (see
tests/integration), so the rendering of a memory-only step is checked on its payload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig
from ray_ckpt.cli import commands
from ray_ckpt.cli.render import ls_view, plain_text
from ray_ckpt.distributed.handle import actor_name
from tests.cli.test_cli import run_cli

REPO = Path(__file__).resolve().parents[2]


def _ray_ckpt(*argv: str) -> subprocess.CompletedProcess[str]:
    """``ray-ckpt`` in a process of its own (it attaches to the cluster by address, then detaches)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "ray_ckpt", *argv], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.mark.usefixtures("ray_session")
def test_ls_address_lists_the_served_index_with_where_each_step_lives(
    tmp_path: Path, run_name: str, ray_session: str, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = str(tmp_path / "runs")
    config = CheckpointConfig(storage_uri=storage, run_name=run_name, metric_name="loss", mode="min")
    handle = ray_ckpt.start_checkpointer(config, start_timeout_s=600)  # slow to start on a loaded machine
    try:
        address = ray.get_runtime_context().gcs_address
        run_uri = f"{storage}/{run_name}"
        code, out, err = run_cli(capsys, "ls", run_uri, "--address", address, "--json")  # nothing saved yet
        assert code == 0 and json.loads(out)["checkpoints"] == [], err
        ray_ckpt.WorkerClient(run_name, 0, 1).save(3, {"w": torch.ones(4)}, {"loss": 0.5}, blocking=True)

        started = time.monotonic()
        out = _ray_ckpt("ls", run_uri, "--address", address, "--json")  # found in any namespace
        assert out.returncode == 0, out.stderr[-3000:]
        data = json.loads(out.stdout)
        assert data["source"] == "checkpointer" and data["metric_name"] == "loss"
        assert data["checkpointer"] == {
            "address": address,
            "namespace": ray_session,
            "actor": actor_name(run_name),
        }
        (row,) = data["checkpoints"]
        assert (row["step"], row["where"], row["kept"], row["best"], row["leased"]) == (3, ["local"], True, True, False)
        assert row["metrics"] == {"loss": 0.5} and row["files_size"] > 0
        # the same as storage shows it (plain ls), but for where the listing came from
        code, plain, _ = run_cli(capsys, "ls", run_uri, "--json")
        plain_data = json.loads(plain)
        assert code == 0 and plain_data["source"] == "storage" and "checkpointer" not in plain_data
        assert plain_data["checkpoints"] == data["checkpoints"]

        out = _ray_ckpt("ls", run_uri, "--address", address, "--namespace", ray_session)  # the table
        assert out.returncode == 0, out.stderr[-3000:]
        head, header, line = [ln for ln in out.stdout.splitlines() if ln.strip()][:3]
        assert f"1 checkpoint(s); ranked by loss (min); as its checkpointer at {address} serves them" in head
        assert header.split()[:4] == ["step", "created", "size", "where"]
        assert line.split()[0] == "3" and "local" in line.split() and "kept,best" in line
        assert time.monotonic() - started < 120

        # a namespace without it, a run without one, a checkpointer of another storage: one line each, exit 1
        out = _ray_ckpt("ls", run_uri, "--address", address, "--namespace", "elsewhere")
        assert out.returncode == 1 and f"run {run_name!r}: no checkpointer runs on {address}" in out.stderr
        assert "namespace 'elsewhere'" in out.stderr and "without --address, ls lists the steps persisted" in out.stderr
        code, _, err = run_cli(capsys, "ls", f"{storage}/no-such-run", "--address", address)  # Ray already up here
        assert code == 1 and "run 'no-such-run': no checkpointer runs on" in err and "(any namespace)" in err
        code, _, err = run_cli(capsys, "ls", f"{storage}/no-such-run")  # nor on storage
        assert code == 1 and "no run at" in err
        other = tmp_path / "other"
        ray_ckpt.CheckpointStore(str(other), run_name=run_name).save(1, {"w": torch.ones(1)})
        code, _, err = run_cli(capsys, "ls", f"{other}/{run_name}", "--address", address)
        assert code == 1 and f"serves file://{storage}/{run_name}, not file://{other}/{run_name}" in err
    finally:
        handle.shutdown()


def test_namespace_needs_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ray_ckpt.CheckpointStore(str(tmp_path), run_name="exp").save(1, {"w": torch.ones(1)})
    code, _, err = run_cli(capsys, "ls", str(tmp_path / "exp"), "--namespace", "x")
    assert code == 2 and "--namespace: only with --address" in err


def test_a_memory_only_step_shows_where_it_lives_and_no_retention_mark() -> None:
    payload = {
        "run": "file:///runs/exp",
        "metric_name": "loss",
        "mode": "min",
        "source": "checkpointer",
        "checkpointer": {"address": "10.0.0.1:6379", "namespace": "ns", "actor": "ray_ckpt:checkpointer:exp"},
        "retention": {},
        "checkpoints": [
            {"step": 10, "created": 0.0, "files_size": 100, "metrics": {"loss": 0.3}, "where": ["memory", "local"],
             "kept": True, "best": False, "leased": False},
            {"step": 11, "created": 0.0, "files_size": 0, "metrics": {"loss": 0.2}, "where": ["memory"],
             "kept": None, "best": True, "leased": False},
        ],
    }  # fmt: skip
    text = plain_text(ls_view(payload)[1])
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.strip()[:2].isdigit()}
    assert "memory,local" in rows["10"] and "kept" in rows["10"]
    assert "memory" in rows["11"] and "best" in rows["11"] and "kept" not in " ".join(rows["11"])
    assert commands.MEMORY_TIER == "memory"
    from ray_ckpt.distributed.memory import MEMORY

    assert commands.MEMORY_TIER == MEMORY  # the CLI names it without importing Ray
