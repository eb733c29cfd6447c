"""The second round of hostile and damaged storage: nothing planted on storage destroys, fakes or
stalls a run.

Each test plants what an attacker with write access to the storage (a shared bucket, a stale
job) or a disk fault would, then checks the safe outcome: the real steps survive bit-exact, the
run still lists, ranks, saves and loads, and what is refused names the file. Where the storage
makes a difference (object stores have no renames, no symlinks, no FIFOs) the case runs on a
local disk and on the loopback S3 server. docs/RELIABILITY.md lists the cases.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointStore
from ray_ckpt.layout import staging_dir, step_dir
from ray_ckpt.storage import Storage

RUN = "planted"
REPLACE_ID = "0123456789ab"


def _state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((32,), float(step)), "b": torch.arange(5.0) * step}


def _same(state: dict[str, Any], expected: dict[str, torch.Tensor]) -> bool:
    return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A storage root and its options: a local directory, or a fresh bucket on loopback S3."""
    if request.param == "local":
        yield str(tmp_path / "runs"), {}
    else:
        yield request.getfixturevalue("s3_bucket")


def _open(where: tuple[str, dict[str, Any]], **options: Any) -> CheckpointStore:
    uri, storage_options = where
    options = {"metric_name": "loss", "mode": "min", "leftover_grace_s": 0, **options}
    return CheckpointStore(uri, run_name=RUN, storage_options=storage_options, **options)


def _two_steps(where: tuple[str, dict[str, Any]]) -> CheckpointStore:
    store = _open(where)
    store.save(1, _state(1), metrics={"loss": 1.0})
    store.save(2, _state(2), metrics={"loss": 0.5})
    return store


def _copy_step(storage: Storage, src: str, dst: str, **marker_fields: Any) -> None:
    """Copy every file of a step directory to ``dst``, the marker last, with fields changed."""
    for name in storage.find(src):
        if name != "checkpoint.json":
            storage.makedirs(os.path.dirname(f"{dst}/{name}"))
            storage.copy(f"{src}/{name}", f"{dst}/{name}")
    marker = json.loads(storage.read_bytes(f"{src}/checkpoint.json"))
    marker.update(marker_fields)
    storage.write_bytes(f"{dst}/checkpoint.json", json.dumps(marker).encode())


def _check_intact(where: tuple[str, dict[str, Any]]) -> CheckpointStore:
    """Both real steps list, verify and load bit-exact; no staging directory is left."""
    store = _open(where)
    assert [i.step for i in store.list()] == [1, 2]
    for step in (1, 2):
        store.verify(step)
        assert _same(store.load(step), _state(step))
    assert [n for n in store.storage.list_names("checkpoints") if n.startswith(".")] == []
    return store


# -- 1. overwrite recovery proves a staged replacement before swapping it in -------------------
def _marker_only(storage: Storage) -> None:
    """A staging folder holding a copy of step 1's marker with a replace id, and no files."""
    marker = json.loads(storage.read_bytes(f"{step_dir(1)}/checkpoint.json"))
    marker["replace_id"] = REPLACE_ID
    storage.write_bytes(f"{staging_dir(1, REPLACE_ID)}/checkpoint.json", json.dumps(marker).encode())


def _another_step(storage: Storage) -> None:
    """A complete copy of step 2 (files and marker, with a replace id) staged as step 1's replacement."""
    _copy_step(storage, step_dir(2), staging_dir(1, REPLACE_ID), replace_id=REPLACE_ID)


def _damaged_file(storage: Storage) -> None:
    """A copy of step 1 with its marker and replace id, one shard's byte flipped (sizes still match)."""
    marker = json.loads(storage.read_bytes(f"{step_dir(1)}/checkpoint.json"))
    staged = staging_dir(1, REPLACE_ID)
    _copy_step(storage, step_dir(1), staged, replace_id=REPLACE_ID)
    shard = next(n for n in marker["files"] if n.endswith(".safetensors"))
    data = bytearray(storage.read_bytes(f"{staged}/{shard}"))
    data[-1] ^= 0xFF
    storage.write_bytes(f"{staged}/{shard}", bytes(data))


