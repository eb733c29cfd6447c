"""The Ray checkpointer with a remote tier (``remote_uri``) on a loopback S3 endpoint.

A step commits on the checkpointer's local disk, the workers are acknowledged, and the upload
runs in the background; the remote copy is bit-exact, eval clients and stores read a step from
whichever tier holds it, retention keeps the same steps on both tiers, and an upload cut short
by killing the checkpointer resumes in its restarted incarnation.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig, CheckpointStore
from ray_ckpt.core.layout import MARKER_FILE, step_dir
from ray_ckpt.tiers.remote import UPLOADED_FILE
from tests.reliability.faults import actor_pid, hold_writes, restarted_pid, wait_for

pytestmark = pytest.mark.usefixtures("ray_session")

SIDE_FILES = {MARKER_FILE, UPLOADED_FILE, "eval_metrics.json"}  # not part of the copied data


@ray.remote(num_cpus=0)
class Trainer:
    """A worker actor saving its share of the state through WorkerClient."""

    def __init__(self, run_name: str, rank: int, world_size: int) -> None:
        self.client = ray_ckpt.WorkerClient(run_name, rank, world_size)

    def save(self, step: int, state: dict[str, torch.Tensor], metrics: dict[str, float]) -> Any:
        return self.client.save(step, state, metrics=metrics).result(60)


def state_of(rank: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return {
        f"layers.{rank}.weight": torch.randn(64, 64, generator=gen),
        f"layers.{rank}.bias": torch.randn(64, generator=gen),
    }


def full_state(step: int) -> dict[str, torch.Tensor]:
    return {**state_of(0, step), **state_of(1, step)}


def tiered_config(tmp_path: Path, run_name: str, s3_bucket: tuple[str, dict[str, Any]], **overrides: Any) -> Any:
    bucket, options = s3_bucket
    fields: dict[str, Any] = {
        "storage_uri": str(tmp_path / "local"),
        "run_name": run_name,
        "remote_uri": f"{bucket}/remote",
        "remote_storage_options": options,
        "metric_name": "loss",
        "mode": "min",
        "keep_last_n": 2,
        "max_shard_size": "16KB",
        "save_timeout_s": 60.0,
    }
    fields.update(overrides)
    return CheckpointConfig(**fields)


def local_store(config: Any) -> CheckpointStore:
    """A plain store of the run's local tier only."""
    return CheckpointStore(config=config.replace(remote_uri=None, remote_storage_options=None))


def save_everywhere(trainers: list[Any], step: int) -> list[Any]:
    return ray.get([t.save.remote(step, state_of(r, step), {"loss": 1.0 / step}) for r, t in enumerate(trainers)])


def assert_bit_exact(config: Any, s3fs_client: Any, step: int) -> None:
    """Every data file of the local copy is on the remote tier with the same bytes and checksum."""
    local_dir = Path(config.storage_uri) / config.run_name / step_dir(step)
    remote_dir = f"{config.remote_uri.removeprefix('s3://')}/{config.run_name}/{step_dir(step)}"
    local_marker = local_store(config).read_manifest(step)
    remote = CheckpointStore(config.remote_uri, config.run_name, config.remote_storage_options)
    remote_marker = remote.read_manifest(step)
    assert remote_marker.files == local_marker.files  # same names, sizes and checksums
    names = sorted(p.name for p in local_dir.iterdir() if p.name not in SIDE_FILES)
    s3fs_client.invalidate_cache()  # an earlier listing of the partial upload is cached
    assert names == sorted(local_marker.files)
    for name in names:
        assert s3fs_client.cat_file(f"{remote_dir}/{name}") == (local_dir / name).read_bytes(), name
    remote.verify(step)


