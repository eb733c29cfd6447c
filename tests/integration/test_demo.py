"""The demo end to end (its example config, on the session's Ray): storage holds what retention keeps.

Measured before retention ran after scores and lease releases: steps the rules no longer kept
(scored out of the top 3 while an evaluator still held its lease) stayed on storage, and which
ones depended on timing.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ray_ckpt import CheckpointConfig, CheckpointStore
from ray_ckpt.cli.main import main
from ray_ckpt.core.layout import parse_step_dir
from ray_ckpt.demo import RankTraining, format_table, run_demo

pytestmark = pytest.mark.usefixtures("ray_session")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "example.yaml"


def test_demo_storage_is_what_its_retention_keeps(
    tmp_path: Path, run_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = CheckpointConfig.from_yaml(str(EXAMPLE)).replace(storage_uri=str(tmp_path / "runs"), run_name=run_name)
    assert (config.keep_top_k, config.keep_last_n, config.keep_period) == (3, 2, 10)
    out = io.StringIO()
    top = run_demo(config, steps=40, out=out)

    store = CheckpointStore(config=config)
    records = store.list()
    assert records[-1].step == 40
    assert store.leased_steps() == set()  # every evaluator released its leases
    keep, delete = store.retention_plan()
    directory = tmp_path / "runs" / run_name / "checkpoints"
    on_disk = sorted(s for s in (parse_step_dir(n) for n in os.listdir(directory)) if s is not None)
    assert on_disk == keep and delete == [], (on_disk, keep, delete)

    # the rules, recomputed from the records: top 3 by eval/return, the last 2, every 10th, the latest
    scored = sorted(
        (r for r in records if r.metric("eval/return") is not None), key=lambda r: (-r.metrics["eval/return"], -r.step)
    )
    expected = {r.step for r in scored[:3]} | {38, 40} | {s for s in on_disk if s % 10 == 0}
    assert set(on_disk) == expected
    assert [i.step for i in top] == [r.step for r in scored[:3]]

    capsys.readouterr()
    assert main(["retention", str(tmp_path / "runs" / run_name), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["would_delete"] == [] and [r["step"] for r in report["steps"]] == on_disk
    assert main(["retention", str(tmp_path / "runs" / run_name)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "nothing to delete"
    assert "kept on storage: " + ", ".join(map(str, on_disk)) in format_table(top, records)

    # progress: one summary line per commit (in step order), scores as they come, start-up timed
    lines = out.getvalue().splitlines()
    assert re.match(r"ready in \d+\.\ds: checkpointer for run .*; a new run$", lines[0]), lines[0]
    commits = [int(line.split()[2]) for line in lines if line.startswith("commit ")]
    assert commits == list(range(2, 41, 2)), lines
    assert all("train/loss 0." in line for line in lines if line.startswith("commit "))
    scored = [int(line.split()[2]) for line in lines if line.startswith("eval ")]
    assert set(scored) <= set(commits) and len(scored) == len(set(scored)) and len(scored) >= 5, lines
    assert lines[-1].startswith("done in ") and "trained steps 1-40" in lines[-1]

    # the FSDP2 ranks' shards resume into one plain process (2 -> 1): weights and Adam's state
    saved = store.load(40)
    assert store.read_manifest(40).model["sharded"]  # the ranks saved shards, committed as full tensors
    training = RankTraining(0, 1)
    assert training.restore(store, 40)
    assert {int(s["step"]) for s in training.opt.state_dict()["state"].values()} == {40}
    model_state, _ = training.states(40)
    for key, value in model_state.items():
        assert torch.equal(value, saved[key]), key
    assert int(store.load_trainer_state(40)["step"]) == 40


def test_demo_help_is_whole_sentences() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ray_ckpt.demo", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    description = out.stdout.split("\n\n")[1]
    assert description.rstrip().endswith("Re-running resumes the run."), out.stdout
    assert "--address" in out.stdout and "--num-cpus" in out.stdout


def test_demo_attaches_to_an_existing_cluster_and_resumes(tmp_path: Path, run_name: str) -> None:
    """``--address`` of the session's own Ray (a cluster the demo did not start: no num_cpus passed to
    it), twice: the second driver resumes the run (a new checkpointer, weights and optimizer state)."""
    import ray

    address = ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def demo(steps: int) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "ray_ckpt.demo", "--config", str(EXAMPLE), "--address", address,
             "--storage", "rel_runs", "--run-name", run_name, "--steps", str(steps)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        assert f"({address})" in out.stdout and "Top checkpoints of run" in out.stdout
        return out.stdout

    first = demo(4)
    assert "; a new run" in first
    assert [int(line.split()[2]) for line in first.splitlines() if line.startswith("commit ")] == [2, 4]
    second = demo(2)
    assert "resumed from step 4 (optimizer state restored on ranks [0, 1])" in second, second
    assert [int(line.split()[2]) for line in second.splitlines() if line.startswith("commit ")] == [6]
    # a relative --storage is made absolute by the driver (the actors do not share its cwd)
    store = CheckpointStore(str(tmp_path / "rel_runs"), run_name=run_name)
    assert [i.step for i in store.list()] == [2, 4, 6]
    assert int(store.load_trainer_state(6)["step"]) == 6


def test_demo_starts_its_own_ray_beside_another(tmp_path: Path, other_ray: dict[str, str]) -> None:
    """Where `ray start --head` left a Ray that a plain ``ray.init()`` joins (and refuses num_cpus
    for), the demo without ``--address`` starts a local Ray of its own."""
    env = {k: v for k, v in other_ray.items() if k != "OTHER_RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-m", "ray_ckpt.demo", "--config", str(EXAMPLE), "--storage", str(tmp_path / "runs"),
         "--run-name", "beside", "--steps", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "Ray up in" in out.stdout and "(local)" in out.stdout
    assert [int(line.split()[2]) for line in out.stdout.splitlines() if line.startswith("commit ")] == [2]
    # quiet, piped: one line per commit (the checkpointer's own INFO line is not shown too), no
    # colour codes, no FSDP2 warning (our model returned a view; it returns a new tensor now)
    both = out.stdout + out.stderr
    assert "committed step" not in both and " INFO " not in both, both[-4000:]
    assert "\x1b[" not in both, both[-4000:]
    assert "returned a view tensor" not in both and "UserWarning" not in both, both[-4000:]


def test_checkpointer_refuses_memory_storage() -> None:
    """memory:// lives in one process; the checkpointer's workers and evaluators are others."""
    from ray_ckpt import ConfigError, start_checkpointer

    with pytest.raises(ConfigError, match=r"storage_uri='memory://runs': memory:// storage lives in one process"):
        start_checkpointer(CheckpointConfig(storage_uri="memory://runs", run_name="mem"))
    with pytest.raises(ConfigError, match=r"remote_uri='memory://up'.*one process"):
        start_checkpointer(CheckpointConfig(storage_uri=str(REPO / "unused"), run_name="mem", remote_uri="memory://up"))
    assert not (REPO / "unused").exists()
