"""Storage: one class over local paths, file:// and memory:// (S3 is covered by the integration tests
and tests/reliability/test_object_store_faults.py). Also: the retry deadline, the S3 option
defaults, reads that open only regular files, deletes that never follow a symlinked directory."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_ckpt import CheckpointStore, ConfigError, StorageError
from ray_ckpt.core.storage.base import RETRY_TIMEOUT_S, TEMP_MARKER, is_temp_name, temp_name
from ray_ckpt.core.storage.objectstore import S3_CONFIG_DEFAULTS
from ray_ckpt.core.storage.storage import Storage, fs_options_for


@pytest.fixture(params=["path", "file", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path, memory_uri: str) -> Storage:
    if request.param == "path":
        return Storage(str(tmp_path / "root"), backoff_s=0.001)
    if request.param == "file":
        return Storage(f"file://{tmp_path}/root", backoff_s=0.001)
    return Storage(memory_uri, backoff_s=0.001)


def test_kinds(tmp_path: Path, memory_uri: str) -> None:
    local = Storage(str(tmp_path / "r"))
    assert local.is_local and local.uri == f"file://{tmp_path}/r"
    assert local.local_path("a/b") == f"{tmp_path}/r/a/b"
    assert local.full_path("/a/b/") == f"{tmp_path}/r/a/b"
    assert local.full_path() == f"{tmp_path}/r"
    assert Storage(f"file://{tmp_path}/r/").uri == local.uri
    mem = Storage(memory_uri)
    assert not mem.is_local
    assert mem.local_path("x") is None
    assert mem.url("a/b.json").startswith("memory://")
    assert mem.url("a/b.json").endswith("/a/b.json")
    assert repr(mem).startswith("Storage(")


def test_write_read_roundtrip(storage: Storage) -> None:
    storage.write_bytes("a/b/c.bin", b"hello")
    assert storage.read_bytes("a/b/c.bin") == b"hello"
    assert storage.exists("a/b/c.bin")
    assert storage.exists("a/b")
    assert storage.size("a/b/c.bin") == 5
    assert not storage.exists("a/nope")


def test_write_stream_returns_writer_result_and_supports_random_access(storage: Storage) -> None:
    def writer(f: object) -> str:
        f.write(b"0123")  # type: ignore[attr-defined]
        f.write(memoryview(b"456789"))  # type: ignore[attr-defined]
        return "done"

    assert storage.write_stream("s.bin", writer) == "done"
    with storage.open_read("s.bin") as f:
        f.seek(6)
        assert f.read(2) == b"67"
        f.seek(0)
        assert f.read() == b"0123456789"


def test_write_replaces_existing(storage: Storage) -> None:
    storage.write_bytes("x", b"old content")
    storage.write_bytes("x", b"new")
    assert storage.read_bytes("x") == b"new"


def test_missing_file_raises_file_not_found(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("missing.bin")
    with pytest.raises(FileNotFoundError):
        storage.size("missing.bin")
    with pytest.raises(FileNotFoundError):
        with storage.open_read("missing.bin"):
            pass


def test_write_atomic(storage: Storage) -> None:
    storage.write_atomic("d/marker.json", b'{"v": 1}')
    storage.write_atomic("d/marker.json", b'{"v": 2}')
    assert storage.read_bytes("d/marker.json") == b'{"v": 2}'
    assert storage.list_names("d") == ["marker.json"]  # no temp file left behind


def test_list_names(storage: Storage) -> None:
    assert storage.list_names("nothing/here") == []
    storage.write_bytes("top/b.txt", b"b")
    storage.write_bytes("top/a.txt", b"a")
    storage.write_bytes("top/sub/c.txt", b"c")
    assert storage.list_names("top") == ["a.txt", "b.txt", "sub"]
    assert storage.list_names("top/sub") == ["c.txt"]
    assert "top" in storage.list_names("")
    # a listing sees files written after an earlier listing (no stale cache)
    storage.write_bytes("top/d.txt", b"d")
    assert storage.list_names("top") == ["a.txt", "b.txt", "d.txt", "sub"]


def test_glob(storage: Storage) -> None:
    for step in (1, 2, 10):
        storage.write_bytes(f"checkpoints/step_{step:09d}/eval.json", b"{}")
    storage.write_bytes("checkpoints/step_000000003/other.json", b"{}")
    assert storage.glob("checkpoints/step_*/eval.json") == [
        "checkpoints/step_000000001/eval.json",
        "checkpoints/step_000000002/eval.json",
        "checkpoints/step_000000010/eval.json",
    ]
    assert storage.glob("nothing/*.json") == []
    # glob is not fooled by an earlier (cached) listing
    storage.write_bytes("checkpoints/step_000000011/eval.json", b"{}")
    assert len(storage.glob("checkpoints/step_*/eval.json")) == 4


def test_rm(storage: Storage) -> None:
    storage.write_bytes("f.bin", b"1")
    storage.rm("f.bin")
    assert not storage.exists("f.bin")
    with pytest.raises(FileNotFoundError):
        storage.rm("f.bin")
    storage.rm("f.bin", missing_ok=True)
    storage.write_bytes("tree/a/b.bin", b"1")
    storage.write_bytes("tree/c.bin", b"2")
    storage.rm("tree", recursive=True)
    assert not storage.exists("tree")
    assert storage.list_names("tree") == []
    storage.rm("tree", recursive=True, missing_ok=True)


def test_move_file_and_directory(storage: Storage) -> None:
    storage.write_bytes("src/f.bin", b"payload")
    storage.move("src/f.bin", "dst/g.bin")
    assert storage.read_bytes("dst/g.bin") == b"payload"
    assert not storage.exists("src/f.bin")
    storage.write_bytes("dir1/x.bin", b"x")
    storage.write_bytes("dir1/sub/y.bin", b"y")
    storage.move("dir1", "dir2")
    assert storage.read_bytes("dir2/x.bin") == b"x"
    assert storage.read_bytes("dir2/sub/y.bin") == b"y"
    assert not storage.exists("dir1/x.bin")


def test_makedirs_and_put_file(storage: Storage, tmp_path: Path) -> None:
    storage.makedirs("deep/er/dir")
    if storage.is_local:
        assert os.path.isdir(storage.local_path("deep/er/dir"))
    src = tmp_path / "local.bin"
    src.write_bytes(os.urandom(1000))
    storage.put_file(str(src), "deep/er/dir/copy.bin")
    assert storage.read_bytes("deep/er/dir/copy.bin") == src.read_bytes()


def test_pickle_keeps_settings(storage: Storage) -> None:
    storage.retries = 2
    storage.retry_timeout_s = 3.5
    storage.max_backoff_s = 0.7
    again = pickle.loads(pickle.dumps(storage))
    assert again.uri == storage.uri and again.retries == 2 and again.backoff_s == storage.backoff_s
    assert again.retry_timeout_s == 3.5 and again.max_backoff_s == 0.7
    storage.write_bytes("p.bin", b"z")
    assert again.read_bytes("p.bin") == b"z"


def test_temp_names() -> None:
    a, b = temp_name("checkpoint.json"), temp_name("checkpoint.json")
    assert a != b
    assert a.startswith(".checkpoint.json" + TEMP_MARKER)
    assert is_temp_name(a)
    assert not is_temp_name("checkpoint.json")
    assert not is_temp_name(".hidden")
    assert not is_temp_name("x" + TEMP_MARKER + "y")  # not hidden: not ours


# -- durability (local) --------------------------------------------------------------------------
def test_local_writes_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage(str(tmp_path))
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    storage.write_bytes("d/data.bin", b"x")
    assert synced == [f"{tmp_path}/d/data.bin"]
    synced.clear()
    storage.write_bytes("d/fast.bin", b"x", durable=False)
    assert synced == []
    storage.write_atomic("d/marker.json", b"{}")
    # the temp file, then the directory holding the renamed file
    assert len(synced) == 2
    assert is_temp_name(os.path.basename(synced[0]))
    assert synced[1] == f"{tmp_path}/d"
    synced.clear()
    storage.fsync_dir("d")
    assert synced == [f"{tmp_path}/d"]


def test_fsync_dir_is_noop_remote(memory_uri: str) -> None:
    Storage(memory_uri).fsync_dir("whatever")  # no error, nothing to do


# -- errors and retries --------------------------------------------------------------------------
def test_local_error_is_storage_error_naming_the_path_without_retry(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path), backoff_s=10.0)  # a retry would make this test hang
    storage.write_bytes("file", b"x")
    with pytest.raises(StorageError) as excinfo:
        storage.write_bytes("file/child.bin", b"y")  # parent is a file
    assert f"{tmp_path}/file/child.bin" in str(excinfo.value)
    assert isinstance(excinfo.value, OSError)


def test_local_atomic_rename_failure_cleans_temp(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    (tmp_path / "d" / "target").mkdir(parents=True)
    (tmp_path / "d" / "target" / "inside").write_bytes(b"keep")
    with pytest.raises(StorageError, match="target"):
        storage.write_atomic("d/target", b"data")
    assert sorted(os.listdir(tmp_path / "d")) == ["target"]


def test_remote_transient_errors_are_retried(memory_uri: str) -> None:
    storage = Storage(memory_uri, retries=3, backoff_s=0.001)
    attempts: list[int] = []

    def flaky(f: object) -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError(errno.EIO, "connection reset")
        f.write(b"ok")  # type: ignore[attr-defined]
        return len(attempts)

    assert storage.write_stream("flaky.bin", flaky) == 3
    assert storage.read_bytes("flaky.bin") == b"ok"


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "reset"), RuntimeError("botocore said no")])
def test_remote_errors_after_retries_are_storage_errors_naming_the_path(memory_uri: str, exc: Exception) -> None:
    storage = Storage(memory_uri, retries=2, backoff_s=0.001)
    attempts: list[int] = []

    def broken(f: object) -> None:
        attempts.append(1)
        raise exc

    with pytest.raises(StorageError) as excinfo:
        storage.write_stream("dir/broken.bin", broken)
    assert len(attempts) == 3  # one try + 2 retries
    assert "dir/broken.bin" in str(excinfo.value)
    assert str(exc) in str(excinfo.value)
    assert excinfo.value.__cause__ is exc


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_remote_permanent_errors_are_not_retried(memory_uri: str, code: int) -> None:
    storage = Storage(memory_uri, retries=5, backoff_s=10.0)
    attempts: list[int] = []

    def full(f: object) -> None:
        attempts.append(1)
        raise OSError(code, os.strerror(code))

    with pytest.raises(StorageError, match="full.bin") as excinfo:
        storage.write_stream("full.bin", full)
    assert attempts == [1]
    assert excinfo.value.errno == code


def test_file_sizes_lists_direct_files_once(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    storage.write_bytes("d/a.bin", b"abc")
    storage.write_bytes("d/b.bin", b"")
    storage.write_bytes("d/sub/c.bin", b"12345")
    assert storage.file_sizes("d") == {"a.bin": 3, "b.bin": 0}
    assert storage.file_sizes("d/sub") == {"c.bin": 5}
    assert storage.file_sizes("missing") == {}


# -- O_DIRECT writes of big durable local files ------------------------------------------------
@pytest.mark.parametrize("sizes", [[0], [1], [4095, 1, 4097], [3 << 20, 5, (1 << 20) + 3], [9 << 20]])
def test_direct_file_writer_writes_exact_bytes(tmp_path: Path, sizes: list[int]) -> None:
    from ray_ckpt.core.storage.local import DirectFileWriter

    rng = np.random.default_rng(sum(sizes))
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    path = tmp_path / "f.bin"
    with DirectFileWriter(str(path), chunk=1 << 20, in_flight=2) as f:  # small chunks: many in flight
        for piece in pieces:
            assert f.write(memoryview(piece)) == len(piece)
        f.flush()
        with pytest.raises(ValueError, match="write after flush"):
            f.write(b"x")
    assert path.read_bytes() == b"".join(p.tobytes() for p in pieces)


def test_direct_file_writer_fills_an_aligned_region_of_an_existing_file(tmp_path: Path) -> None:
    """What a rank does in a shared file: the rest of the file (header, other ranks' bytes) stays."""
    from ray_ckpt.core.storage.local import DirectFileWriter

    path = tmp_path / "shared.bin"
    path.write_bytes(b"h" * 100 + b"\0" * (3 << 20))
    region = np.random.default_rng(1).integers(0, 256, 2 << 20, dtype=np.uint8)
    with DirectFileWriter(str(path), chunk=1 << 20, in_flight=2, offset=1 << 20) as f:
        f.write(memoryview(region))
    data = path.read_bytes()
    assert len(data) == 100 + (3 << 20)  # never truncated
    assert data[:100] == b"h" * 100 and data[1 << 20 : 3 << 20] == region.tobytes()
    with pytest.raises(ValueError, match="must start at a multiple"):
        DirectFileWriter(str(path), offset=100)
    with pytest.raises(ValueError, match="must be a multiple"), DirectFileWriter(str(path), offset=0) as f:
        f.write(b"odd")


def test_big_durable_local_writes_are_right_with_or_without_o_direct(tmp_path: Path) -> None:
    """Big hinted writes go through O_DIRECT where the filesystem has it; tmpfs refuses it at open
    (EINVAL) and the same write goes through the page cache."""
    from ray_ckpt.core.storage.local import DirectFileWriter

    data = np.arange(1 << 20, dtype=np.uint32).tobytes() + b"tail"
    roots = [tmp_path / "disk"]
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        roots.append(shm / f"ray-ckpt-test-{os.getpid()}-{tmp_path.name}")
    try:
        for root in roots:
            storage = Storage(str(root))
            storage.write_stream("big.bin", lambda f: f.write(data), size_hint=len(data) * 64)
            storage.write_stream("small.bin", lambda f: f.write(data))
            assert (root / "big.bin").read_bytes() == data and (root / "small.bin").read_bytes() == data
        if len(roots) > 1:
            try:
                DirectFileWriter(str(roots[1] / "probe.bin")).close()
            except OSError as exc:  # what the fallback catches
                assert exc.errno == errno.EINVAL
    finally:
        for root in roots[1:]:
            Storage(str(root)).rm("", recursive=True, missing_ok=True)


# -- one deadline per operation ------------------------------------------------------------------
def test_remote_retries_stop_at_the_deadline(memory_uri: str) -> None:
    """With no retry count, attempts go on (backoff capped at max_backoff_s) until the next one
    would start more than retry_timeout_s after the first failure."""
    storage = Storage(memory_uri, backoff_s=0.02, max_backoff_s=0.08, retry_timeout_s=0.5)
    assert storage.retries is None
    starts: list[float] = []

    def broken(f: object) -> None:
        starts.append(time.monotonic())
        raise OSError(errno.EIO, "connection reset")

    with pytest.raises(StorageError, match=r"broken\.bin.*connection reset \(gave up after \d+ attempts") as excinfo:
        storage.write_stream("broken.bin", broken)
    assert excinfo.value.errno == errno.EIO
    assert len(starts) >= 5, starts  # 0.02 + 0.04 + 0.08 + 0.08 ... fit in 0.5 s
    assert starts[-1] - starts[0] <= 0.5  # no attempt starts after the deadline
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert max(gaps) < 0.08 + 0.25, gaps  # the backoff is capped (plus scheduling slack)


def test_zero_retry_timeout_means_one_attempt_and_nested_storage_errors_are_final(memory_uri: str) -> None:
    storage = Storage(memory_uri, {"retry_timeout_s": 0}, backoff_s=10.0)  # a retry would hang the test
    attempts: list[int] = []

    def broken(f: object) -> None:
        attempts.append(1)
        raise OSError(errno.EIO, "reset")

    with pytest.raises(StorageError, match="write failed"):
        storage.write_stream("a.bin", broken)
    assert attempts == [1]
    patient = Storage(memory_uri, retry_timeout_s=60.0, backoff_s=10.0)

    def gave_up_already(f: object) -> None:
        attempts.append(2)
        raise StorageError(errno.EIO, "an inner operation already used its deadline")

    with pytest.raises(StorageError, match="already used its deadline"):
        patient.write_stream("b.bin", gave_up_already)
    assert attempts == [1, 2]


def test_a_timeout_that_outlasted_the_window_is_not_waited_out_again(memory_uri: str) -> None:
    """An endpoint that accepts and never answers makes each attempt a (client-retried) timeout:
    one that took longer than the whole window is final. Slow failures of other kinds (a long
    upload cut by a reset) and quick timeouts are retried."""
    storage = Storage(memory_uri, backoff_s=0.01, retry_timeout_s=0.2)
    calls: list[str] = []

    def slow_timeout(f: object) -> None:
        calls.append("slow timeout")
        time.sleep(0.3)
        raise TimeoutError("Read timeout on endpoint URL")

    with pytest.raises(StorageError, match="Read timeout"):
        storage.write_stream("t.bin", slow_timeout)
    assert calls == ["slow timeout"]

    def flaky(kind: str) -> object:
        def writer(f: object) -> None:
            calls.append(kind)
            if calls.count(kind) == 1:
                if kind == "slow reset":
                    time.sleep(0.3)
                    raise OSError(errno.ECONNRESET, "connection reset")
                raise TimeoutError("quick timeout")
            f.write(b"ok")  # type: ignore[attr-defined]

        return writer

    for kind in ("slow reset", "quick timeout"):
        storage.write_stream(f"{kind}.bin", flaky(kind))  # type: ignore[arg-type]
        assert calls.count(kind) == 2 and storage.read_bytes(f"{kind}.bin") == b"ok"


def test_retry_timeout_option(memory_uri: str) -> None:
    assert Storage(memory_uri).retry_timeout_s == RETRY_TIMEOUT_S
    assert Storage(memory_uri, {"retry_timeout_s": 2.5}).retry_timeout_s == 2.5
    assert Storage(memory_uri, {"retry_timeout_s": 2.5}, retry_timeout_s=1).retry_timeout_s == 1.0
    for bad in (-1, float("nan"), float("inf"), "5", True, None):
        with pytest.raises(ConfigError, match="storage_options.retry_timeout_s"):
            Storage(memory_uri, {"retry_timeout_s": bad})


def test_s3_defaults_merge_under_the_users_options() -> None:
    """Our S3 defaults only fill what the user left out: their config_kwargs keys win, their
    botocore ``retries`` is used whole, client_kwargs are theirs; nothing is shared or mutated."""
    user = {
        "key": "k",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"read_timeout": 60, "retries": {"total_max_attempts": 9}},
        "retry_timeout_s": 3,
    }
    merged = fs_options_for("s3://bucket/run", user)
    assert merged == {
        "use_listings_cache": False,
        "key": "k",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {
            "retries": {"total_max_attempts": 9},
            "connect_timeout": S3_CONFIG_DEFAULTS["connect_timeout"],
            "read_timeout": 60,
        },
    }
    merged["config_kwargs"]["retries"]["mode"] = "legacy"  # what botocore does to the dict it gets
    merged["client_kwargs"]["region_name"] = "elsewhere"
    assert user["config_kwargs"]["retries"] == {"total_max_attempts": 9}
    assert user["client_kwargs"]["region_name"] == "us-east-1"
    defaults = fs_options_for("s3a://bucket", {})
    assert defaults == {"use_listings_cache": False, "config_kwargs": S3_CONFIG_DEFAULTS}
    assert defaults["config_kwargs"]["retries"] is not S3_CONFIG_DEFAULTS["retries"]
    assert fs_options_for("memory://x", {"retry_timeout_s": 1}) == {"use_listings_cache": False}
    assert fs_options_for("file:///tmp/x", {"use_listings_cache": True}) == {"use_listings_cache": True}


