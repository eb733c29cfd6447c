"""The object-store backend: s3:// (through s3fs), memory:// and any other fsspec filesystem that
is not a local disk.

Failures are retried by :class:`~ray_ckpt.core.storage.storage.Storage`'s retry helper unless
permanent (missing credentials, no permission, ...). On S3 that helper is the only
whole-operation retry layer: botocore retries each request a little (``S3_CONFIG_DEFAULTS``) and
s3fs's own loop is off (``S3FS_RETRIES``). Big objects go up as concurrent multipart uploads
(:class:`ConcurrentS3Writer`), every read of an open file is retried where it failed
(:class:`_RetryingReader`). There are no directories: nothing to fsync, create or swap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar

from ray_ckpt.core.storage.base import check_limit, is_permanent

if TYPE_CHECKING:
    from ray_ckpt.core.storage.storage import Storage

logger = logging.getLogger(__name__)

T = TypeVar("T")

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

S3_PART_SIZE = 32 << 20  # a multipart part (S3's minimum is 5 MiB); doubles every 1000 parts
S3_PARTS_IN_FLIGHT = 4  # parts uploading at once: at most (1 + this) parts of memory per open file
# A request that sends a body (put_object, upload_part) waits at most this long, plus its size at
# S3_MIN_BODY_RATE, for everything botocore does (its attempts included). Nothing else bounds it:
# botocore sends "Expect: 100-continue" and aiohttp waits for the 100 with no timeout, and a body
# written to a peer that stopped reading blocks until TCP gives up (never, on a frozen server).
S3_BODY_TIMEOUT_S = 60.0
S3_MIN_BODY_RATE = 1 << 20  # bytes/s


class ObjectStoreBackend:
    """An object store (or another non-local fsspec filesystem); see the module docstring."""

    is_local = False

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        if _is_s3(fs):
            # The fs is cached per options and shared by every Storage opened with them: all set this.
            fs.retries = S3FS_RETRIES

    def fails_fast(self, error: BaseException) -> bool:
        return is_permanent(error)

    def local_path(self, full: str) -> str | None:
        return None

    def write_once(self, full: str, writer: Callable[[IO[bytes]], T], *, durable: bool, size_hint: int) -> T:
        """Upload ``full`` (concurrent multipart on S3); the object appears whole when it closes."""
        with self._open_for_write(full) as f:
            result = writer(f)
        return result

    def _open_for_write(self, full: str) -> Any:
        if _is_s3(self.fs):
            return ConcurrentS3Writer(self.fs, full)
        return self.fs.open(full, "wb")

    def write_atomic(self, storage: Storage, path: str, data: bytes) -> None:
        """One PUT: an object appears whole or not at all."""
        storage.write_bytes(path, data)

    def fsync_dir(self, full: str) -> None:
        """Nothing to do: an object store has no directories."""

    def makedirs(self, storage: Storage, path: str) -> None:
        storage._call("mkdir", path, lambda: self.fs.makedirs(storage.full_path(path), exist_ok=True))

    def ensure_parent(self, full_dir: str) -> None:
        """Nothing to do: object stores need no parents."""

    def open_read(self, storage: Storage, path: str, **kwargs: Any) -> tuple[IO[bytes], IO[bytes]]:
        f = storage._call("open", path, lambda: self.fs.open(storage.full_path(path), "rb", **kwargs))
        return f, _RetryingReader(storage, path, f)  # type: ignore[return-value]

    def read_once(self, storage: Storage, path: str, limit: int | None) -> bytes:
        """One GET (a ranged one of ``limit + 1`` bytes when bounded)."""
        # One GET: s3fs's concurrent cat_file first asks the size (HEAD, then a listing for a
        # missing key, or neither when its listing cache happens to answer), which made the
        # requests of a read depend on what was listed before.
        kwargs: dict[str, Any] = {"max_concurrency": 1} if _is_s3(self.fs) else {}
        if limit is None:
            return self.fs.cat_file(storage.full_path(path), **kwargs)
        try:
            data = self.fs.cat_file(storage.full_path(path), start=0, end=limit + 1, **kwargs)
        except OSError as exc:  # a ranged GET of an empty object: S3 answers 416 InvalidRange
            if not _is_invalid_range(exc):
                raise
            data = b""
        check_limit(storage.url(path), len(data), limit)
        return data

    def size_once(self, storage: Storage, path: str) -> int:
        return int(self.fs.size(storage.full_path(path)))

    def rm_once(self, storage: Storage, path: str, *, recursive: bool, missing_ok: bool) -> None:
        self.fs.rm(storage.full_path(path), recursive=recursive)

    def symlinks(self, storage: Storage, path: str) -> list[str]:
        """None: an object store has no links."""
        return []

    def exchange(self, storage: Storage, a: str, b: str) -> bool:
        """Never: an object store has no directories to swap."""
        return False


def _is_s3(fs: Any) -> bool:
    """Whether ``fs`` is s3fs's S3FileSystem (checked by module, so s3fs is never imported here)."""
    return type(fs).__module__.startswith("s3fs")


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
