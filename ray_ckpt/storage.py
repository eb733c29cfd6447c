"""One storage abstraction over fsspec for local paths, file://, s3:// and memory://.

It knows bytes and paths only (no tensors, no Ray). Local writes are fsync'd (files and their
directory); small files can be replaced atomically (temp name + rename locally, a single PUT on
object stores). Remote operations are retried with bounded exponential backoff, then fail with a
StorageError naming the path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ray_ckpt.errors import StorageError
from ray_ckpt.uri import normalize_storage_uri

logger = logging.getLogger(__name__)

T = TypeVar("T")

TEMP_MARKER = ".tmp-"
# Errors that no retry can fix: fail at once.
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}


S3_PART_SIZE = 32 << 20  # a multipart part (S3's minimum is 5 MiB); doubles every 1000 parts
S3_PARTS_IN_FLIGHT = 4  # parts uploading at once: at most (1 + this) parts of memory per open file


DIRECT_IO_MIN = 64 << 20  # local files expected at least this big are written with O_DIRECT
DIRECT_IO_CHUNK = 4 << 20  # one pwrite(); DIRECT_IO_IN_FLIGHT staging buffers this big per open file
DIRECT_IO_IN_FLIGHT = 4  # writes running at once (the disk serves several streams faster than one)


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

    def __init__(self, path: str, chunk: int = DIRECT_IO_CHUNK, in_flight: int = DIRECT_IO_IN_FLIGHT) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o644)
        self.align = max(4096, os.fstatvfs(self.fd).f_bsize)
        self.chunk = max(self.align, chunk - chunk % self.align)
        self._buffers = [_aligned_buffer(self.chunk, self.align) for _ in range(in_flight)]
        self._spare = list(self._buffers)
        self._pool = concurrent.futures.ThreadPoolExecutor(in_flight, thread_name_prefix="ray-ckpt-odirect")
        self._pending: list[tuple[concurrent.futures.Future, np.ndarray]] = []
        self._current = self._spare.pop()
        self._fill = 0
        self._offset = 0  # file offset of the current buffer
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


def _aligned_buffer(nbytes: int, align: int) -> np.ndarray:
    """A uint8 array of ``nbytes`` whose address is a multiple of ``align`` (O_DIRECT needs it)."""
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes]


def _is_s3(fs: Any) -> bool:
    """Whether ``fs`` is s3fs's S3FileSystem (checked by module, so s3fs is never imported here)."""
    return type(fs).__module__.startswith("s3fs")