# -- reads open only regular files ---------------------------------------------------------------
def _reads(storage: Storage, name: str) -> dict[str, object]:
    def open_and_read() -> bytes:
        with storage.open_read(name) as f:
            return f.read()

    return {
        "open_read": open_and_read,
        "read_bytes": lambda: storage.read_bytes(name),
        "size": lambda: storage.size(name),
    }


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["path", "file"])
def test_fifo_device_socket_and_directory_are_refused_not_opened(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "root"
    storage = Storage(str(root) if kind == "path" else f"file://{root}")
    storage.write_bytes("ok.bin", b"fine")
    os.mkfifo(root / "pipe")  # opening it for reading would block until a writer came
    (root / "zero").symlink_to("/dev/zero")  # reading it would never end
    (root / "dir").mkdir()
    specials = {"pipe": "a FIFO", "zero": "a character device", "dir": "a directory"}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if len(str(root / "sock")) < 100:  # AF_UNIX path limit
        sock.bind(str(root / "sock"))
        specials["sock"] = "a socket"
    try:
        for name, what in specials.items():
            for call, read in _reads(storage, name).items():
                with pytest.raises(StorageError) as excinfo:
                    read()  # type: ignore[operator]
                message = str(excinfo.value)
                assert f"{root}/{name}" in message and f"not a regular file ({what})" in message, (call, message)
                assert excinfo.value.errno == (errno.EISDIR if name == "dir" else errno.EINVAL)
        assert storage.read_bytes("ok.bin") == b"fine" and storage.size("ok.bin") == 4
        with storage.open_read("ok.bin") as f:
            f.seek(2)
            assert f.read() == b"ne"
        with pytest.raises(FileNotFoundError):
            storage.size("missing.bin")
    finally:
        sock.close()


@pytest.mark.timeout(20)
def test_a_fifo_swapped_in_after_the_stat_cannot_block_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check is stat, then a non-blocking open re-checked with fstat: a FIFO that replaced
    the file after the stat is refused instead of blocking the open."""
    root = tmp_path / "root"
    storage = Storage(str(root))
    storage.write_bytes("regular.bin", b"x")
    os.mkfifo(root / "pipe")
    real_stat = os.stat
    looks_regular = real_stat(root / "regular.bin")

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        return looks_regular if str(path) == str(root / "pipe") else real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(StorageError, match=r"not a regular file \(a FIFO\)"):
        storage.read_bytes("pipe")
    with pytest.raises(StorageError, match=r"not a regular file \(a FIFO\)"):
        with storage.open_read("pipe"):
            pass


# -- deletes never follow a symlinked directory --------------------------------------------------
def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _outside(tmp_path: Path, name: str = "outside") -> Path:
    target = tmp_path / name
    (target / "sub").mkdir(parents=True)
    (target / "a.bin").write_bytes(b"a")
    (target / "sub" / "b.bin").write_bytes(b"b")
    return target


def test_rm_removes_a_symlink_as_a_link_and_never_deletes_through_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    storage = Storage(str(root))
    storage.makedirs("checkpoints")
    target = _outside(tmp_path)
    before = _tree(target)
    link = root / "checkpoints" / "step_000000001"
    for recursive in (True, False):
        link.symlink_to(target, target_is_directory=True)
        storage.rm("checkpoints/step_000000001", recursive=recursive)
        assert not os.path.lexists(link) and _tree(target) == before

    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(StorageError, match="is a symlink") as excinfo:
        storage.rm("checkpoints/step_000000001/a.bin")
    assert excinfo.value.errno == errno.ELOOP and f"{root}/checkpoints/step_000000001" in str(excinfo.value)
    with caplog.at_level(logging.WARNING, logger="ray_ckpt.core.storage"):
        storage.rm("checkpoints/step_000000001/a.bin", missing_ok=True)
        storage.rm("checkpoints/step_000000001/sub", recursive=True, missing_ok=True)
    assert "never deletes through one" in caplog.text
    assert _tree(target) == before and link.is_symlink()

    # A real directory holding a symlink: the tree goes, the link inside goes as a link.
    (root / "tree" / "inner").mkdir(parents=True)
    (root / "tree" / "inner" / "link").symlink_to(target, target_is_directory=True)
    (root / "tree" / "f.bin").write_bytes(b"f")
    storage.rm("tree", recursive=True)
    assert not (root / "tree").exists() and _tree(target) == before
    (root / "file-link").symlink_to(target / "a.bin")
    storage.rm("file-link")
    assert not os.path.lexists(root / "file-link") and _tree(target) == before
    with pytest.raises(StorageError, match="recursive=False"):
        storage.rm("checkpoints")
    with pytest.raises(FileNotFoundError):
        storage.rm("checkpoints/nothing")


def _state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(step)), "b": torch.arange(3, dtype=torch.float32) + step}


def _link_step(store: CheckpointStore, step: int, target: Path) -> Path:
    """Move step's committed directory to ``target`` and leave a symlink to it in its place."""
    directory = Path(store.storage.local_path(f"checkpoints/step_{step:09d}"))  # type: ignore[arg-type]
    shutil.move(str(directory), str(target))
    directory.symlink_to(target, target_is_directory=True)
    return directory


def test_store_delete_retention_and_gc_remove_a_symlinked_step_as_a_link(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "runs"), run_name="run", keep_last_n=2)
    for step in (1, 2, 3):
        store.save(step, _state(step))
    archive = tmp_path / "archive"
    archive.mkdir()

    # delete(): the link goes, the target keeps every file (its checkpoint.json included).
    link = _link_step(store, 2, archive / "step2")
    before = _tree(archive / "step2")
    assert "checkpoint.json" in before and [i.step for i in store.reload().list()] == [2, 3]
    store.delete(2)
    assert not os.path.lexists(link) and _tree(archive / "step2") == before
    assert [i.step for i in store.reload().list()] == [3]

    # retention: the doomed step is a link; its target's files are all still there afterwards.
    store.save(4, _state(4))
    link = _link_step(store, 3, archive / "step3")
    before = _tree(archive / "step3")
    store.save(5, _state(5))  # keep_last_n=2: step 3 goes
    assert [i.step for i in store.reload().list()] == [4, 5]
    assert not os.path.lexists(link)
    after = _tree(archive / "step3")
    assert {k: after.get(k) for k in before} == before

    # gc(): a leftover step dir (no marker) that is a link goes as a link; a committed linked
    # step keeps its target's temp files (gc does not reach through the link).
    leftover = _outside(tmp_path, "leftover")
    before_leftover = _tree(leftover)
    checkpoints = Path(store.storage.local_path("checkpoints"))  # type: ignore[arg-type]
    (checkpoints / "step_000000009").symlink_to(leftover, target_is_directory=True)
    link = _link_step(store, 4, archive / "step4")
    (archive / "step4" / f".checkpoint.json{TEMP_MARKER}abc").write_bytes(b"partial")
    before = _tree(archive / "step4")
    store.gc()
    assert not os.path.lexists(checkpoints / "step_000000009") and _tree(leftover) == before_leftover
    assert link.is_symlink() and _tree(archive / "step4") == before
    assert [i.step for i in store.reload().list()] == [4, 5]
    store.verify(4)
