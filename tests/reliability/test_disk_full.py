"""Disk full (ENOSPC): injected at the storage layer at chosen writes, and for real on a small
tmpfs mounted by the test. A clear StorageError naming the file, no retries, no temp files
left, earlier checkpoints intact, and the next save commits once there is room again."""

from __future__ import annotations

import errno
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointStore, StorageError
from ray_ckpt.core.storage.storage import Storage
from tests.reliability.faults import (
    SHARD_LIMIT,
    assert_state,
    step_dirs,
    temp_files,
    tensors_for,
    unmarked_step_dirs,
)

RUN = "full"


def _store(root: Path, **options: Any) -> CheckpointStore:
    return CheckpointStore(str(root), run_name=RUN, metric_name="loss", max_shard_size=SHARD_LIMIT, **options)


def _enospc_on(monkeypatch: pytest.MonkeyPatch, matches: Callable[[str], bool], *, after_bytes: int = 0) -> list[str]:
    """Make every write to a path ``matches`` accepts fail with ENOSPC once ``after_bytes`` went in.

    Returns the list of paths that failed (one entry per attempt: retries would show up there).
    """
    failed: list[str] = []
    original = Storage.write_stream

    class Full:
        def __init__(self, f: Any, path: str) -> None:
            self.f, self.path, self.written = f, path, 0

        def write(self, data: Any) -> int:
            view = memoryview(data).cast("B")
            room = max(0, after_bytes - self.written)
            if len(view) > room:
                self.f.write(view[:room])  # what fitted reaches the file, like a real full disk
                self.f.flush()
                failed.append(self.path)
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(view)
            return self.f.write(view)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

    def write_stream(self: Storage, path: str, writer: Any, **options: Any) -> Any:
        if not matches(path):
            return original(self, path, writer, **options)
        return original(self, path, lambda f: writer(Full(f, path)), **options)

    monkeypatch.setattr(Storage, "write_stream", write_stream)
    return failed


def _assert_intact(store: CheckpointStore, steps: list[int]) -> None:
    fresh = CheckpointStore(store.config.storage_uri, run_name=RUN, metric_name="loss")
    assert [i.step for i in fresh.list()] == steps
    for step in steps:
        fresh.verify(step)
        assert_state(step, fresh.load(step))


@pytest.mark.parametrize(
    ("where", "matches", "after_bytes"),
    [
        ("first shard, first byte", lambda p: p.endswith("step_000000002/model-00001-of-00003.safetensors"), 0),
        ("second shard, mid-write", lambda p: p.endswith("step_000000002/model-00002-of-00003.safetensors"), 3000),
        ("the model index", lambda p: p.endswith("step_000000002/model.safetensors.index.json"), 10),
        ("the commit marker's temp file", lambda p: "step_000000002/.checkpoint.json.tmp-" in p, 100),
    ],
    ids=["shard1", "shard2-mid", "index", "marker"],
)
def test_enospc_during_a_save_fails_clearly_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, matches: Callable[[str], bool], after_bytes: int
) -> None:
    store = _store(tmp_path)
    store.save(1, tensors_for(1), metrics={"loss": 1.0})
    failed = _enospc_on(monkeypatch, matches, after_bytes=after_bytes)
    with pytest.raises(StorageError) as excinfo:
        store.save(2, tensors_for(2), metrics={"loss": 0.5})
    assert excinfo.value.errno == errno.ENOSPC, where
    assert failed and failed[0] in str(excinfo.value) or Path(failed[0]).name in str(excinfo.value), excinfo.value
    assert len(failed) == 1, f"ENOSPC was retried: {failed}"  # a full disk is permanent: no retry
    monkeypatch.undo()
    run_dir = tmp_path / RUN
    assert temp_files(run_dir) == []
    assert step_dirs(run_dir) == ["step_000000001"]  # the partial step was removed
    _assert_intact(store, [1])
    store.save(2, tensors_for(2), metrics={"loss": 0.5})  # room again: the run goes on
    _assert_intact(store, [1, 2])


def test_enospc_on_small_atomic_writes_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """index.parquet, eval metrics and leases are replaced atomically: a failed write must not
    leave the temp file behind (only the writer's gc would find it, readers never)."""
    store = _store(tmp_path)
    store.save(1, tensors_for(1), metrics={"loss": 1.0})
    run_dir = tmp_path / RUN
    _enospc_on(monkeypatch, lambda p: ".tmp-" in p and "checkpoint.json" not in p, after_bytes=8)

    # The index snapshot is an optimisation: the commit stands, the failed snapshot leaves nothing.
    info = store.save(2, tensors_for(2), metrics={"loss": 0.5})
    assert info.step == 2
    # Eval metrics and leases fail with a clear error.
    with pytest.raises(StorageError, match="eval_metrics.json") as excinfo:
        store.report_eval(1, {"eval/acc": 0.9})
    assert excinfo.value.errno == errno.ENOSPC
    with pytest.raises(StorageError, match=r"leases/\.?step_000000001") as excinfo:
        store.acquire_lease(1, ttl_s=60)
    assert excinfo.value.errno == errno.ENOSPC
    assert temp_files(run_dir) == [], temp_files(run_dir)
    monkeypatch.undo()
    assert store.leased_steps() == set()
    assert "eval/acc" not in store.info(1).metrics
    _assert_intact(store, [1, 2])


# ---------------------------------------------------------------------------------------------
# A real full disk: a 512 KiB tmpfs.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs mounted for this test (skipped where mounting is not allowed)."""
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_real_enospc_on_a_full_tmpfs(small_disk: Path) -> None:
    store = _store(small_disk, keep_last_n=1)
    store.save(1, tensors_for(1), metrics={"loss": 1.0})
    run_dir = small_disk / RUN
    big = {"w": torch.randn(200_000)}  # 800 KB: more than the whole disk
    with pytest.raises(StorageError) as excinfo:
        store.save(2, big, metrics={"loss": 0.5})
    assert excinfo.value.errno == errno.ENOSPC
    assert "step_000000002/model" in str(excinfo.value)  # names the file it was writing
    assert temp_files(run_dir) == []
    assert unmarked_step_dirs(run_dir) == []
    _assert_intact(store, [1])
    # Nearly full: a ballast file leaves room for the shards but not for everything after them.
    ballast = small_disk / "ballast"
    free = shutil.disk_usage(small_disk).free
    ballast.write_bytes(b"\0" * max(0, free - 20_000))
    failures = 0
    for step in (2, 3, 4):
        try:
            store.save(step, tensors_for(step), metrics={"loss": 1.0 / step})
        except StorageError as exc:
            assert exc.errno == errno.ENOSPC
            failures += 1
        assert temp_files(run_dir) == []
        assert unmarked_step_dirs(run_dir) == []
        committed = [i.step for i in store.list()]
        for step_ in committed:
            store.verify(step_)
            assert_state(step_, store.load(step_))
    assert failures, "the ballast left room for every save: the disk was never full"
    ballast.unlink()
    store.save(5, tensors_for(5), metrics={"loss": 0.2})
    assert store.latest().step == 5
    store.verify(5)