def test_commit_locally_upload_read_either_tier_and_retain_both(
    tmp_path: Path, run_name: str, s3_bucket: tuple[str, dict[str, Any]], s3fs_client: Any
) -> None:
    config = tiered_config(tmp_path, run_name, s3_bucket)
    handle = ray_ckpt.start_checkpointer(config)
    trainers = [Trainer.remote(run_name, r, 2) for r in range(2)]
    for step in (1, 2, 3, 4):
        infos = save_everywhere(trainers, step)
        assert infos[0].step == step and infos[0].durability == ["local"]  # acknowledged after the local commit
        assert (tmp_path / "local" / run_name / step_dir(step) / MARKER_FILE).exists()
    waited = handle.wait_for_uploads(120)
    assert sorted(waited["uploaded"]) == [1, 2, 3, 4] and waited["failed"] == []
    uploads = handle.stats()["uploads"]
    assert (uploads["pending"], uploads["failed"], uploads["not_uploaded"]) == ([], [], [])

    # Retention (keep_last_n=2) on both tiers; the served index names both tiers.
    local = local_store(config)
    remote = CheckpointStore(config.remote_uri, run_name, config.remote_storage_options)
    assert [i.step for i in local.list()] == [3, 4]
    assert [i.step for i in remote.list()] == [3, 4]
    wait_for(
        lambda: [(i.step, i.durability) for i in handle.list()] == [(3, ["local", "remote"]), (4, ["local", "remote"])],
        30,
        "the served index to name both tiers",
    )
    for step in (3, 4):
        assert_bit_exact(config, s3fs_client, step)
        assert (tmp_path / "local" / run_name / step_dir(step) / UPLOADED_FILE).exists()

    # An eval client loads from whichever tier holds the step: drop step 3's local copy.
    evaluator = ray_ckpt.EvalClient(run_name)
    for step in (3, 4):
        torch.testing.assert_close(evaluator.load(step), full_state(step))
    shutil.rmtree(tmp_path / "local" / run_name / step_dir(3))
    torch.testing.assert_close(evaluator.load(3), full_state(3))  # from S3 now
    with evaluator.lease(3) as lease:  # leased on the tier that holds it
        assert lease.step == 3
    reader = ray_ckpt.open_store(config)  # a store opened from the same config reads both tiers
    assert [(i.step, i.durability) for i in reader.list()] == [(3, ["remote"]), (4, ["local", "remote"])]
    torch.testing.assert_close(reader.load(3), full_state(3))
    reader.verify(3)
    evaluator.close()
    handle.shutdown()


def hold_upload_of(checkpointer: Any, needle: str, gate_dir: str) -> None:
    """Runs inside the actor: the remote write of a path containing ``needle`` completes, then blocks forever."""
    hold_writes(checkpointer.store.remote.storage, needle, gate_dir)


@pytest.mark.slow
def test_upload_cut_short_by_a_checkpointer_kill_resumes_after_the_restart(
    tmp_path: Path, run_name: str, s3_bucket: tuple[str, dict[str, Any]], s3fs_client: Any
) -> None:
    config = tiered_config(tmp_path, run_name, s3_bucket, keep_last_n=3, max_restarts=2)
    handle = ray_ckpt.start_checkpointer(config)
    trainers = [Trainer.remote(run_name, r, 2) for r in range(2)]
    save_everywhere(trainers, 1)
    assert sorted(handle.wait_for_uploads(120)["uploaded"]) == [1]
    pid_before = actor_pid(handle)

    gate = tmp_path / "gate"
    gate.mkdir()
    ray.get(handle.actor.__ray_call__.remote(hold_upload_of, "step_000000002/model-00001-of", str(gate)))
    infos = save_everywhere(trainers, 2)  # acknowledged after the local commit, the upload still running
    assert infos[0].step == 2
    wait_for(lambda: (gate / "reached").exists(), 60, "the upload of step 2 to reach its first shard")
    remote_dir = f"{config.remote_uri.removeprefix('s3://')}/{run_name}/{step_dir(2)}"
    partial = [p.rsplit("/", 1)[-1] for p in s3fs_client.find(remote_dir)]
    assert partial and MARKER_FILE not in partial  # really mid-upload: a shard, no marker
    assert handle.stats()["uploads"]["pending"] == [2]
    assert not (tmp_path / "local" / run_name / step_dir(2) / UPLOADED_FILE).exists()

    ray.kill(handle.actor, no_restart=False)
    assert restarted_pid(handle, pid_before) != pid_before
    waited = handle.wait_for_uploads(120)  # the new incarnation resumed step 2's upload on start
    assert waited["failed"] == [] and handle.stats()["uploads"]["not_uploaded"] == []
    assert (tmp_path / "local" / run_name / step_dir(2) / UPLOADED_FILE).exists()
    remote = CheckpointStore(config.remote_uri, run_name, config.remote_storage_options)
    assert [i.step for i in remote.list()] == [1, 2]
    assert_bit_exact(config, s3fs_client, 2)
    torch.testing.assert_close(ray_ckpt.EvalClient(run_name, follow_index=False).load(2), full_state(2))

    # Training goes on with the restarted master; retention keeps the last 3 on both tiers.
    for step in (3, 4):
        save_everywhere(trainers, step)
    assert handle.wait_for_uploads(120)["failed"] == []
    remote.reload()
    assert [i.step for i in remote.list()] == [2, 3, 4]
    assert [i.step for i in local_store(config).list()] == [2, 3, 4]
    handle.shutdown()
