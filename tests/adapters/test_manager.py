"""CheckpointManager (Orbax semantics over the store) and initialize_run_dir's resume/overwrite/new matrix."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import ray_ckpt
from ray_ckpt import CheckpointExistsError, CheckpointManager, CheckpointNotFoundError, CheckpointStore, ConfigError
from ray_ckpt.adapters.manager import BEST_FN_METRIC, initialize_run_dir
from ray_ckpt.interop.mock import TinyPolicy


def _state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(step)), "b": torch.arange(2) + step}


def _committed(run: Path) -> list[int]:
    return [i.step for i in CheckpointStore(str(run.parent), run.name).list()]


@pytest.mark.parametrize("async_save", [False, True])
def test_interval_and_max_to_keep(tmp_path: Path, async_save: bool) -> None:
    run = tmp_path / "run1"
    with CheckpointManager(str(run), max_to_keep=2, save_interval_steps=3, async_save=async_save) as mgr:
        saved = [step for step in range(1, 13) if mgr.save(step, _state(step))]
        assert saved == [3, 6, 9, 12]
        assert mgr.latest_step() == 12
    assert _committed(run) == [9, 12]  # keep_last_n=2 through the store's retention
    with CheckpointManager(str(run)) as mgr:
        assert mgr.all_steps() == [9, 12] and mgr.latest_step() == 12
        torch.testing.assert_close(mgr.restore()["w"], torch.full((3,), 12.0))
        torch.testing.assert_close(mgr.restore(9)["b"], torch.arange(2) + 9)


def test_best_fn_ranks_and_keeps_top_k(tmp_path: Path) -> None:
    run = tmp_path / "run1"
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.3, 5: 0.8}
    with CheckpointManager(
        str(run), max_to_keep=2, best_fn=lambda m: m["loss"], best_mode="min", async_save=False
    ) as mgr:
        for step, loss in losses.items():
            mgr.save(step, _state(step), metrics={"loss": loss})
        assert mgr.best_step() == 2
        assert mgr.metrics(2) == {"loss": 0.1, BEST_FN_METRIC: 0.1}
    assert _committed(run) == [2, 4, 5]  # top-2 by loss, and the latest (the resume point)
    # readers rank the way the manager did: the policy is recorded with each checkpoint
    assert ray_ckpt.load_from_uri(f"{run}:best").step == 2
    with CheckpointManager(str(run), max_to_keep=2, best_fn=lambda m: m["loss"], async_save=False) as mgr:
        assert mgr.best_step() == 2 and mgr.latest_step() == 5  # a reopened manager sees the same ranking


def test_best_fn_as_metric_name_and_max_mode(tmp_path: Path) -> None:
    with CheckpointManager(str(tmp_path / "r"), max_to_keep=None, best_fn="reward", best_mode="max") as mgr:
        for step, reward in ((1, 3.0), (2, 7.0), (3, 5.0)):
            mgr.save(step, _state(step), metrics={"reward": reward})
        assert mgr.best_step() == 2 and mgr.all_steps() == [1, 2, 3]


def test_restore_returns_the_shape_that_was_saved(tmp_path: Path) -> None:
    model = TinyPolicy()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    with CheckpointManager(str(tmp_path / "r")) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt, "epoch": 1, "rng": torch.tensor([7])})
        mgr.save(2, model)
        mgr.save(3, {"policy": {"a": torch.ones(1)}, "step": 3})
        restored = mgr.restore(1)
        assert list(restored) == ["model", "optimizer", "epoch", "rng"]
        assert restored["epoch"] == 1
        fresh = TinyPolicy()
        fresh.load_state_dict(restored["model"])
        torch.testing.assert_close(fresh.head.weight, model.head.weight)
        new_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
        new_opt.load_state_dict(restored["optimizer"])
        assert new_opt.param_groups[0]["lr"] == 0.01
        assert set(mgr.restore(2)) == set(model.state_dict())
        nested = mgr.restore(3)
        assert nested["step"] == 3 and torch.equal(nested["policy"]["a"], torch.ones(1))
    # the model weights are the run's state dict: any reader can instantiate them
    assert set(ray_ckpt.load_from_uri(f"{tmp_path}/r:v1").state_dict) == set(model.state_dict())


def test_async_save_snapshots_state_and_reports_pending_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(str(tmp_path / "r"), async_save=True)
    gate = threading.Event()
    real_save = mgr.store.save

    def slow_save(*args: Any, **kwargs: Any) -> Any:
        gate.wait(10)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(mgr.store, "save", slow_save)
    state = {"w": torch.zeros(4)}
    assert mgr.save(5, state)
    state["w"].add_(100)  # training goes on in place: the checkpoint must hold the zeros
    assert mgr.latest_step() == 5 and mgr.all_steps() == [5]  # in flight, already reported
    assert _committed(tmp_path / "r") == []
    gate.set()
    mgr.wait()
    assert _committed(tmp_path / "r") == [5]
    torch.testing.assert_close(mgr.restore()["w"], torch.zeros(4))
    mgr.close()


def test_background_failure_surfaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(str(tmp_path / "r"), async_save=True)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(mgr.store, "save", broken)
    mgr.save(1, _state(1))
    with pytest.raises(OSError, match="disk full"):
        mgr.wait()
    monkeypatch.undo()
    assert mgr.save(1, _state(1))  # the failed step can be saved again
    mgr.close()
    assert _committed(tmp_path / "r") == [1]


def test_steps_must_increase_and_closed_manager(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "r"), async_save=False)
    mgr.save(4, _state(4))
    with pytest.raises(CheckpointExistsError):
        mgr.save(4, _state(4))
    with pytest.raises(CheckpointExistsError):
        mgr.save(2, _state(2))
    assert not mgr.should_save(3) and mgr.should_save(5)
    mgr.close()
    mgr.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        mgr.save(6, _state(6))


def test_restore_without_checkpoints_and_bad_arguments(tmp_path: Path) -> None:
    with CheckpointManager(str(tmp_path / "r")) as mgr:
        assert mgr.latest_step() is None and mgr.best_step() is None
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore()
    with pytest.raises(ConfigError):
        CheckpointManager(str(tmp_path / "r"), max_to_keep=0)
    with pytest.raises(ConfigError):
        CheckpointManager(f"{tmp_path}/r:latest")
    with pytest.raises(TypeError, match="metadata"):
        CheckpointManager(str(tmp_path / "x"), async_save=True).save(1, _state(1), metadata={"o": object()})


# ---------------------------------------------------------------------------------------------
# initialize_run_dir
# ---------------------------------------------------------------------------------------------
def test_initialize_new(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "exp"
    assert initialize_run_dir(str(run), "new") is None and run.is_dir()
    assert initialize_run_dir(str(run), "new") is None  # still empty: nothing would be clobbered
    CheckpointStore(str(run.parent), "exp").save(1, _state(1))
    with pytest.raises(FileExistsError, match="already exists"):
        initialize_run_dir(str(run), "new")
    assert _committed(run) == [1]


def test_initialize_resume(tmp_path: Path) -> None:
    run = tmp_path / "exp"
    assert initialize_run_dir(str(run), "resume") is None and run.is_dir()  # nothing there: fresh start
    with CheckpointManager(str(run)) as mgr:
        mgr.save(3, _state(3))
        mgr.save(8, _state(8))
    assert initialize_run_dir(str(run), "resume") == 8
    assert _committed(run) == [3, 8]


def test_initialize_overwrite_moves_aside_then_deletes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "exp"
    CheckpointStore(str(tmp_path), "exp").save(1, _state(1))
    renames: list[tuple[str, str]] = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: renames.append((str(a), str(b))) or real_rename(a, b))
    assert initialize_run_dir(str(run), "overwrite") is None
    assert len(renames) == 1 and renames[0][0] == str(run)
    assert os.path.basename(renames[0][1]).startswith(".exp.trash-")
    assert run.is_dir() and list(run.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_overwrite_interrupted_after_rename_leaves_no_half_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_ckpt.core.storage.storage import Storage

    run = tmp_path / "exp"
    CheckpointStore(str(tmp_path), "exp").save(1, _state(1))
    real_rm = Storage.rm

    def crash(self: Storage, path: str, **kwargs: Any) -> None:
        if ".trash-" in path:
            raise KeyboardInterrupt  # killed while deleting the moved-aside run
        real_rm(self, path, **kwargs)

    monkeypatch.setattr(Storage, "rm", crash)
    with pytest.raises(KeyboardInterrupt):
        initialize_run_dir(str(run), "overwrite")
    assert not run.exists()  # the old run is entirely gone from its name, not half-deleted
    assert _committed(run) == []
    monkeypatch.setattr(Storage, "rm", real_rm)
    assert initialize_run_dir(str(run), "new") is None  # the leftover trash is cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_initialize_bad_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mode"):
        initialize_run_dir(str(tmp_path / "r"), "append")


def test_overwrite_on_s3(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    bucket, options = s3_bucket
    store = CheckpointStore(f"{bucket}/runs", "exp", options)
    store.save(1, _state(1))
    store.save(2, _state(2))
    with pytest.raises(FileExistsError):
        initialize_run_dir(f"{bucket}/runs/exp", "new", storage_options=options)
    assert initialize_run_dir(f"{bucket}/runs/exp", "resume", storage_options=options) == 2
    assert initialize_run_dir(f"{bucket}/runs/exp", "overwrite", storage_options=options) is None
    assert CheckpointStore(f"{bucket}/runs", "exp", options).list() == []
