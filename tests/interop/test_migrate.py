"""Migration of legacy checkpoints into ray-ckpt runs: per-file report, idempotence, dry run, replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ray_ckpt
from ray_ckpt import CheckpointStore
from ray_ckpt.interop.migrate import (
    CONFLICT,
    FAILED,
    MIGRATED,
    REPLACED,
    SKIPPED,
    WOULD_MIGRATE,
    WOULD_REPLACE,
    migrate,
)
from ray_ckpt.interop.mock import TinyPolicy
from tests.models import TinyMLP


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in TinyPolicy().state_dict().items()}


@pytest.fixture
def legacy_dir(tmp_path: Path) -> Path:
    src = tmp_path / "old"
    src.mkdir()
    for epoch in (2, 4):
        torch.save(_weights(epoch), src / f"alpha:v{epoch}.pt")
    torch.save(_weights(10), src / "model_0010.pt")
    (src / "model_0010.json").write_text(
        json.dumps({"run_name": "beta", "epoch": 10, "score": 0.5, "evals": {"maze": 0.25}})
    )
    (src / "nested").mkdir()
    save_file(_weights(30), str(src / "nested" / "gamma_30.safetensors"))
    (src / "nested" / "gamma_30.metrics.json").write_text(json.dumps({"loss": 0.125}))
    return src


def _actions(report: ray_ckpt.interop.migrate.MigrationReport) -> dict[str, str]:
    return {item.source.rsplit("/", 1)[1]: item.action for item in report.items}


def test_migrate_directory_into_runs(legacy_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "runs"
    seen = []
    report = migrate(str(legacy_dir), str(dst), on_item=seen.append)
    assert report.ok and len(seen) == 4
    assert set(_actions(report).values()) == {MIGRATED}
    alpha = CheckpointStore(str(dst), "alpha")
    assert [i.step for i in alpha.list()] == [2, 4]
    assert alpha.info(4).metrics == {"epoch": 4.0}
    assert alpha.info(4).metadata["legacy_format"] == "metta"
    for step in (2, 4):
        alpha.verify(step)  # checksums computed by the store
        torch.testing.assert_close(alpha.load(step)["head.weight"], _weights(step)["head.weight"])
    beta = CheckpointStore(str(dst), "beta")
    assert beta.info(10).metrics == {"epoch": 10.0, "score": 0.5, "evals/maze": 0.25}
    gamma = CheckpointStore(str(dst), "gamma")
    assert gamma.info(30).metrics == {"loss": 0.125}
    assert ray_ckpt.load_from_uri(f"{dst}/gamma:v30").metrics["loss"] == 0.125


def test_dry_run_writes_nothing(legacy_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "runs"
    report = migrate(str(legacy_dir), str(dst), dry_run=True)
    assert report.ok and set(_actions(report).values()) == {WOULD_MIGRATE}
    assert not dst.exists()
    migrate(str(legacy_dir), str(dst))
    before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
    torch.save(_weights(99), legacy_dir / "alpha:v4.pt")
    report = migrate(str(legacy_dir), str(dst), dry_run=True, replace=True)
    assert _actions(report)["alpha:v4.pt"] == WOULD_REPLACE
    assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before
    torch.testing.assert_close(CheckpointStore(str(dst), "alpha").load(4)["body.bias"], _weights(4)["body.bias"])


def test_rerun_is_idempotent_then_conflict_then_replace(legacy_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "runs"
    migrate(str(legacy_dir), str(dst))
    again = migrate(str(legacy_dir), str(dst))
    assert again.ok and set(_actions(again).values()) == {SKIPPED}
    torch.save(_weights(77), legacy_dir / "alpha:v2.pt")  # the source changed
    conflict = migrate(str(legacy_dir), str(dst))
    assert not conflict.ok and _actions(conflict)["alpha:v2.pt"] == CONFLICT
    assert "--replace" in next(i.detail for i in conflict.items if i.action == CONFLICT)
    alpha = CheckpointStore(str(dst), "alpha")
    torch.testing.assert_close(alpha.load(2)["body.bias"], _weights(2)["body.bias"])  # untouched
    replaced = migrate(str(legacy_dir), str(dst), replace=True)
    assert replaced.ok and _actions(replaced)["alpha:v2.pt"] == REPLACED
    torch.testing.assert_close(alpha.load(2)["body.bias"], _weights(77)["body.bias"])
    assert [i.step for i in alpha.list()] == [2, 4]


def test_older_steps_added_later_and_single_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "runs"
    src.mkdir()
    torch.save(_weights(5), src / "r:v5.pt")
    assert migrate(str(src / "r:v5.pt"), str(dst)).ok
    torch.save(_weights(1), src / "r:v1.pt")  # older than what is already migrated
    report = migrate(str(src), str(dst))
    assert _actions(report) == {"r:v1.pt": MIGRATED, "r:v5.pt": SKIPPED}
    assert [i.step for i in CheckpointStore(str(dst), "r").list()] == [1, 5]


def test_bad_files_are_reported_and_others_migrate(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "runs"
    src.mkdir()
    torch.save(_weights(1), src / "ok:v1.pt")
    (src / "broken.pt").write_bytes(b"garbage")
    torch.save(TinyPolicy(obs_dim=5), src / "whole:v3.pt")
    report = migrate(str(src), str(dst))
    actions = _actions(report)
    assert actions == {"ok:v1.pt": MIGRATED, "broken.pt": FAILED, "whole:v3.pt": FAILED}
    details = {i.source.rsplit("/", 1)[1]: i.detail for i in report.items}
    assert "trust_pickle" in details["whole:v3.pt"] and "broken.pt" in details["broken.pt"]
    assert not report.ok

    torch.save(TinyPolicy(), src / "default:v1.pt")
    torch.save(TinyMLP(d_in=3, hidden=5, d_out=2), src / "mlp:v2.pt")
    # a class from a pickle is trusted by nothing: its module is opted in explicitly
    allowed = ["ray_ckpt.interop.mock", "tests.models"]
    trusted = migrate(str(src), str(dst), trust_pickle=True, allowed_architecture_prefixes=allowed)
    actions = _actions(trusted)
    assert actions["whole:v3.pt"] == MIGRATED and actions["default:v1.pt"] == MIGRATED
    # architecture written by migrate
    model = ray_ckpt.load_from_uri(f"{dst}/default:v1", allowed_architecture_prefixes=allowed).instantiate()
    assert isinstance(model, TinyPolicy)
    # TinyPolicy(obs_dim=5) keeps obs_dim as an attribute: its constructor argument is read back
    whole = ray_ckpt.load_from_uri(f"{dst}/whole:v3", allowed_architecture_prefixes=allowed)
    assert whole.architecture is not None and whole.architecture.config == {"obs_dim": 5}
    assert whole.instantiate().body.weight.shape == (8, 5)
    # TinyMLP(3, 5, 2) keeps none: the class alone would rebuild the wrong shapes, so none is recorded
    mlp = ray_ckpt.load_from_uri(f"{dst}/mlp:v2")
    assert mlp.architecture is None and mlp.metadata["model_class"] == "tests.models.TinyMLP"
    assert mlp.state_dict["fc1.weight"].shape == (5, 3)
    assert "constructor arguments" in next(i.detail for i in trusted.items if i.source.endswith("mlp:v2.pt"))


def test_trainer_state_is_carried_over(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "runs"
    src.mkdir()
    model = TinyPolicy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, src / "trainer_3.pt")
    assert migrate(str(src), str(dst)).ok
    artifact = ray_ckpt.load_from_uri(f"{dst}/trainer:v3")
    assert artifact.trainer_state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    momentum = artifact.trainer_state["optimizer"]["state"][0]["momentum_buffer"]
    torch.testing.assert_close(momentum, opt.state_dict()["state"][0]["momentum_buffer"])


def test_a_sharded_model_folder_is_one_checkpoint_never_one_run_per_shard(tmp_path: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    src, dst = tmp_path / "src", tmp_path / "runs"
    folder = src / "policy-40"
    folder.mkdir(parents=True)
    weights = _weights(40)
    save_torch_state_dict(weights, folder, max_shard_size=100)  # one tensor per shard
    assert len(list(folder.glob("*.safetensors"))) > 1
    dry = migrate(str(src), str(dst), dry_run=True)
    assert [(i.action, i.run_name, i.step) for i in dry.items] == [(WOULD_MIGRATE, "policy", 40)]
    report = migrate(str(src), str(dst))
    assert report.ok and [(i.action, i.format) for i in report.items] == [(MIGRATED, "hf")]
    assert sorted(p.name for p in dst.iterdir()) == ["policy"]
    loaded = CheckpointStore(str(dst), "policy").load(40)
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], v) for k, v in weights.items())
    # one shard alone is refused, and reported as such
    shard = sorted(folder.glob("*.safetensors"))[0]
    alone = migrate(str(shard), str(tmp_path / "other"))
    assert [i.action for i in alone.items] == [FAILED] and "model.safetensors.index.json" in alone.items[0].detail
