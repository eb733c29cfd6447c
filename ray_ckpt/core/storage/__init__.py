"""One storage abstraction over fsspec for local paths, file://, s3:// and memory://.

It knows bytes and paths only (no tensors, no Ray). Local writes are fsync'd (files and their
directory); small files can be replaced atomically (temp name + rename locally, a single PUT on
object stores).

Failures: every operation goes through one retry helper (:meth:`Storage._call`). Remote
operations that fail are retried with exponential backoff for at most ``retry_timeout_s`` after
their first failure, then fail with a StorageError naming the path; local failures and permanent
errors (ENOSPC, EACCES, ...) fail at once. On S3 that helper is the only whole-operation retry
layer: botocore retries each request a little (standard mode, 3 attempts, bounded connect/read
timeouts) and s3fs's own retry loop is off, so a dead endpoint gives a StorageError within about
``retry_timeout_s`` instead of the product of three retry loops.

Local safety: reads open only regular files (a FIFO, device or socket is refused, never opened
for reading), and deletions never go through a symlinked directory below the root (a symlink is
removed as a link, its target is left alone).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import logging
import os
import posixpath
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from ray_ckpt.core.errors import ConfigError, StorageError
from ray_ckpt.core.safejson import MAX_JSON_BYTES
from ray_ckpt.core.uri import normalize_storage_uri

logger = logging.getLogger(__name__)

T = TypeVar("T")

TEMP_MARKER = ".tmp-"
# Errors that no retry can fix: fail at once.
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}

# -- deadlines and retries (see docs/RELIABILITY.md, "Storage deadlines and retries") ----------
# ray-ckpt's retry loop: how long a failing operation keeps retrying after its first failure, and
# its backoff (doubling from RETRY_BACKOFF_S, at most RETRY_MAX_BACKOFF_S between attempts).
RETRY_TIMEOUT_S = 15.0
RETRY_BACKOFF_S = 0.2
RETRY_MAX_BACKOFF_S = 4.0
# storage_options keys that ray-ckpt reads itself and never passes to fsspec.
RETRY_TIMEOUT_OPTION = "retry_timeout_s"
# botocore's per-request retries and timeouts for s3:// (s3fs ``config_kwargs``). Standard mode,
# 3 attempts: a throttled or reset request (one part of a big upload) is retried on its own
# instead of the whole file. A refused connection costs well under a second per request; an
# endpoint that accepts and never answers costs up to 3 x (connect + read timeout) per request.
S3_CONFIG_DEFAULTS: dict[str, Any] = {
    "retries": {"max_attempts": 2, "mode": "standard"},  # botocore's max_attempts counts retries: 3 attempts
    "connect_timeout": 5,
    "read_timeout": 15,
}
# s3fs's own retry loop (around every botocore call) is off: 1 attempt. Stacked on botocore's and
# ours it turned one dead endpoint into 25 requests per attempt of ours.
S3FS_RETRIES = 1
# Option values that replace ours whole instead of being merged key by key: a user's botocore
# ``retries`` is used as given (merging {"total_max_attempts": 5} into ours would keep our mode).
_ATOMIC_OPTIONS = {"retries"}


S3_PART_SIZE = 32 << 20  # a multipart part (S3's minimum is 5 MiB); doubles every 1000 parts
S3_PARTS_IN_FLIGHT = 4  # parts uploading at once: at most (1 + this) parts of memory per open file
# A request that sends a body (put_object, upload_part) waits at most this long, plus its size at
# S3_MIN_BODY_RATE, for everything botocore does (its attempts included). Nothing else bounds it:
# botocore sends "Expect: 100-continue" and aiohttp waits for the 100 with no timeout, and a body
# written to a peer that stopped reading blocks until TCP gives up (never, on a frozen server).
S3_BODY_TIMEOUT_S = 60.0
S3_MIN_BODY_RATE = 1 << 20  # bytes/s


# The most bytes a whole-file read takes (see Storage.read_bytes): the JSON reader's own limit.
MAX_WHOLE_READ = MAX_JSON_BYTES

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
    Every request that sends bytes is bounded in time (``S3_BODY_TIMEOUT_S``): an endpoint that
    accepts connections and never answers fails the write with a TimeoutError instead of hanging.
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
        """Start a request that sends ``Body`` on s3fs's loop, bounded (see ``S3_BODY_TIMEOUT_S``)."""
        timeout = S3_BODY_TIMEOUT_S + len(kwargs["Body"]) / S3_MIN_BODY_RATE
        return asyncio.run_coroutine_threadsafe(self._bounded(method, timeout, **kwargs), self.fs.loop)

    async def _bounded(self, method: str, timeout: float, **kwargs: Any) -> Any:
        try:
            return await asyncio.wait_for(self.fs._call_s3(method, **kwargs), timeout)
        except asyncio.TimeoutError as exc:
            raise TimeoutError(
                f"{method} of {len(kwargs['Body'])} bytes got no answer within {timeout:.0f}s (endpoint not responding)"
            ) from exc

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
                body = bytes(self._part[: self._fill])
                self._submit("put_object", Bucket=self.bucket, Key=self.key, Body=body).result()
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