STAGED = {"marker-without-files": _marker_only, "another-steps-copy": _another_step, "a-damaged-file": _damaged_file}


@pytest.mark.parametrize("start", ["gc", "first-save", "cli-gc"])
@pytest.mark.parametrize("plant", list(STAGED), ids=list(STAGED))
def test_a_planted_staging_folder_is_never_swapped_in(
    where: tuple[str, dict[str, Any]],
    plant: str,
    start: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = _two_steps(where)
    STAGED[plant](store.storage)
    writer = _open(where)
    with caplog.at_level(logging.WARNING, logger="ray_ckpt"):
        if start == "gc":
            writer.gc()
        elif start == "first-save":
            writer.save(3, _state(3), metrics={"loss": 2.0})
        else:
            from ray_ckpt.cli import main as cli_main

            monkeypatch.setenv("RAY_CKPT_STORAGE_OPTIONS", json.dumps(where[1]))
            assert cli_main(["gc", f"{where[0]}/{RUN}"]) == 0
    assert any(staging_dir(1, REPLACE_ID) in r.getMessage() for r in caplog.records)  # named, then removed
    if start == "first-save":
        writer.delete(3)
    _check_intact(where)


def test_a_symlinked_staging_folder_or_staged_link_is_removed_as_a_link(tmp_path: Path) -> None:
    where = (str(tmp_path / "runs"), {})
    store = _two_steps(where)
    checkpoints = tmp_path / "runs" / RUN / "checkpoints"
    # A whole staging folder that is a link to a committed-looking copy elsewhere.
    _copy_step(store.storage, step_dir(1), "elsewhere", replace_id=REPLACE_ID)
    os.symlink(tmp_path / "runs" / RUN / "elsewhere", checkpoints / f".step_000000001.replace-{REPLACE_ID}")
    # A staging folder of real files except one, a link to the real step's own shard.
    other = "fedcba987654"
    staged = checkpoints / f".step_000000002.replace-{other}"
    marker2 = json.loads((checkpoints / "step_000000002" / "checkpoint.json").read_text())
    _copy_step(store.storage, step_dir(2), staging_dir(2, other), replace_id=other)
    shard = next(n for n in marker2["files"] if n.endswith(".safetensors"))
    (staged / shard).unlink()
    os.symlink(checkpoints / "step_000000002" / shard, staged / shard)
    _open(where).gc()
    _check_intact(where)
    assert (tmp_path / "runs" / RUN / "elsewhere" / "checkpoint.json").exists()  # the link's target untouched


def test_a_proven_replacement_is_still_finished(where: tuple[str, dict[str, Any]]) -> None:
    """Control: a real replacement cut short after its staging commit is proven and swapped in."""
    store = _two_steps(where)
    _copy_step(store.storage, step_dir(2), staging_dir(1, REPLACE_ID), replace_id=REPLACE_ID, step=1)
    _open(where).gc()
    store = _open(where)
    assert [i.step for i in store.list()] == [1, 2]
    store.verify(1)
    assert _same(store.load(1), _state(2))  # step 1 now holds the staged version


def test_a_failed_copy_on_s3_loses_neither_version(
    s3_bucket: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that fails mid-swap leaves the staged version whole: the next start finishes it."""
    store = _two_steps(s3_bucket)
    copies = [0]
    original = Storage.copy

    def failing(self: Storage, src: str, dst: str) -> None:
        copies[0] += 1
        if copies[0] == 2:
            raise OSError(5, "injected copy failure")
        original(self, src, dst)

    monkeypatch.setattr(Storage, "copy", failing)
    with pytest.raises(OSError):
        store.save(1, _state(7), metrics={"loss": 3.0}, overwrite=True)
    monkeypatch.setattr(Storage, "copy", original)
    _open(s3_bucket).gc()
    store = _open(s3_bucket)
    assert [i.step for i in store.list()] == [1, 2]
    store.verify(1)
    assert _same(store.load(1), _state(7)) and _same(store.load(2), _state(2))
