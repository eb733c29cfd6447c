"""One storage abstraction over fsspec for local paths, file://, s3:// and memory://.

It knows bytes and paths only (no tensors, no Ray). :class:`Storage` is what callers use; the
backend that serves its URI (:func:`backend_for`, the one place that picks it) does what differs
between a local directory (:mod:`~ray_ckpt.core.storage.local`: fsync'd writes, atomic renames)
and an object store (:mod:`~ray_ckpt.core.storage.objectstore`: single PUTs, multipart uploads).

Failures: every operation goes through one retry helper (:meth:`Storage._call`, also the point
where requests are counted). Remote operations that fail are retried with exponential backoff
for at most ``retry_timeout_s`` after their first failure, then fail with a StorageError naming
the path; local failures and permanent errors (ENOSPC, EACCES, ...) fail at once. On S3 that
helper is the only whole-operation retry layer: botocore retries each request a little (standard
mode, 3 attempts, bounded connect/read timeouts) and s3fs's own retry loop is off, so a dead
endpoint gives a StorageError within about ``retry_timeout_s`` instead of the product of three
retry loops.

Local safety: reads open only regular files (a FIFO, device or socket is refused, never opened
for reading), and deletions never go through a symlinked directory below the root (a symlink is
removed as a link, its target is left alone).
"""

from __future__ import annotations

import errno
import logging
import posixpath
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from ray_ckpt.core.errors import StorageError
from ray_ckpt.core.storage.base import (
    MAX_WHOLE_READ,
    RETRY_BACKOFF_S,
    RETRY_MAX_BACKOFF_S,
    RETRY_TIMEOUT_OPTION,
    RETRY_TIMEOUT_S,
    Backend,
    is_timeout,
    merge_options,
    parse_retry_timeout,
)
from ray_ckpt.core.storage.local import LocalBackend
from ray_ckpt.core.storage.objectstore import S3_CONFIG_DEFAULTS, ObjectStoreBackend
from ray_ckpt.core.uri import normalize_storage_uri

logger = logging.getLogger(__name__)

T = TypeVar("T")


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


def backend_for(fs: Any) -> Backend:
    """The backend that serves a filesystem: a local directory, or an object store (anything else)."""
    return LocalBackend(fs) if isinstance(fs, LocalFileSystem) else ObjectStoreBackend(fs)


class Storage:
    """A root URI plus the fsspec filesystem that serves it, and the backend for that filesystem.

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
        self.backend: Backend = backend_for(self.fs)
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        if retry_timeout_s is None:
            retry_timeout_s = self.storage_options.get(RETRY_TIMEOUT_OPTION, RETRY_TIMEOUT_S)
        self.retry_timeout_s = parse_retry_timeout(retry_timeout_s)

    @property
    def is_local(self) -> bool:
        """Whether the storage is a local disk (for callers that must know: memory maps, O_DIRECT, links)."""
        return self.backend.is_local

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
        return self.backend.local_path(self.full_path(path))

    # -- retries ------------------------------------------------------------------------------
    def _call(self, what: str, path: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying a remote failure until the deadline; the final failure is a StorageError.

        The one retry helper of the project's storage: every operation (and every read of a
        remote file) goes through it, so it is also where requests are counted. FileNotFoundError
        passes through untouched (callers rely on it); a StorageError raised inside ``fn`` is
        final. Failures the backend calls final (all local ones, permanent errnos) fail at once.
        Otherwise attempts go on with exponential backoff while the next one would start within
        ``retry_timeout_s`` of the first failure (and within ``retries`` retries, if set).
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
            permanent = self.backend.fails_fast(error)
            out_of_retries = self.retries is not None and attempt > self.retries
            # A timeout that by itself outlasted the window (the client already waited out its
            # own attempts: the endpoint accepts and does not answer) is not waited out again.
            out_of_time = now + delay - first_failure > self.retry_timeout_s or (
                is_timeout(error) and now - started > self.retry_timeout_s
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
        (:class:`~ray_ckpt.core.storage.local.DirectFileWriter`) where the filesystem supports it.
        On an object store a failed upload is retried by calling ``writer`` again on a fresh file,
        so ``writer`` must be repeatable (it writes from buffers still in memory).
        """
        full = self.full_path(path)
        return self._call(
            "write", path, lambda: self.backend.write_once(full, writer, durable=durable, size_hint=size_hint)
        )

    def write_bytes(self, path: str, data: bytes, *, durable: bool = True) -> None:
        """Write a whole file (fsync'd when local)."""
        self.write_stream(path, lambda f: f.write(data), durable=durable)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace ``path`` atomically: readers see the old file or the new one, never a part.

        Locally: temp file, fsync, rename, fsync the directory. Object stores: one PUT.
        """
        self.backend.write_atomic(self, path, data)

    def fsync_dir(self, path: str = "") -> None:
        """fsync a directory so that renames and new entries in it are durable (local only)."""
        self.backend.fsync_dir(self.full_path(path))

    def makedirs(self, path: str) -> None:
        """Create a directory and its parents (a no-op on object stores)."""
        self.backend.makedirs(self, path)

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
        StorageError naming the path instead of blocking or reading a device. On an object store
        every read is retried where it failed.
        """
        f, reader = self.backend.open_read(self, path, **kwargs)
        try:
            yield reader
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
        return self._call("read", path, lambda: self.backend.read_once(self, path, limit))

    def symlinks(self, path: str) -> list[str]:
        """The symlinks at or under ``path`` (root-relative; never followed); [] on object stores.

        A directory about to be put in a step's place must hold only its own files: a link
        would make the step's files somebody else's (or, swapped in, point at themselves).
        """
        return self.backend.symlinks(self, path)

    def exists(self, path: str) -> bool:
        """Whether a file or directory exists."""
        return self._call("exists", path, lambda: self.fs.exists(self.full_path(path)))

    def size(self, path: str) -> int:
        """Size of a file in bytes (locally: a regular file only; anything else is a StorageError)."""
        return self._call("stat", path, lambda: self.backend.size_once(self, path))

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
        try:
            self._call(
                "delete", path, lambda: self.backend.rm_once(self, path, recursive=recursive, missing_ok=missing_ok)
            )
        except FileNotFoundError:
            if not missing_ok:
                raise
        self._invalidate(path)

    def move(self, src: str, dst: str) -> None:
        """Rename a file or directory (atomic on local disks, copy + delete on object stores)."""
        parent = posixpath.dirname(dst.strip("/"))
        if parent:
            self.backend.ensure_parent(self.full_path(parent))
        self._call("move", src, lambda: self.fs.mv(self.full_path(src), self.full_path(dst), recursive=True))
        self._invalidate(src)
        self._invalidate(dst)

    def exchange(self, a: str, b: str) -> bool:
        """Swap two local paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

        What lets a committed step directory be replaced with no moment at which neither version
        is in place. False where the platform or filesystem cannot (the caller falls back), and
        always on object stores, which have no directories to swap.
        """
        swapped = self.backend.exchange(self, a, b)
        if swapped:
            self._invalidate(a)
            self._invalidate(b)
        return swapped

    def copy(self, src: str, dst: str) -> None:
        """Copy one file (server-side on object stores: no bytes pass through this process)."""
        self._call("copy", src, lambda: self.fs.copy(self.full_path(src), self.full_path(dst)))
        self._invalidate(dst)
