"""Storage: one class over local paths, file:// and memory:// (S3 is covered by the integration tests)."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from ray_ckpt import StorageError
from ray_ckpt.storage import TEMP_MARKER, Storage, is_temp_name, temp_name


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
    again = pickle.loads(pickle.dumps(storage))
    assert again.uri == storage.uri and again.retries == 2 and again.backoff_s == storage.backoff_s
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
    from ray_ckpt.storage import DirectFileWriter

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


def test_big_durable_local_writes_are_right_with_or_without_o_direct(tmp_path: Path) -> None:
    """Big hinted writes go through O_DIRECT where the filesystem has it; tmpfs refuses it at open
    (EINVAL) and the same write goes through the page cache."""
    from ray_ckpt.storage import DirectFileWriter

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
