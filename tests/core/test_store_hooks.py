"""The hooks a plain store offers to what is composed around it: listeners, keepers, a read fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointConfig, CheckpointStore, ConfigError, TieredCheckpointStore, open_store
from ray_ckpt.core.errors import CheckpointNotFoundError
from ray_ckpt.core.hooks import StoreListener
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.retention import Steps


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), value)}


class Recorder(StoreListener):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def writer_started(self) -> None:
        self.events.append(("writer_started", None))

    def committed(self, info: CheckpointInfo) -> None:
        self.events.append(("committed", info.step))

    def scored(self, step: int) -> None:
        self.events.append(("scored", step))

    def deleted(self, steps: list[int]) -> None:
        self.events.append(("deleted", steps))


class Failing(StoreListener):
    def committed(self, info: CheckpointInfo) -> None:
        raise RuntimeError("listener boom")


def test_listeners_hear_commits_scores_and_deletions_and_never_fail_them(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), run_name="heard", keep_last_n=2, metric_name="loss")
    recorder = Recorder()
    store.listeners += [Failing(), recorder]
    for step in (1, 2, 3):
        store.save(step, state(step), metrics={"loss": 1.0 / step})  # the failing listener is only logged
    store.report_eval(3, {"eval/score": 1.0})
    store.delete(2)
    assert recorder.events == [
        ("writer_started", None),
        ("committed", 1),
        ("committed", 2),
        ("committed", 3),
        ("deleted", [1]),  # retention (keep_last_n=2) after step 3
        ("scored", 3),
        ("deleted", [2]),
    ]
    assert [i.step for i in store.list()] == [3]


def test_keepers_keep_steps_another_tier_needs(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), run_name="kept", keep_last_n=1)
    store.keepers.append(lambda: Steps(frozenset({1}), "needed elsewhere"))
    for step in (1, 2, 3):
        store.save(step, state(step))
    assert [i.step for i in store.list()] == [1, 3]
    assert store.retention_plan() == ([1, 3], [])
    store.keepers.clear()
    assert store.apply_retention() == [1]


def test_a_plain_store_reads_what_it_lacks_from_its_fallback(tmp_path: Path) -> None:
    far = CheckpointStore(str(tmp_path / "far"), run_name="run")
    far.write_architecture(torch.nn.Linear, {"in_features": 4, "out_features": 1})
    far.save(1, torch.nn.Linear(4, 1).state_dict(), metrics={"loss": 0.5}, trainer_state={"epoch": 1})
    near = CheckpointStore(str(tmp_path / "near"), run_name="run")
    near.save(2, torch.nn.Linear(4, 1).state_dict())
    with pytest.raises(CheckpointNotFoundError):
        near.load(1)
    with pytest.raises(FileNotFoundError):
        near.read_architecture()

    near.fallback = far
    assert near.store_for(1) is far and near.store_for(2) is near
    torch.testing.assert_close(near.load(1), far.load(1))
    assert near.load_trainer_state(1) == {"epoch": 1}
    assert near.info(1).metrics == {"loss": 0.5} and near.info(1).uri == far.step_uri(1)
    assert near.verify(1).step == 1
    assert near.read_architecture().class_path == "torch.nn.modules.linear.Linear"
    assert [i.step for i in near.list()] == [2]  # queries stay this store's own
    with pytest.raises(CheckpointNotFoundError, match="no committed step 7 on any tier"):
        near.load(7)


def test_a_plain_store_refuses_a_tiered_config_and_open_store_resolves_it(tmp_path: Path) -> None:
    cfg = CheckpointConfig(storage_uri=str(tmp_path / "local"), run_name="run")
    tiered = cfg.replace(remote_uri=f"file://{tmp_path / 'remote'}")
    with pytest.raises(ConfigError, match=r"open_store\(config\)"):
        CheckpointStore(config=tiered)
    plain = open_store(cfg)
    assert type(plain) is CheckpointStore
    store = open_store(tiered)
    assert isinstance(store, TieredCheckpointStore)
    assert type(store.local) is CheckpointStore and type(store.remote) is CheckpointStore
    assert store.local.fallback is store.remote and store.uploader in store.local.listeners
    assert store.pending_uploads() == []  # opened, not written: nothing resumed
    store.close()