class ConcurrentS3Writer:
    """A write-only S3 object uploaded as a multipart upload whose parts go up concurrently.

    s3fs's own file object uploads one part at a time (the writer waits for each) and copies the
    bytes through a BytesIO. This one copies each byte once into a part buffer, keeps up to
    ``S3_PARTS_IN_FLIGHT`` part uploads running on s3fs's event loop, and sends an object smaller
    than one part as a single PUT. The object appears only when :meth:`close` completes the
    upload; an exception inside ``with`` (or :meth:`abort`) cancels it, leaving nothing behind.
    """

    def __init__(self, fs: Any, path: str, part_size: int = S3_PART_SIZE, in_flight: int = S3_PARTS_IN_FLIGHT) -> None:
        self.fs = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_size = part_size
        self.in_flight = in_flight
        self.closed = False
        self._part = bytearray(part_size)
        self._fill = 0
        self._upload_id: str | None = None
        self._pending: list[tuple[int, concurrent.futures.Future]] = []
        self._etags: dict[int, str] = {}
        self._next_part = 1

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        """Buffer ``data`` (copied), starting a part upload each time a part fills."""
        if self.closed:
            raise ValueError(f"write to a closed file: {self.path}")
        view = memoryview(data).cast("B")
        pos = 0
        while pos < view.nbytes:
            take = min(view.nbytes - pos, len(self._part) - self._fill)
            self._part[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == len(self._part):
                self._send_part()
        return view.nbytes

    def flush(self) -> None:
        """Nothing to do: parts go up as they fill, the rest on close."""

    def _submit(self, method: str, **kwargs: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self.fs._call_s3(method, **kwargs), self.fs.loop)

    def _send_part(self) -> None:
        if self._upload_id is None:
            mpu = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self._upload_id = mpu["UploadId"]
        while len(self._pending) >= self.in_flight:
            self._reap(*self._pending.pop(0))
        body = self._part
        if self._fill < len(body):
            del body[self._fill :]  # the last part: shrink in place, no copy
        number = self._next_part
        future = self._submit(
            "upload_part", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=body
        )
        self._pending.append((number, future))
        self._next_part += 1
        size = min(self.part_size << ((self._next_part - 1) // 1000), 5 << 30)  # S3 allows 10000 parts
        self._part = bytearray(size)
        self._fill = 0

    def _reap(self, number: int, future: concurrent.futures.Future) -> None:
        self._etags[number] = future.result()["ETag"]

    def close(self) -> None:
        """Upload what is left and complete the upload (a single PUT for a small object)."""
        if self.closed:
            return
        try:
            if self._upload_id is None:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self._part[: self._fill]))
            else:
                if self._fill:
                    self._send_part()
                while self._pending:
                    self._reap(*self._pending.pop(0))
                parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
                self.fs.call_s3(
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self._part = bytearray()
        self.fs.invalidate_cache(self.path)

    def abort(self) -> None:
        """Cancel the upload: wait out the parts in flight, then abort it (best effort)."""
        self.closed = True
        self._part = bytearray()
        for _, future in self._pending:
            try:
                future.result()
            except Exception:  # the upload is being abandoned anyway
                pass
        self._pending = []
        if self._upload_id is not None:
            try:
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
            except Exception as exc:  # the bucket's lifecycle rules clean up what this misses
                logger.warning("could not abort the multipart upload of %s: %s", self.path, exc)

    def __enter__(self) -> ConcurrentS3Writer:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def temp_name(name: str) -> str:
    """A unique hidden temporary name beside ``name`` (recognised and collected by gc)."""
    return f".{name}{TEMP_MARKER}{uuid.uuid4().hex[:12]}"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of our temporary names."""
    return name.startswith(".") and TEMP_MARKER in name



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


class Storage:
    """A root URI plus the fsspec filesystem that serves it.

    Paths given to methods are relative to the root ("a/b.json") and use "/" separators.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retries: int = 4,
        backoff_s: float = 0.2,
    ) -> None:
        self.uri = normalize_storage_uri(uri)
        self.storage_options = dict(storage_options or {})
        # No listings cache: other processes commit, overwrite and delete checkpoints, and a cached
        # listing (s3fs fills it from every ls/glob, with sizes and ETags) would hide new markers
        # and report stale sizes, or fail reads of replaced objects. The user may still opt in.
        fs_options = {"use_listings_cache": False, **self.storage_options}
        self.fs, root = fsspec.core.url_to_fs(self.uri, **fs_options)
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.retries = retries
        self.backoff_s = backoff_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (Storage, (self.uri, self.storage_options), {"retries": self.retries, "backoff_s": self.backoff_s})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.retries = state["retries"]
        self.backoff_s = state["backoff_s"]

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # -- addressing -------------------------------------------------------------------------
    def full_path(self, path: str = "") -> str:
        """The filesystem path of a root-relative path."""
        path = path.strip("/")
        return posixpath.join(self.root, path) if path else self.root

    def url(self, path: str = "") -> str:
        """A URI for a root-relative path, with the scheme (e.g. ``s3://bucket/run/x``)."""
        return self.fs.unstrip_protocol(self.full_path(path))

    def local_path(self, path: str = "") -> str | None:
        """The OS path when the storage is a local disk, else None."""
        return self.full_path(path) if self.is_local else None

    # -- retries ------------------------------------------------------------------------------
    def _call(self, what: str, path: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with bounded retries and backoff; wrap the final failure in StorageError."""
        attempt = 0
        while True:
            try:
                return fn()
            except FileNotFoundError:
                raise
            except OSError as exc:
                permanent = self.is_local or exc.errno in _PERMANENT_ERRNOS
                if permanent or attempt >= self.retries:
                    raise StorageError(
                        exc.errno or errno.EIO, f"{what} failed for {self.url(path)}: {exc}"
                    ) from exc
            except Exception as exc:  # botocore/aiohttp errors that are not OSError
                if self.is_local or attempt >= self.retries:
                    raise StorageError(errno.EIO, f"{what} failed for {self.url(path)}: {exc}") from exc
            delay = self.backoff_s * (2**attempt)
            attempt += 1
            logger.warning("storage: %s of %s failed (attempt %d), retrying in %.2fs", what, path, attempt, delay)
            time.sleep(delay)
            self._invalidate(path)

    def _invalidate(self, path: str) -> None:
        try:
            self.fs.invalidate_cache(self.full_path(path))
        except Exception:  # pragma: no cover - cache invalidation is best effort
            pass

    # -- writing ------------------------------------------------------------------------------
    def write_stream(
        self, path: str, writer: Callable[[IO[bytes]], T], *, durable: bool = True, size_hint: int = 0
    ) -> T:
        """Open ``path`` for writing, call ``writer(file)``, close, and fsync when local.

        A durable local file of ``size_hint`` >= DIRECT_IO_MIN bytes is written with O_DIRECT
        (:class:`DirectFileWriter`) where the filesystem supports it. On an object store a failed
        upload is retried by calling ``writer`` again on a fresh file, so ``writer`` must be
        repeatable (it writes from buffers still in memory).
        """
        full = self.full_path(path)
        direct = durable and self.is_local and size_hint >= DIRECT_IO_MIN

        def attempt() -> T:
            if self.is_local:
                os.makedirs(posixpath.dirname(full), exist_ok=True)
            with self._open_for_write(full, direct=direct) as f:
                result = writer(f)
                if durable and self.is_local:
                    f.flush()
                    os.fsync(f.fileno())
            return result

        return self._call("write", path, attempt)

    def _open_for_write(self, full: str, *, direct: bool = False) -> Any:
        """A file to write ``full``: concurrent multipart uploads on S3, O_DIRECT for big durable
        local files (buffered where the filesystem refuses it), fsspec's file elsewhere."""
        if _is_s3(self.fs):
            return ConcurrentS3Writer(self.fs, full)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                return DirectFileWriter(full)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                logger.debug("storage: no O_DIRECT for %s (%s); writing through the page cache", full, exc)
        return self.fs.open(full, "wb")

    def write_bytes(self, path: str, data: bytes, *, durable: bool = True) -> None:
        """Write a whole file (fsync'd when local)."""
        self.write_stream(path, lambda f: f.write(data), durable=durable)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace ``path`` atomically: readers see the old file or the new one, never a part.

        Locally: temp file, fsync, rename, fsync the directory. Object stores: one PUT.
        """
        if not self.is_local:
            self.write_bytes(path, data)
            return
        directory, name = posixpath.split(path)
        tmp = posixpath.join(directory, temp_name(name))
        try:
            self.write_bytes(tmp, data)
        except BaseException:
            self._discard(tmp)  # e.g. ENOSPC mid-write: a partial temp file must not stay behind
            raise
        try:
            os.replace(self.full_path(tmp), self.full_path(path))
        except OSError as exc:
            self.rm(tmp, missing_ok=True)
            raise StorageError(exc.errno or errno.EIO, f"rename failed for {self.url(path)}: {exc}") from exc
        self.fsync_dir(directory)

    def _discard(self, path: str) -> None:
        """Best-effort removal of a temp file after a failed write (never masks that failure)."""
        try:
            self.rm(path, missing_ok=True)
        except OSError as exc:
            logger.warning("storage: could not remove %s after a failed write: %s", path, exc)

    def fsync_dir(self, path: str = "") -> None:
        """fsync a directory so that renames and new entries in it are durable (local only)."""
        if not self.is_local:
            return
        fd = os.open(self.full_path(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, path: str) -> None:
        """Create a directory and its parents (a no-op on object stores)."""
        if self.is_local:
            os.makedirs(self.full_path(path), exist_ok=True)
        else:
            self._call("mkdir", path, lambda: self.fs.makedirs(self.full_path(path), exist_ok=True))

    def put_file(self, local_path: str, path: str) -> None:
        """Upload (or copy) a local file to ``path`` (fsync'd when the target is local)."""

        def copy(f: IO[bytes]) -> None:
            with open(local_path, "rb") as src:
                while chunk := src.read(64 << 20):
                    f.write(chunk)

        self.write_stream(path, copy)

    # -- reading ------------------------------------------------------------------------------
    @contextmanager
    def open_read(self, path: str, **kwargs: Any) -> Iterator[IO[bytes]]:
        """Open a file for reading (random access supported)."""
        f = self._call("open", path, lambda: self.fs.open(self.full_path(path), "rb", **kwargs))
        try:
            yield f if self.is_local else _RetryingReader(self, path, f)  # type: ignore[misc]
        finally:
            f.close()

    def read_bytes(self, path: str) -> bytes:
        """Read a whole file."""
        return self._call("read", path, lambda: self.fs.cat_file(self.full_path(path)))

    def exists(self, path: str) -> bool:
        """Whether a file or directory exists."""
        return self._call("exists", path, lambda: self.fs.exists(self.full_path(path)))

    def size(self, path: str) -> int:
        """Size of a file in bytes."""
        return int(self._call("stat", path, lambda: self.fs.size(self.full_path(path))))

    def file_sizes(self, path: str = "") -> dict[str, int]:
        """Name -> size of the files directly under ``path``, from one listing; {} when it does not exist."""
        full = self.full_path(path)
        try:
            entries = self._call("list", path, lambda: self.fs.ls(full, detail=True, refresh=True))
        except FileNotFoundError:
            return {}
        return {
            posixpath.basename(str(e["name"]).rstrip("/")): int(e.get("size") or 0)
            for e in entries
            if e.get("type") == "file"
        }

    def list_names(self, path: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``path``; [] when it does not exist."""
        full = self.full_path(path)
        try:
            entries = self._call("list", path, lambda: self.fs.ls(full, detail=False, refresh=True))
        except FileNotFoundError:
            return []
        names = [posixpath.basename(str(e).rstrip("/")) for e in entries]
        return sorted(n for n in names if n and posixpath.join(full, n) != full)

    def glob(self, pattern: str) -> list[str]:
        """Root-relative paths matching a glob pattern."""
        self._invalidate(posixpath.dirname(pattern.split("*", 1)[0]))
        found = self._call("glob", pattern, lambda: self.fs.glob(self.full_path(pattern)))
        prefix = self.root.rstrip("/") + "/"
        return sorted(str(p)[len(prefix) :] if str(p).startswith(prefix) else str(p) for p in found)

    # -- deleting -----------------------------------------------------------------------------
    def rm(self, path: str, *, recursive: bool = False, missing_ok: bool = False) -> None:
        """Delete a file, or a directory tree with ``recursive=True``."""
        full = self.full_path(path)
        try:
            self._call("delete", path, lambda: self.fs.rm(full, recursive=recursive))
        except FileNotFoundError:
            if not missing_ok:
                raise
        self._invalidate(path)

    def move(self, src: str, dst: str) -> None:
        """Rename a file or directory (atomic on local disks, copy + delete on object stores)."""
        parent = posixpath.dirname(dst.strip("/"))
        if self.is_local and parent:
            os.makedirs(self.full_path(parent), exist_ok=True)  # object stores need no parents
        self._call(
            "move", src, lambda: self.fs.mv(self.full_path(src), self.full_path(dst), recursive=True)
        )
        self._invalidate(src)
        self._invalidate(dst)

    def exchange(self, a: str, b: str) -> bool:
        """Swap two local paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

        What lets a committed step directory be replaced with no moment at which neither version
        is in place. False where the platform or filesystem cannot (the caller falls back), and
        always on object stores, which have no directories to swap.
        """
        if not self.is_local:
            return False
        full_a, full_b = self.full_path(a), self.full_path(b)
        swapped = self._call("exchange", a, lambda: _rename_exchange(full_a, full_b))
        if swapped:
            self._invalidate(a)
            self._invalidate(b)
        return swapped

    def copy(self, src: str, dst: str) -> None:
        """Copy one file (server-side on object stores: no bytes pass through this process)."""
        self._call("copy", src, lambda: self.fs.copy(self.full_path(src), self.full_path(dst)))
        self._invalidate(dst)


class _RetryingReader:
    """A remote file opened for reading whose reads get the storage's retries and StorageError.

    Each read of an object-store file is a ranged GET that can be throttled or fail like any
    other request; a failed read leaves the position unchanged, so it is simply retried there.
    """

    def __init__(self, storage: Storage, path: str, f: IO[bytes]) -> None:
        self._storage = storage
        self._path = path
        self._f = f

    def _at(self, position: int, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            self._f.seek(position)
            return fn()

        return self._storage._call("read", self._path, attempt)

    def read(self, size: int = -1) -> bytes:
        return self._at(self._f.tell(), lambda: self._f.read(size))

    def readinto(self, buffer: Any) -> int:
        return self._at(self._f.tell(), lambda: self._f.readinto(buffer))  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _RetryingReader:
        return self

    def __exit__(self, *_: Any) -> None:
        self._f.close()

