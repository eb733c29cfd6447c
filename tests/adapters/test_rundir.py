"""The run-directory helper: runs/<run_id>/config.json, checkpoints/ and the best pointer."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointStore
from ray_ckpt.adapters.rundir import BEST_POINTER, RunDir
from ray_ckpt.core.errors import CheckpointNotFoundError


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    if request.param == "local":
        return str(tmp_path / "runs"), {}
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/runs", options


def test_run_dir_layout_config_and_best_pointer(root: tuple[str, dict[str, Any]]) -> None:
    base, options = root
    run = RunDir(
        "exp1",
        base,
        config={"lr": 0.1, "layers": [2, 3]},
        storage_options=options,
        metric_name="val_loss",
        mode="min",
        keep_top_k=2,
    )
    assert run.read_config() == {"layers": [2, 3], "lr": 0.1}
    assert run.best_step() is None and run.best_path() is None
    with pytest.raises(CheckpointNotFoundError):
        run.load_best()
    for step, loss in ((1, 0.9), (2, 0.3), (3, 0.5), (4, 0.7)):
        run.save(step, {"w": torch.full((2,), float(step))}, {"val_loss": loss})
        assert run.best_step() == 2 or step == 1
    assert run.best_step() == 2
    torch.testing.assert_close(run.load_best()["w"], torch.full((2,), 2.0))

    # Retention (keep_top_k=2 + latest) and the layout any store reader sees.
    reader = CheckpointStore(base, "exp1", options)
    assert [i.step for i in reader.list()] == [2, 3, 4]
    names = run.storage.list_names("")
    assert {"config.json", "checkpoints", BEST_POINTER} <= set(names)
    if run.storage.is_local:
        link = Path(run.path, BEST_POINTER)
        assert link.is_symlink() and os.readlink(link) == "checkpoints/step_000000002"
        assert run.best_path() == str(link)
        assert sorted(p.name for p in link.iterdir())[0] == "checkpoint.json"
        assert not [n for n in os.listdir(run.path) if n.startswith(".")]  # no temp links left
    else:
        pointer = json.loads(run.storage.read_bytes(BEST_POINTER))
        assert pointer["step"] == 2 and pointer["path"] == "checkpoints/step_000000002"
        assert run.best_path() == reader.step_uri(2)

    # A better checkpoint moves the pointer; a deleted target makes it stale, not wrong.
    run.save(5, {"w": torch.zeros(2)}, {"val_loss": 0.1})
    assert run.best_step() == 5
    run.store.delete(5)
    assert run.best_step() is None
    assert run.update_best() == 2 and run.best_step() == 2


def test_run_ids_and_no_metric(tmp_path: Path) -> None:
    a, b = RunDir(root=tmp_path), RunDir(root=tmp_path)
    assert a.run_id != b.run_id and a.path.parent == tmp_path
    assert a.read_config() is None
    a.save(1, {"w": torch.ones(1)})
    assert a.best_step() is None and not os.path.lexists(a.path / BEST_POINTER)


def test_best_symlink_is_replaced_atomically(tmp_path: Path) -> None:
    run = RunDir("atomic", tmp_path, metric_name="score", mode="max")
    run.save(1, {"w": torch.ones(1)}, {"score": 1.0})
    run.save(2, {"w": torch.ones(1)}, {"score": 2.0})
    link = run.path / BEST_POINTER
    seen: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(os.readlink(link))  # never FileNotFoundError: the link is always there

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(30):
            run.store.report_eval(1 + i % 2, {"score": 10.0 + i})  # flip which step is best
            run.update_best()
    finally:
        stop.set()
        thread.join()
    assert seen <= {"checkpoints/step_000000001", "checkpoints/step_000000002"} and len(seen) == 2
