"""``overwrite=True`` is atomic: a process killed at any storage call of the swap leaves the old or
the new version of the step, never neither, and the next writer start finishes or drops the rest.

Each run starts a fresh interpreter that replaces committed step 1 and kills itself
(``os._exit``) at the k-th storage call made while the new version is swapped in, for k = 1, 2, ...
until a run gets through: on a local disk with the atomic directory exchange, on a local disk
without it (two renames), and on a loopback S3 endpoint (no renames: copies, marker last).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointStore

RUN = "over"
KILLED = 9
OLD = {"w": torch.ones(64), "gone": torch.zeros(3)}  # "gone" is not in the new version
NEW = {"w": torch.full((64,), 2.0), "extra": torch.arange(5.0)}

CHILD = r"""
import json, os, sys
import torch
import ray_ckpt.core.writer as store_module
from ray_ckpt import CheckpointStore
from ray_ckpt.core.storage.storage import Storage

uri, options, kill_at, no_exchange = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
calls = [0]


def counted(method):
    def call(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(9)
        return method(self, *args, **kwargs)
    return call


swap = store_module.swap_in_replacement


def swap_with_kills(storage, step, replace_id):
    if no_exchange:
        Storage.exchange = lambda self, a, b: False
    for name in ("exchange", "move", "rm", "copy", "fsync_dir", "read_bytes", "exists"):
        setattr(Storage, name, counted(getattr(Storage, name)))
    return swap(storage, step, replace_id)


store_module.swap_in_replacement = swap_with_kills
store = CheckpointStore(uri, run_name="over", storage_options=options)
store.save(1, {"w": torch.full((64,), 2.0), "extra": torch.arange(5.0)}, overwrite=True)
"""


def _child(uri: str, options: dict[str, Any], kill_at: int, no_exchange: bool) -> int:
    path = os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    args = [sys.executable, "-c", CHILD, uri, json.dumps(options), str(kill_at), "1" if no_exchange else "0"]
    return subprocess.run(args, env=env, timeout=120).returncode


def _same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def _side_dirs(store: CheckpointStore) -> list[str]:
    return [n for n in store.storage.list_names("checkpoints") if n.startswith(".step_")]


def _kill_at_every_call(uri: str, options: dict[str, Any], *, no_exchange: bool, always_visible: bool) -> int:
    """Kill the replacing process at call 1, 2, ... of the swap; check each outcome. The kill count."""
    killed = 0
    for kill_at in range(1, 60):
        store = CheckpointStore(uri, run_name=RUN, storage_options=options)
        for info in store.list():
            store.delete(info.step)
        store.gc()
        store.save(1, OLD)
        code = _child(uri, options, kill_at, no_exchange)
        reader = CheckpointStore(uri, run_name=RUN, storage_options=options)
        listed = [i.step for i in reader.list()]
        if always_visible or listed:
            assert listed == [1], f"kill at call {kill_at}: step 1 not visible ({listed})"
            state = reader.load(1)
            assert _same(state, OLD) or _same(state, NEW), f"kill at call {kill_at}: a mix of versions"
        # The next writer start finishes or drops what the killed save left.
        writer = CheckpointStore(uri, run_name=RUN, storage_options=options, leftover_grace_s=0)
        writer.gc()
        assert [i.step for i in writer.list()] == [1], f"kill at call {kill_at}: lost step 1 after recovery"
        recovered = writer.load(1)
        writer.verify(1)
        assert _same(recovered, OLD) or _same(recovered, NEW), f"kill at call {kill_at}: a mix after recovery"
        assert _side_dirs(writer) == [], f"kill at call {kill_at}: left {_side_dirs(writer)}"
        if code == 0:
            assert _same(recovered, NEW)
            return killed
        assert code == KILLED, f"child exited {code}"
        killed += 1
    raise AssertionError("the replacing save never got through")


@pytest.mark.parametrize("no_exchange", [False, True], ids=["atomic-exchange", "two-renames"])
def test_overwrite_killed_at_any_point_on_a_local_disk_leaves_old_or_new(tmp_path: Path, no_exchange: bool) -> None:
    kills = _kill_at_every_call(str(tmp_path), {}, no_exchange=no_exchange, always_visible=not no_exchange)
    assert kills >= 2  # the swap has several calls to die in


def test_overwrite_killed_at_any_point_on_s3_leaves_old_or_new(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    uri, options = s3_bucket
    kills = _kill_at_every_call(uri, options, no_exchange=False, always_visible=False)
    assert kills >= 5  # marker, old objects, each new object, the new marker, the staging copy


def test_overwrite_keeps_the_old_version_readable_until_the_swap(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), run_name=RUN)
    store.save(1, OLD)
    writer = store.begin_step(1, overwrite=True)
    assert writer.dir != "checkpoints/step_000000001"  # written aside
    other = CheckpointStore(str(tmp_path), run_name=RUN)
    assert _same(other.load(1), OLD)  # still there while the new version is written
    writer.abort()
    assert _same(CheckpointStore(str(tmp_path), run_name=RUN).load(1), OLD)
    assert _side_dirs(store) == []


def test_an_aborted_overwrite_through_the_store_keeps_the_old_version(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), run_name=RUN)
    store.save(1, OLD)
    with pytest.raises(TypeError):
        store.save(1, {"w": torch.ones(2), "bad": object()}, overwrite=True)  # refused before writing
    with pytest.raises(ValueError, match="__metadata__"):
        store.save(1, {"__metadata__": torch.ones(2)}, overwrite=True)
    assert _same(store.load(1), OLD)
