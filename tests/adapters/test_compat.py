"""The APIs RL trainers call today: NeMo RL's checkpoint manager and Metta's, on local disk and S3."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt.adapters import MettaCheckpointManager, NeMoCheckpointManager, config_from_nemo
from ray_ckpt.adapters.metta import MettaCheckpointManager as CheckpointManager
from ray_ckpt.core.errors import ConfigError
from ray_ckpt.interop.mock import TinyPolicy


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any], bool]:
    """``(storage root, storage options, is_remote)``: a local directory or a bucket on the loopback S3."""
    if request.param == "local":
        return str(tmp_path / "store"), {}, False
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/ckpts", options, True


# -- NeMo RL ------------------------------------------------------------------------------------
def nemo_config(root: str, **changes: Any) -> dict[str, Any]:
    config = {
        "enabled": True,
        "checkpoint_dir": root,
        "metric_name": "val_reward",
        "higher_is_better": True,
        "keep_top_k": 2,
        "save_period": 5,
        "save_optimizer": True,
    }
    config.update(changes)
    return config


def test_nemo_manager_commits_ranks_and_prunes_trainer_written_checkpoints(storage: Any) -> None:
    root, options, remote = storage
    manager = NeMoCheckpointManager(nemo_config(root), run_name="grpo", storage_options=options)
    assert manager.enabled and manager.higher_is_better and manager.keep_top_k == 2 and manager.save_period == 5
    assert manager.should_save(10) and not manager.should_save(7)
    assert manager.get_best_checkpoint_path() is None and manager.get_latest_checkpoint_path() is None
    weights = {}
    for step, reward in ((5, 0.1), (10, 0.9), (15, 0.5), (20, 0.2)):
        path = manager.init_tmp_checkpoint(step, {"step": step, "val_reward": reward}, run_config={"lr": 0.1})
        (path / "policy" / "weights").mkdir(parents=True)
        weights[step] = os.urandom(64)
        (path / "policy" / "weights" / "model.bin").write_bytes(weights[step])
        manager.finalize_checkpoint(path)

    # keep_top_k=2 by val_reward (10, 15) plus the latest (20); step 5 went to retention.
    assert [i.step for i in manager.store.list()] == [10, 15, 20]
    best, latest = manager.get_best_checkpoint_path(), manager.get_latest_checkpoint_path()
    assert best is not None and best.endswith("step_000000010")
    assert latest is not None and latest.endswith("step_000000020")
    if remote:
        assert best.startswith("s3://")
    else:
        assert Path(best, "policy", "weights", "model.bin").read_bytes() == weights[10]
    assert manager.load_training_info(best) == {"step": 10, "val_reward": 0.9}
    assert manager.load_training_info(None) is None
    manager.store.verify(10)
    assert manager.remove_old_checkpoints() == []
    assert manager.remove_old_checkpoints(exclude_latest=False) == []  # the latest is always kept

    # An aborted checkpoint never shows up.
    path = manager.init_tmp_checkpoint(25, {"step": 25, "val_reward": 5.0})
    (path / "x").write_text("partial")
    manager.abort_checkpoint(path)
    assert manager.get_latest_checkpoint_path().endswith("step_000000020")
    assert manager.get_best_checkpoint_path().endswith("step_000000010")
    with pytest.raises(KeyError):
        manager.finalize_checkpoint(path)
    manager.close()


def test_nemo_config_names_are_translated(tmp_path: Path) -> None:
    cfg = config_from_nemo(nemo_config(str(tmp_path), higher_is_better=False, save_period=10))
    assert (cfg.storage_uri, cfg.mode, cfg.save_interval_steps, cfg.keep_top_k) == (str(tmp_path), "min", 10, 2)
    # NeMo RL: keep_top_k without a metric keeps the most recent k.
    cfg = config_from_nemo(nemo_config(str(tmp_path), metric_name=None, keep_top_k=3))
    assert cfg.keep_top_k is None and cfg.keep_last_n == 3 and cfg.metric_name is None
    assert config_from_nemo(nemo_config(str(tmp_path), ft_keep_latest_k=4)).keep_last_n == 4
    assert config_from_nemo(nemo_config(str(tmp_path), checkpoint_dir=tmp_path)).storage_uri == str(tmp_path)
    with pytest.raises(ConfigError, match="bogus"):
        config_from_nemo(nemo_config(str(tmp_path), bogus=1))

    manager = NeMoCheckpointManager(nemo_config(str(tmp_path), metric_name=None, keep_top_k=2), run_name="recent")
    for step in (1, 2, 3):
        pending = manager.begin(step, {"step": step})
        (pending.path / "f").write_text(str(step))
        pending.commit()
    assert [i.step for i in manager.store.list()] == [2, 3]
    assert manager.get_best_checkpoint_path().endswith("step_000000003")  # unranked: the latest


# -- Metta --------------------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3", "tiered"])
def metta(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A factory of Metta managers: local disk, S3, or local disk tiered to S3."""
    if request.param == "local":
        storage_uri, remote_uri, options = str(tmp_path / "train_dir"), None, {}
    else:
        bucket, options = request.getfixturevalue("s3_bucket")
        if request.param == "s3":
            storage_uri, remote_uri = f"{bucket}/train_dir", None
        else:
            storage_uri, remote_uri = str(tmp_path / "train_dir"), f"{bucket}/policies"

    def make(**kwargs: Any) -> CheckpointManager:
        return CheckpointManager("metta_run", storage_uri, remote_uri, storage_options=options, **kwargs)

    make.kind = request.param  # type: ignore[attr-defined]
    return make


