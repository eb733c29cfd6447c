"""What every storage backend shares: the :class:`Backend` protocol, temporary names, the retry
settings and the classification of failures the retry helper (:meth:`Storage._call
<ray_ckpt.core.storage.storage.Storage._call>`) acts on, and the bound on whole-file reads.

A backend is what differs between a local directory (:mod:`~ray_ckpt.core.storage.local`) and an
object store (:mod:`~ray_ckpt.core.storage.objectstore`); everything else, retries and request
counting included, is :class:`~ray_ckpt.core.storage.storage.Storage`'s, in one place.
"""

from __future__ import annotations

import errno
import uuid
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

from ray_ckpt.core.errors import ConfigError, StorageError
from ray_ckpt.core.safejson import MAX_JSON_BYTES

if TYPE_CHECKING:
    from ray_ckpt.core.storage.storage import Storage

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
# Option values that replace ours whole instead of being merged key by key: a user's botocore
# ``retries`` is used as given (merging {"total_max_attempts": 5} into ours would keep our mode).
_ATOMIC_OPTIONS = {"retries"}

# The most bytes a whole-file read takes (see Storage.read_bytes): the JSON reader's own limit.
MAX_WHOLE_READ = MAX_JSON_BYTES


class Backend(Protocol):
    """What a local directory and an object store do differently; :class:`Storage` does the rest.

    Methods named ``*_once`` are one attempt: :class:`Storage` runs them through its retry helper
    (one operation each, as the request counts see it). The others take the :class:`Storage` and
    retry through it where they talk to the storage. Paths are root-relative, as for Storage.
    """

    #: Whether the storage is a local disk (for the few callers that must know: memory maps, O_DIRECT).
    is_local: bool

    def fails_fast(self, error: BaseException) -> bool:
        """Whether a failure is final at once (no retry)."""
        ...

    def local_path(self, full: str) -> str | None:
        """The OS path of a full path on a local disk, else None."""
        ...

    def write_once(self, full: str, writer: Callable[[IO[bytes]], T], *, durable: bool, size_hint: int) -> T:
        """Write ``full`` with ``writer`` (one attempt); durable on a local disk means fsync'd."""
        ...

    def write_atomic(self, storage: Storage, path: str, data: bytes) -> None:
        """Replace ``path`` so that readers see the old file or the new one, never a part."""
        ...

    def fsync_dir(self, full: str) -> None:
        """Make the entries of a directory durable (nothing to do where there are no directories)."""
        ...

    def makedirs(self, storage: Storage, path: str) -> None:
        """Create a directory and its parents."""
        ...

    def ensure_parent(self, full_dir: str) -> None:
        """Create the directory a file or directory is about to be moved into, where that is needed."""
        ...

    def open_read(self, storage: Storage, path: str, **kwargs: Any) -> tuple[IO[bytes], IO[bytes]]:
        """Open a file for random-access reading: (the file to close, the file to read through)."""
        ...

    def read_once(self, storage: Storage, path: str, limit: int | None) -> bytes:
        """Read a whole file (one attempt), refusing one over ``limit`` bytes before reading it."""
        ...

    def size_once(self, storage: Storage, path: str) -> int:
        """The size of a file in bytes (one attempt)."""
        ...

    def rm_once(self, storage: Storage, path: str, *, recursive: bool, missing_ok: bool) -> None:
        """Delete a file or a tree (one attempt); FileNotFoundError when missing."""
        ...

    def symlinks(self, storage: Storage, path: str) -> list[str]:
        """The symlinks at or under ``path`` (never followed)."""
        ...

    def exchange(self, storage: Storage, a: str, b: str) -> bool:
        """Swap two paths in one atomic step; False where the backend cannot."""
        ...


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


def parse_retry_timeout(value: Any) -> float:
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


def is_permanent(error: BaseException) -> bool:
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


def is_timeout(error: BaseException) -> bool:
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


def check_limit(url: str, size: int, limit: int) -> None:
    """Refuse a file of ``size`` bytes read whole when that is over ``limit`` (StorageError, EFBIG, naming ``url``)."""
    if size > limit:
        raise StorageError(errno.EFBIG, f"read refused for {url}: over the {limit}-byte limit of a file read whole")
