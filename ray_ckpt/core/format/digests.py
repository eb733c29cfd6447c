"""Checksums: what the commit marker records of each file, and the hashing that makes it.

A tensor file's digest is made by whoever writes its bytes, as they are written, never by
reading them back: the header's digest by the process that writes the header, and for every
chunk of every tensor (a whole tensor is one chunk) one xxh3_64 per block of ``block_size``
bytes of that chunk, in the chunk's own row-major order - the order in which the rank that held
it had it in memory. So a rank that writes its dim-1 shard as ``m`` strided runs into a shared
file hashes one contiguous buffer, and the marker grows with blocks and chunks, never with rows.
A reader of any box re-reads at most one block beyond its box at each edge of each chunk it
touches. Small files (indexes, JSON) and files copied as they are keep one whole-file digest.

Nothing here parses files or does I/O; ``ray_ckpt.core.format`` checks bytes against these records.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ray_ckpt.core.safejson import MAX_STEP, JsonObject

CHECKSUM_ALGORITHM = "xxh3_64"  # ~10+ GB/s on one core: far below disk time, unlike sha256
BLOCK_SIZE = 4 << 20  # bytes per block digest: 16 hex characters of marker per 4 MiB of state
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 4 << 10, 16 << 20  # what a marker may claim (a reader allocates a block)
DIGEST_CHARS = 16  # one xxh3_64 digest in hex
MAX_CHUNKS = 1 << 16  # chunks of one tensor a marker may record (a world of 65,536 ranks)
_HEX_RE = re.compile(r"[0-9a-f]*")


class Checksum:
    """Streaming xxh3_64 of a file's bytes; rendered as ``xxh3_64:<hex>``."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, data: Any) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return f"{CHECKSUM_ALGORITHM}:{self._h.hexdigest()}"


# Buffers at least this big are hashed on a helper thread while the caller writes/reads them:
# xxhash and file I/O both release the GIL, so on two cores the checksum costs no wall time.
PARALLEL_HASH_MIN = 1 << 20
_hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()


def hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The shared threads that checksum big buffers alongside the I/O on them (created on first use)."""
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="ray-ckpt-hash")
        return _hash_pool


def _forget_hash_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool on first use there."""
    global _hash_pool, _hash_pool_lock
    _hash_pool = None
    _hash_pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_hash_pool)


class HashingWriter:
    """A write-only file wrapper that checksums and counts what passes through it (a whole-file digest).

    A big buffer is hashed on a helper thread while it is written (same bytes, same order).
    """

    def __init__(self, f: Any) -> None:
        self.f = f
        self.checksum = Checksum()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= PARALLEL_HASH_MIN:
            hashed = hash_pool().submit(self.checksum.update, view)
            try:
                self.f.write(view)
            finally:
                hashed.result()  # the next update must follow this one
        else:
            self.checksum.update(view)
            self.f.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.f.flush()

    def digest(self) -> FileDigest:
        return FileDigest(self.size, self.checksum.hexdigest())


def digest_hex(data: Any) -> str:
    """The bare xxh3_64 hex digest of one buffer (a block, a header)."""
    return xxhash.xxh3_64_hexdigest(data)


def block_count(nbytes: int, block_size: int) -> int:
    """How many block digests ``nbytes`` of a chunk have (the last block may be short)."""
    return -(-nbytes // block_size)


def block_digests(data: Any, block_size: int = BLOCK_SIZE) -> str:
    """One digest per ``block_size`` bytes of a contiguous buffer, concatenated (a chunk's record)."""
    view = memoryview(data).cast("B")
    return "".join(digest_hex(view[i : i + block_size]) for i in range(0, view.nbytes, block_size))


@dataclass(frozen=True)
class ChunkDigest:
    """The block digests of one chunk of a tensor; ``offsets``/``shape`` None means the whole tensor."""

    blocks: str
    offsets: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"blocks": self.blocks}
        if self.offsets is not None:
            out["offsets"], out["shape"] = list(self.offsets), list(self.shape or ())
        return out


@dataclass(frozen=True)
class BlockDigests:
    """A tensor file's digests: its header's, and every chunk's blocks (whoever wrote each).

    A partial record (one writer's part of a shared file) has ``header`` None or only some tensors;
    the master merges the parts and checks the whole against the plan before committing.
    """

    block_size: int
    header: str | None = None
    tensors: Mapping[str, tuple[ChunkDigest, ...]] = field(default_factory=dict)

    def merge(self, other: BlockDigests, *, name: str) -> BlockDigests:
        """Both parts of one file's record; ValueError when they overlap or disagree on the block size."""
        if other.block_size != self.block_size:
            raise ValueError(f"{name}: parts hashed with block sizes {self.block_size} and {other.block_size}")
        if self.header is not None and other.header is not None:
            raise ValueError(f"{name}: two writers recorded its header")
        tensors = {k: tuple(v) for k, v in self.tensors.items()}
        for key, chunks in other.tensors.items():
            tensors[key] = tensors.get(key, ()) + tuple(chunks)
        return BlockDigests(self.block_size, self.header if self.header is not None else other.header, tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "header": self.header,
            "tensors": {k: [c.to_json() for c in v] for k, v in sorted(self.tensors.items())},
        }