def agent(seed: int) -> TinyPolicy:
    torch.manual_seed(seed)
    return TinyPolicy()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_metta_manager_round_trip(metta: Any) -> None:
    manager = metta(cache_size=2)
    assert MettaCheckpointManager is CheckpointManager
    agents = {epoch: agent(epoch) for epoch in (1, 2, 3)}
    uris = {}
    for epoch, policy in agents.items():
        metadata = {"agent_step": epoch * 100, "total_time": epoch * 10, "score": 1.0 / epoch, "tag": "x"}
        uris[epoch] = manager.save_agent(policy, epoch, metadata)
    for epoch, uri in uris.items():
        assert uri.endswith(f"/metta_run/checkpoints/step_{epoch:09d}")
        assert uri.startswith({"local": "file://", "s3": "s3://", "tiered": "s3://"}[metta.kind])
    if metta.kind == "tiered":
        assert "/policies/" in uris[1]
        assert [i.durability for i in manager.store.list()] == [["local", "remote"]] * 3
    arch = manager.store.read_architecture() if metta.kind != "tiered" else manager.local.read_architecture()
    assert arch.class_path == "ray_ckpt.interop.mock.TinyPolicy"

    loaded = manager.load_from_uri(uris[2])
    assert isinstance(loaded, TinyPolicy) and same_weights(loaded, agents[2])
    assert manager.load_from_uri(uris[2]) is loaded  # cached
    latest = manager.load_from_uri(f"{manager.run_uri}:latest")
    assert same_weights(latest, agents[3])
    assert same_weights(manager.load_from_uri(f"{manager.run_uri}:v1"), agents[1])
    assert len(manager._cache) == 2  # LRU of cache_size entries
    assert manager.load_from_uri(uris[2]) is not loaded  # evicted, loaded again
    assert same_weights(manager.load_agent(), agents[3])
    manager.clear_cache()
    assert len(manager._cache) == 0
    mock = manager.load_from_uri("mock://tiny_agent")
    assert isinstance(mock, TinyPolicy)

    meta = manager.get_policy_metadata(uris[2])
    assert (meta["run_name"], meta["epoch"], meta["agent_step"], meta["score"]) == ("metta_run", 2, 200, 0.5)
    assert meta["original_uri"] == uris[2] and meta["tag"] == "x"
    meta = manager.get_policy_metadata(f"{manager.run_uri}:latest")
    assert meta["epoch"] == 3 and meta["agent_step"] == 300
    assert manager.get_policy_metadata("mock://tiny_agent")["run_name"] == "tiny_agent"

    assert manager.select_checkpoints() == [uris[3]]
    assert manager.select_checkpoints("latest", count=2) == [uris[3], uris[2]]
    assert manager.select_checkpoints("all") == [uris[3], uris[2], uris[1]]
    assert manager.select_checkpoints("latest", count=1, metric="score") == [uris[1]]
    with pytest.raises(ValueError, match="strategy"):
        manager.select_checkpoints("random")

    # Re-saving an epoch replaces it and drops its cached policy.
    manager.load_from_uri(uris[3])
    new3 = agent(33)
    manager.save_agent(new3, 3, {"agent_step": 301})
    assert same_weights(manager.load_from_uri(uris[3]), new3)

    assert manager.cleanup_old_checkpoints(keep_last_n=1) == 2
    assert [i.step for i in manager.local.list()] == [3]
    if metta.kind == "tiered":  # local copies dropped, the remote ones remain readable
        assert [(i.step, i.durability) for i in manager.store.list()] == [
            (1, ["remote"]),
            (2, ["remote"]),
            (3, ["local", "remote"]),
        ]
        assert same_weights(manager.load_from_uri(uris[1]), agents[1])
    manager.close()


def test_metta_trainer_state(metta: Any) -> None:
    manager = metta()
    assert manager.load_trainer_state() is None
    model = agent(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
    manager.save_trainer_state(optimizer, epoch=1, agent_step=100)
    manager.save_trainer_state(
        optimizer,
        epoch=2,
        agent_step=200,
        stopwatch_state={"elapsed": 1.5, "laps": [1, 2]},
        curriculum_state={"level": 3, "weights": torch.ones(2)},
        loss_states={"ppo": {"clip": 0.2}},
    )
    state = metta().load_trainer_state()  # a new manager (a resumed process) reads it back
    assert state is not None
    assert (state["epoch"], state["agent_step"]) == (2, 200)
    assert state["stopwatch_state"] == {"elapsed": 1.5, "laps": [1, 2]}
    assert state["curriculum_state"]["level"] == 3 and torch.equal(state["curriculum_state"]["weights"], torch.ones(2))
    assert state["loss_states"] == {"ppo": {"clip": 0.2}}
    fresh = torch.optim.Adam(agent(0).parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer_state"])
    for key, value in optimizer.state_dict()["state"][0].items():
        torch.testing.assert_close(fresh.state_dict()["state"][0][key], value)
    assert fresh.state_dict()["param_groups"][0]["betas"] == (0.9, 0.999)
    assert [i.step for i in manager._trainer.list()] == [2]  # the latest trainer state is kept
    manager.close()


def test_metta_uri_helpers(tmp_path: Path) -> None:
    assert CheckpointManager.normalize_uri(str(tmp_path / "train_dir" / "r1")) == f"file://{tmp_path}/train_dir/r1"
    assert CheckpointManager.normalize_uri("s3://bucket/p/r1:v3") == "s3://bucket/p/r1:v3"
    with pytest.raises(ConfigError):
        CheckpointManager("bad/run", str(tmp_path))
