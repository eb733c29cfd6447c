"""The local-directory backend: fsync'd writes (O_DIRECT for big files), atomic renames and
directory swaps, regular files only on reads, deletions that never follow a symlink.

Local failures are final at once (a full or read-only disk does not mend within seconds).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import logging
import os
import posixpath
import shutil
import stat
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np

from ray_ckpt.core.errors import StorageError
from ray_ckpt.core.storage.base import check_limit, temp_name

if TYPE_CHECKING:
    from ray_ckpt.core.storage.storage import Storage

logger = logging.getLogger(__name__)

T = TypeVar("T")

DIRECT_IO_MIN = 64 << 20  # local files expected at least this big are written with O_DIRECT
DIRECT_IO_CHUNK = 4 << 20  # one pwrite(); DIRECT_IO_IN_FLIGHT staging buffers this big per open file
DIRECT_IO_IN_FLIGHT = 4  # writes running at once (the disk serves several streams faster than one)


class LocalBackend:
    """A local directory (fsspec's LocalFileSystem); see the module docstring."""

    is_local = True

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def fails_fast(self, error: BaseException) -> bool:
        return True

    def local_path(self, full: str) -> str | None:
        return full

    def write_once(self, full: str, writer: Callable[[IO[bytes]], T], *, durable: bool, size_hint: int) -> T:
        """Write ``full`` (its directory created); a durable file is fsync'd, written with O_DIRECT
        (:class:`DirectFileWriter`) when ``size_hint`` >= DIRECT_IO_MIN and the filesystem allows."""
        os.makedirs(posixpath.dirname(full), exist_ok=True)
        with self._open_for_write(full, direct=durable and size_hint >= DIRECT_IO_MIN) as f:
            result = writer(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        return result

    def _open_for_write(self, full: str, *, direct: bool) -> Any:
        """O_DIRECT for big durable files (buffered where the filesystem refuses it), else fsspec's file."""
        if direct and hasattr(os, "O_DIRECT"):
            try:
                return DirectFileWriter(full)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                logger.debug("storage: no O_DIRECT for %s (%s); writing through the page cache", full, exc)
        return self.fs.open(full, "wb")

    def write_atomic(self, storage: Storage, path: str, data: bytes) -> None:
        """Temp file, fsync, rename, fsync the directory."""
        directory, name = posixpath.split(path)
        tmp = posixpath.join(directory, temp_name(name))
        try:
            storage.write_bytes(tmp, data)
        except BaseException:
            _discard(storage, tmp)  # e.g. ENOSPC mid-write: a partial temp file must not stay behind
            raise
        try:
            os.replace(storage.full_path(tmp), storage.full_path(path))
        except OSError as exc:
            storage.rm(tmp, missing_ok=True)
            raise StorageError(exc.errno or errno.EIO, f"rename failed for {storage.url(path)}: {exc}") from exc
        storage.fsync_dir(directory)

    def fsync_dir(self, full: str) -> None:
        fd = os.open(full, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, storage: Storage, path: str) -> None:
        os.makedirs(storage.full_path(path), exist_ok=True)

    def ensure_parent(self, full_dir: str) -> None:
        os.makedirs(full_dir, exist_ok=True)

    def open_read(self, storage: Storage, path: str, **kwargs: Any) -> tuple[IO[bytes], IO[bytes]]:
        """A regular file only: a FIFO, device, socket or directory is a StorageError naming it."""
        f = storage._call("open", path, lambda: _open_regular(storage, path, "open"))
        return f, f

    def read_once(self, storage: Storage, path: str, limit: int | None) -> bytes:
        with _open_regular(storage, path, "read") as f:
            if limit is not None:
                check_limit(storage.url(path), os.fstat(f.fileno()).st_size, limit)
            return f.read()

    def size_once(self, storage: Storage, path: str) -> int:
        st = os.stat(storage.full_path(path))
        _require_regular(storage, "stat", path, st)
        return st.st_size

    def rm_once(self, storage: Storage, path: str, *, recursive: bool, missing_ok: bool) -> None:
        """Delete, never through a symlinked directory below the root (see :meth:`Storage.rm`)."""
        link = _symlinked_parent(storage, path)
        if link is not None:
            message = (
                f"delete refused for {storage.url(path)}: {storage.url(link)} is a symlink and ray-ckpt never "
                "deletes through one (the link itself may be removed)"
            )
            if missing_ok:
                logger.warning("storage: %s; left in place", message)
                return
            raise StorageError(errno.ELOOP, message)
        full = storage.full_path(path)
        st = os.lstat(full)  # FileNotFoundError when missing
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                raise StorageError(
                    errno.EISDIR, f"delete failed for {storage.url(path)}: a directory (recursive=False)"
                )
            shutil.rmtree(full)  # unlinks symlinks inside, never follows them; refuses if full became a link
        else:
            os.unlink(full)  # a file, or a symlink removed as a link (its target untouched)

    def symlinks(self, storage: Storage, path: str) -> list[str]:
        def walk() -> list[str]:
            full = storage.full_path(path)
            if os.path.islink(full):
                return [path]
            found = []
            for top, dirs, files in os.walk(full):  # os.walk never descends into a linked directory
                rel = posixpath.join(path, os.path.relpath(top, full)) if top != full else path
                found += [posixpath.join(rel, n) for n in dirs + files if os.path.islink(os.path.join(top, n))]
            return found

        return storage._call("stat", path, walk)

    def exchange(self, storage: Storage, a: str, b: str) -> bool:
        full_a, full_b = storage.full_path(a), storage.full_path(b)
        return storage._call("exchange", a, lambda: _rename_exchange(full_a, full_b))


def _discard(storage: Storage, path: str) -> None:
    """Best-effort removal of a temp file after a failed write (never masks that failure)."""
    try:
        storage.rm(path, missing_ok=True)
    except OSError as exc:
        logger.warning("storage: could not remove %s after a failed write: %s", path, exc)


def _require_regular(storage: Storage, what: str, path: str, st: os.stat_result) -> None:
    """Raise a StorageError naming ``path`` unless ``st`` is a regular file's."""
    if not stat.S_ISREG(st.st_mode):
        code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
        raise StorageError(
            code, f"{what} refused for {storage.url(path)}: not a regular file ({_file_kind(st.st_mode)})"
        )


def _open_regular(storage: Storage, path: str, what: str) -> IO[bytes]:
    """A local regular file opened for reading; anything else is refused before it is opened.

    stat first, so a device is never opened (opening some has side effects); the open itself
    is non-blocking and re-checked with fstat, so a FIFO swapped in meanwhile cannot block it.
    """
    full = storage.full_path(path)
    _require_regular(storage, what, path, os.stat(full))
    fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _require_regular(storage, what, path, os.fstat(fd))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _symlinked_parent(storage: Storage, path: str) -> str | None:
    """The first directory of ``path`` below the root that is a symlink (root-relative), if any."""
    parts = [p for p in path.strip("/").split("/") if p]
    for depth in range(1, len(parts)):
        parent = "/".join(parts[:depth])
        if os.path.islink(storage.full_path(parent)):
            return parent
    return None


class DirectFileWriter:
    """A write-only local file written with O_DIRECT from aligned staging buffers, several writes at once.

    A durable save of a big file through the page cache copies every byte into freshly allocated
    cache pages, then flushes them at fsync in one stream. Here each byte is copied once into a
    reused, page-aligned staging buffer and ``DIRECT_IO_IN_FLIGHT`` chunk writes go to the disk
    concurrently while the next chunk is filled, so fsync has only the metadata left. The file is
    not left in the page cache. :meth:`flush` writes the tail (padded to the alignment, then
    truncated to the exact size) and must come last; raises OSError (EINVAL) at open where the
    filesystem has no O_DIRECT (tmpfs): callers fall back to a buffered file.
    """

    def __init__(
        self,
        path: str,
        chunk: int = DIRECT_IO_CHUNK,
        in_flight: int = DIRECT_IO_IN_FLIGHT,
        *,
        offset: int | None = None,
    ) -> None:
        self.path = path
        # offset: write the region from there of an existing file (its length a multiple of the alignment)
        create = os.O_CREAT | os.O_TRUNC if offset is None else 0
        self.fd = os.open(path, os.O_WRONLY | create | os.O_DIRECT | os.O_CLOEXEC, 0o644)
        self._region = offset is not None
        self.align = direct_io_alignment(self.fd)
        if offset is not None and offset % self.align:
            os.close(self.fd)
            raise ValueError(f"{path}: a direct-I/O region must start at a multiple of {self.align}, not {offset}")
        self.chunk = max(self.align, chunk - chunk % self.align)
        self._buffers = [_aligned_buffer(self.chunk, self.align) for _ in range(in_flight)]
        self._spare = list(self._buffers)
        self._pool = concurrent.futures.ThreadPoolExecutor(in_flight, thread_name_prefix="ray-ckpt-odirect")
        self._pending: list[tuple[concurrent.futures.Future, np.ndarray]] = []
        self._current = self._spare.pop()
        self._fill = 0
        self._offset = offset or 0  # file offset of the current buffer
        self._finished = False
        self.size = 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data: Any) -> int:
        if self._finished:
            raise ValueError(f"{self.path}: write after flush (a direct-I/O file is flushed once, at the end)")
        src = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        done = 0
        while done < len(src):
            take = min(len(src) - done, self.chunk - self._fill)
            # numpy copies without the GIL: hashing and the writes in flight go on meanwhile
            np.copyto(self._current[self._fill : self._fill + take], src[done : done + take])
            self._fill += take
            done += take
            if self._fill == self.chunk:
                self._submit()
        self.size += len(src)
        return len(src)

    def _submit(self) -> None:
        length = -(-self._fill // self.align) * self.align  # the tail is padded; flush truncates it
        buf, offset = self._current, self._offset
        self._pending.append((self._pool.submit(self._pwrite, buf[:length], offset), buf))
        self._offset += self._fill
        self._fill = 0
        if not self._spare:
            future, spare = self._pending.pop(0)
            future.result()
            self._spare.append(spare)
        self._current = self._spare.pop()

    def _pwrite(self, view: np.ndarray, offset: int) -> None:
        mem = memoryview(view)
        written = 0
        while written < len(mem):
            written += os.pwrite(self.fd, mem[written:], offset + written)

    def flush(self) -> None:
        """Write what is buffered and wait for every write; the file then has its exact size."""
        if self._finished:
            return
        self._finished = True
        if self._fill:
            self._submit()
        for future, _ in self._pending:
            future.result()  # the first failure (ENOSPC, EIO) is raised here
        self._pending.clear()
        if self._region:
            if self.size % self.align:
                raise ValueError(f"{self.path}: a direct-I/O region must be a multiple of {self.align} bytes long")
        else:
            os.ftruncate(self.fd, self.size)

    def close(self, *, complete: bool = True) -> None:
        """Flush (unless ``complete`` is False: after a failure the file is discarded) and close."""
        try:
            if self.fd >= 0 and complete:
                self.flush()
        finally:
            self._pool.shutdown(wait=True)  # no write may still run once the descriptor is closed
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> DirectFileWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(complete=exc_type is None)


def direct_io_alignment(fd: int) -> int:
    """The offset, length and address alignment O_DIRECT asks of an open file."""
    return max(4096, os.fstatvfs(fd).f_bsize)


def _aligned_buffer(nbytes: int, align: int) -> np.ndarray:
    """A uint8 array of ``nbytes`` whose address is a multiple of ``align`` (O_DIRECT needs it)."""
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes]


def _file_kind(mode: int) -> str:
    """What a non-regular file is, for error messages."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _rename_exchange(a: str, b: str) -> bool:
    """``renameat2(a, b, RENAME_EXCHANGE)``; False where the C library or the filesystem lacks it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), a)