@dataclass(frozen=True)
class FileDigest:
    """What the commit marker records of each file: its size and a whole-file checksum or block digests."""

    size: int
    checksum: str | None = None
    blocks: BlockDigests | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size}
        if self.checksum is not None:
            out["checksum"] = self.checksum
        if self.blocks is not None:
            out["blocks"] = self.blocks.to_json()
        return out

    def merge(self, other: FileDigest, *, name: str) -> FileDigest:
        """One file's record from two writers' parts (a shared file: the header's writer and the ranks')."""
        if self.blocks is None or other.blocks is None or self.size != other.size:
            raise ValueError(f"{name}: recorded twice ({self.size} and {other.size} bytes)")
        return FileDigest(self.size, None, self.blocks.merge(other.blocks, name=name))

    @classmethod
    def parse(cls, entry: JsonObject) -> FileDigest:
        """A marker's record of one file, checked field by field (CorruptCheckpointError names the field).

        Only what can be checked without the file: types, hex digests, the block size's bounds,
        boxes of integers. The rest (boxes inside the tensor, block counts, chunks that tile every
        tensor) is checked against the file's header when it is read.
        """
        size = entry.int("size", lo=0, hi=MAX_STEP)
        checksum = entry.str("checksum") if entry.any("checksum") is not None else None
        blocks = None
        if entry.any("blocks") is not None:
            rec = entry.obj("blocks")
            block_size = rec.int("block_size", lo=MIN_BLOCK_SIZE, hi=MAX_BLOCK_SIZE)
            header = rec.str("header")
            if len(header) != DIGEST_CHARS or not _HEX_RE.fullmatch(header):
                raise rec.error("header", f"expected {DIGEST_CHARS} hex digits")
            tensors: dict[str, tuple[ChunkDigest, ...]] = {}
            for key, chunks in rec.obj("tensors").items():
                if not isinstance(chunks, list) or not 0 < len(chunks) <= MAX_CHUNKS:
                    raise rec.error("tensors", f"{key!r}: expected a list of 1 to {MAX_CHUNKS} chunk records")
                tensors[key] = tuple(_parse_chunk(JsonObject(c, name=rec.name, where=f"tensors.{key}")) for c in chunks)
            blocks = BlockDigests(block_size, header, tensors)
        if checksum is None and blocks is None:
            raise entry.error("checksum", "neither a checksum nor block digests are recorded")
        return cls(size, checksum, blocks)


def merge_files(parts: Iterable[Mapping[str, FileDigest]]) -> dict[str, FileDigest]:
    """Several writers' records of a step's files as one (parts of one SHARED file merged)."""
    out: dict[str, FileDigest] = {}
    for files in parts:
        for name, digest in files.items():
            out[name] = out[name].merge(digest, name=name) if name in out else digest
    return out


def _parse_chunk(chunk: JsonObject) -> ChunkDigest:
    blocks = chunk.str("blocks")
    if len(blocks) % DIGEST_CHARS or not _HEX_RE.fullmatch(blocks):
        raise chunk.error("blocks", f"expected hex digests of {DIGEST_CHARS} digits each")
    if chunk.any("offsets") is None and chunk.any("shape") is None:
        return ChunkDigest(blocks)
    offsets, shape = chunk.list("offsets"), chunk.list("shape")
    dims = [*offsets, *shape]
    if len(offsets) != len(shape) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise chunk.error("offsets", "offsets and shape must be integer lists of one length")
    if not all(0 <= d <= MAX_STEP for d in dims):
        raise chunk.error("offsets", "dimensions out of range")
    return ChunkDigest(blocks, tuple(offsets), tuple(shape))


def check_chunk_blocks(chunk: ChunkDigest, nbytes: int, block_size: int) -> str | None:
    """Why a chunk's record cannot describe ``nbytes`` of data (None when it can)."""
    want = block_count(nbytes, block_size)
    have = len(chunk.blocks) // DIGEST_CHARS
    if have != want:
        return f"{have} block digests recorded for {nbytes} bytes ({want} blocks of {block_size})"
    return None