def merge_options(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` with ``overrides`` on top, nested mappings merged key by key (new dicts).

    A user's ``{"config_kwargs": {"read_timeout": 60}}`` keeps our other config_kwargs, and their
    ``client_kwargs`` are untouched. Keys in ``_ATOMIC_OPTIONS`` (botocore's ``retries``) are
    replaced whole, since their fields interact.
    """
    merged = {key: _copy_dicts(value) for key, value in defaults.items()}
    for key, value in overrides.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, dict) and key not in _ATOMIC_OPTIONS:
            merged[key] = merge_options(base, value)
        else:
            merged[key] = _copy_dicts(value)
    return merged


def _copy_dicts(value: Any) -> Any:
    """``value`` with every nested dict copied (botocore edits the ``retries`` dict it is given in
    place: neither the user's options nor our defaults may be shared with it); other values as is."""
    return {k: _copy_dicts(v) for k, v in value.items()} if isinstance(value, dict) else value


def fs_options_for(uri: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The fsspec options ray-ckpt opens ``uri`` with: its defaults, overridden by the user's.

    No listings cache anywhere; on s3:// botocore's bounded retries and timeouts
    (``S3_CONFIG_DEFAULTS``). Keys ray-ckpt reads itself (``retry_timeout_s``) are left out.
    """
    # No listings cache: other processes commit, overwrite and delete checkpoints, and a cached
    # listing (s3fs fills it from every ls/glob, with sizes and ETags) would hide new markers
    # and report stale sizes, or fail reads of replaced objects. The user may still opt in.
    defaults: dict[str, Any] = {"use_listings_cache": False}
    if get_protocol(uri) in ("s3", "s3a"):
        defaults["config_kwargs"] = S3_CONFIG_DEFAULTS
    user = {k: v for k, v in storage_options.items() if k != RETRY_TIMEOUT_OPTION}
    return merge_options(defaults, user)


def _retry_timeout(value: Any) -> float:
    """``retry_timeout_s`` validated: a finite number of seconds >= 0 (ConfigError naming it)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= float(value) < float("inf"):
        raise ConfigError(
            f"storage_options.{RETRY_TIMEOUT_OPTION}: must be a finite number of seconds >= 0, got {value!r}"
        )
    return float(value)


# Errors no retry can mend, by class name along the cause chain (botocore is not imported here):
# missing or partial credentials, no region, a malformed request. They fail at once.
_PERMANENT_ERROR_NAMES = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "NoRegionError",
        "ParamValidationError",
        "UnknownSignatureVersionError",
        "InvalidConfigError",
    }
)


def _is_permanent(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is one no retry can mend: a permanent errno (no
    space, no permission, read-only, gone) or a client error such as missing credentials."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _PERMANENT_ERRNOS:
            return True
        if any(cls.__name__ in _PERMANENT_ERROR_NAMES for cls in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_timeout(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a timeout: TimeoutError (socket, asyncio, fsspec),
    botocore's Read/ConnectTimeoutError, aiohttp's ServerTimeoutError (by name: none imported here)."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, TimeoutError) or any("Timeout" in cls.__name__ for cls in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_invalid_range(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is an object store's 416 InvalidRange (a ranged read of
    an empty object)."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        text = str(seen)
        if "InvalidRange" in text or "not satisfiable" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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


class Storage:
    """A root URI plus the fsspec filesystem that serves it.

    Paths given to methods are relative to the root ("a/b.json") and use "/" separators.

    Retries (remote only): a failing operation is retried with backoff doubling from
    ``backoff_s`` up to ``max_backoff_s``, for at most ``retry_timeout_s`` seconds after its first
    failure (default ``RETRY_TIMEOUT_S``; also settable as ``storage_options["retry_timeout_s"]``,
    which ray-ckpt reads and never passes to fsspec) and, when ``retries`` is set, at most that
    many retries. No attempt starts after the deadline.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retries: int | None = None,
        backoff_s: float = RETRY_BACKOFF_S,
        max_backoff_s: float = RETRY_MAX_BACKOFF_S,
        retry_timeout_s: float | None = None,
    ) -> None:
        self.uri = normalize_storage_uri(uri)
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.uri, **fs_options_for(self.uri, self.storage_options))
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if _is_s3(self.fs):
            # The fs is cached per options and shared by every Storage opened with them: all set this.
            self.fs.retries = S3FS_RETRIES
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        if retry_timeout_s is None:
            retry_timeout_s = self.storage_options.get(RETRY_TIMEOUT_OPTION, RETRY_TIMEOUT_S)
        self.retry_timeout_s = _retry_timeout(retry_timeout_s)

    def _settings(self) -> dict[str, Any]:
        return {
            "retries": self.retries,
            "backoff_s": self.backoff_s,
            "max_backoff_s": self.max_backoff_s,
            "retry_timeout_s": self.retry_timeout_s,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        return (Storage, (self.uri, self.storage_options), self._settings())

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name in self._settings():
                setattr(self, name, value)

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
        """Run ``fn``, retrying a remote failure until the deadline; the final failure is a StorageError.

        The one retry helper of this module: every operation (and every read of a remote file)
        goes through it. FileNotFoundError passes through untouched (callers rely on it); a
        StorageError raised inside ``fn`` is final. Local failures and permanent errnos fail at
        once. Otherwise attempts go on with exponential backoff while the next one would start
        within ``retry_timeout_s`` of the first failure (and within ``retries`` retries, if set).
        """
        attempt = 0
        first_failure: float | None = None
        while True:
            started = time.monotonic()
            try:
                return fn()
            except (FileNotFoundError, StorageError):
                raise
            except Exception as exc:  # OSError, and botocore/aiohttp errors that are not
                error = exc
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
            attempt += 1
            delay = min(self.backoff_s * (2 ** (attempt - 1)), self.max_backoff_s)
            code = error.errno if isinstance(error, OSError) and error.errno else None
            permanent = self.is_local or _is_permanent(error)
            out_of_retries = self.retries is not None and attempt > self.retries
            # A timeout that by itself outlasted the window (the client already waited out its
            # own attempts: the endpoint accepts and does not answer) is not waited out again.
            out_of_time = now + delay - first_failure > self.retry_timeout_s or (
                _is_timeout(error) and now - started > self.retry_timeout_s
            )
            if permanent or out_of_retries or out_of_time:
                tries = ""
                if not permanent and attempt > 1:
                    tries = f" (gave up after {attempt} attempts, {now - first_failure:.1f}s)"
                raise StorageError(code or errno.EIO, f"{what} failed for {self.url(path)}: {error}{tries}") from error
            logger.warning(
                "storage: %s of %s failed (attempt %d): %s; retrying in %.2fs", what, path, attempt, error, delay
            )
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
        """Open a file for reading (random access supported).

        Locally only a regular file is opened: a FIFO, device, socket or directory raises a
        StorageError naming the path (see :meth:`_open_regular`) instead of blocking or reading
        a device.
        """
        if self.is_local:
            f = self._call("open", path, lambda: self._open_regular(path, "open"))
        else:
            f = self._call("open", path, lambda: self.fs.open(self.full_path(path), "rb", **kwargs))
        try:
            yield f if self.is_local else _RetryingReader(self, path, f)  # type: ignore[misc]
        finally:
            f.close()

    def read_bytes(self, path: str, *, limit: int | None = MAX_WHOLE_READ) -> bytes:
        """Read a whole file (locally: a regular file only, as in :meth:`open_read`).

        At most ``limit`` bytes are ever read: a file over it is a StorageError (EFBIG) naming
        it, found before its bytes are read (locally the open file's size; on an object store
        one ranged GET of ``limit + 1`` bytes). Every small file ray-ckpt reads whole (markers,
        sidecars, leases, log entries, the index snapshot) is bounded so; callers that read a
        file of known, checked size (a ``pt`` shard) pass ``limit=None``.
        """
        if self.is_local:

            def read_local() -> bytes:
                with self._open_regular(path, "read") as f:
                    if limit is not None:
                        self._check_limit(path, os.fstat(f.fileno()).st_size, limit)
                    return f.read()

            return self._call("read", path, read_local)
        # One GET: s3fs's concurrent cat_file first asks the size (HEAD, then a listing for a
        # missing key, or neither when its listing cache happens to answer), which made the
        # requests of a read depend on what was listed before.
        kwargs: dict[str, Any] = {"max_concurrency": 1} if _is_s3(self.fs) else {}

        def read_remote() -> bytes:
            if limit is None:
                return self.fs.cat_file(self.full_path(path), **kwargs)
            try:
                data = self.fs.cat_file(self.full_path(path), start=0, end=limit + 1, **kwargs)
            except OSError as exc:  # a ranged GET of an empty object: S3 answers 416 InvalidRange
                if not _is_invalid_range(exc):
                    raise
                data = b""
            self._check_limit(path, len(data), limit)
            return data

        return self._call("read", path, read_remote)

    def _check_limit(self, path: str, size: int, limit: int) -> None:
        if size > limit:
            raise StorageError(
                errno.EFBIG, f"read refused for {self.url(path)}: over the {limit}-byte limit of a file read whole"
            )

    def _require_regular(self, what: str, path: str, st: os.stat_result) -> None:
        """Raise a StorageError naming ``path`` unless ``st`` is a regular file's."""
        if not stat.S_ISREG(st.st_mode):
            code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
            raise StorageError(
                code, f"{what} refused for {self.url(path)}: not a regular file ({_file_kind(st.st_mode)})"
            )

    def _open_regular(self, path: str, what: str) -> IO[bytes]:
        """A local regular file opened for reading; anything else is refused before it is opened.

        stat first, so a device is never opened (opening some has side effects); the open itself
        is non-blocking and re-checked with fstat, so a FIFO swapped in meanwhile cannot block it.
        """
        full = self.full_path(path)
        self._require_regular(what, path, os.stat(full))
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._require_regular(what, path, os.fstat(fd))
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def symlinks(self, path: str) -> list[str]:
        """The symlinks at or under ``path`` (root-relative; never followed); [] on object stores.

        A directory about to be put in a step's place must hold only its own files: a link
        would make the step's files somebody else's (or, swapped in, point at themselves).
        """
        if not self.is_local:
            return []

        def walk() -> list[str]:
            full = self.full_path(path)
            if os.path.islink(full):
                return [path]
            found = []
            for top, dirs, files in os.walk(full):  # os.walk never descends into a linked directory
                rel = posixpath.join(path, os.path.relpath(top, full)) if top != full else path
                found += [posixpath.join(rel, n) for n in dirs + files if os.path.islink(os.path.join(top, n))]
            return found

        return self._call("stat", path, walk)

    def exists(self, path: str) -> bool:
        """Whether a file or directory exists."""
        return self._call("exists", path, lambda: self.fs.exists(self.full_path(path)))

    def size(self, path: str) -> int:
        """Size of a file in bytes (locally: a regular file only; anything else is a StorageError)."""
        if self.is_local:

            def local_size() -> int:
                st = os.stat(self.full_path(path))
                self._require_regular("stat", path, st)
                return st.st_size

            return self._call("stat", path, local_size)
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

    def find(self, path: str) -> list[str]:
        """Every file under ``path``, as paths relative to it (one recursive listing); [] when missing."""
        full = self.full_path(path).rstrip("/")
        try:
            found = self._call("list", path, lambda: self.fs.find(full, withdirs=False))
        except FileNotFoundError:
            return []
        return sorted(str(p)[len(full) + 1 :] for p in found if str(p).startswith(full + "/"))

    def glob(self, pattern: str) -> list[str]:
        """Root-relative paths matching a glob pattern."""
        self._invalidate(posixpath.dirname(pattern.split("*", 1)[0]))
        found = self._call("glob", pattern, lambda: self.fs.glob(self.full_path(pattern)))
        prefix = self.root.rstrip("/") + "/"
        return sorted(str(p)[len(prefix) :] if str(p).startswith(prefix) else str(p) for p in found)

    # -- deleting -----------------------------------------------------------------------------
    def rm(self, path: str, *, recursive: bool = False, missing_ok: bool = False) -> None:
        """Delete a file, or a directory tree with ``recursive=True``.

        On a local disk nothing outside the tree is ever deleted through a symlink: a symlink
        (to a directory or a file) is removed as a link, a real directory's tree is removed
        without following the links inside it, and a path that goes through a symlinked
        directory below the root (``link/file``) is not deleted at all: with ``missing_ok`` it
        is skipped with a warning (like a missing file), otherwise it raises a StorageError
        (ELOOP) naming the link.
        """
        full = self.full_path(path)
        try:
            if self.is_local:
                self._call("delete", path, lambda: self._rm_local(path, recursive=recursive, missing_ok=missing_ok))
            else:
                self._call("delete", path, lambda: self.fs.rm(full, recursive=recursive))
        except FileNotFoundError:
            if not missing_ok:
                raise
        self._invalidate(path)

    def _symlinked_parent(self, path: str) -> str | None:
        """The first directory of ``path`` below the root that is a symlink (root-relative), if any."""
        parts = [p for p in path.strip("/").split("/") if p]
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if os.path.islink(self.full_path(parent)):
                return parent
        return None

    def _rm_local(self, path: str, *, recursive: bool, missing_ok: bool) -> None:
        """:meth:`rm` on a local disk, never following a symlinked directory (see there)."""
        link = self._symlinked_parent(path)
        if link is not None:
            message = (
                f"delete refused for {self.url(path)}: {self.url(link)} is a symlink and ray-ckpt never "
                "deletes through one (the link itself may be removed)"
            )
            if missing_ok:
                logger.warning("storage: %s; left in place", message)
                return
            raise StorageError(errno.ELOOP, message)
        full = self.full_path(path)
        st = os.lstat(full)  # FileNotFoundError when missing
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                raise StorageError(errno.EISDIR, f"delete failed for {self.url(path)}: a directory (recursive=False)")
            shutil.rmtree(full)  # unlinks symlinks inside, never follows them; refuses if full became a link
        else:
            os.unlink(full)  # a file, or a symlink removed as a link (its target untouched)

    def move(self, src: str, dst: str) -> None:
        """Rename a file or directory (atomic on local disks, copy + delete on object stores)."""
        parent = posixpath.dirname(dst.strip("/"))
        if self.is_local and parent:
            os.makedirs(self.full_path(parent), exist_ok=True)  # object stores need no parents
        self._call("move", src, lambda: self.fs.mv(self.full_path(src), self.full_path(dst), recursive=True))
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
    Each read is one operation for :meth:`Storage._call`: its own ``retry_timeout_s`` deadline.
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
