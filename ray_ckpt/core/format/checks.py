"""Bytes read, checked against the digests their writers recorded (see :mod:`ray_ckpt.core.format.digests`).

:class:`FileCheck` checks a whole file streamed in order, :class:`ChunkCheck` one chunk of a tensor,
:func:`check_header` / :func:`check_tensor` what is already in memory.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from ray_ckpt.core.format.buffers import DTYPE_SIZE, torch_shape
from ray_ckpt.core.format.digests import (
    DIGEST_CHARS,
    BlockDigests,
    Checksum,
    ChunkDigest,
    FileDigest,
    check_chunk_blocks,
    digest_hex,
)
from ray_ckpt.core.format.header import MAX_HEADER_SIZE, SafetensorsHeader, read_safetensors_header
from ray_ckpt.core.safejson import corrupt
from ray_ckpt.core.shard import box_runs, box_view

MAX_RUNS = 1 << 22  # byte runs of one chunk a reader maps out (a dim-1 shard of a 4M-row tensor)


@dataclass(frozen=True)
class ChunkBytes:
    """One chunk of a tensor as it lies in its file: its digests, its box and its byte runs."""

    key: str
    index: int
    digest: ChunkDigest
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    starts: np.ndarray  # file offsets of the chunk's runs, ascending: its bytes in its own order
    run: int  # bytes per run
    nbytes: int

    def file_span(self, lo: int, hi: int) -> tuple[int, int]:
        """The file byte range that holds bytes ``[lo, hi)`` of the chunk."""
        first = int(self.starts[lo // self.run]) + lo % self.run
        last = int(self.starts[(hi - 1) // self.run]) + (hi - 1) % self.run + 1
        return first, last


def tensor_chunks(
    entry: Mapping[str, Any], data_start: int, blocks: BlockDigests, *, key: str, name: str
) -> list[ChunkBytes]:
    """The chunks a file's record gives one tensor, checked against the file's header.

    CorruptCheckpointError (naming file and key) unless every box lies inside the tensor, holds the
    right number of block digests, and the chunks' byte runs cover the tensor's bytes exactly once.
    """
    records = blocks.tensors.get(key)
    if records is None:
        raise corrupt(name, f"tensor {key!r}: no block digests recorded for it")
    dtype = entry["dtype"]
    shape = tuple(torch_shape(dtype, entry["shape"]) or ())
    itemsize = DTYPE_SIZE[dtype]
    begin, end = (data_start + int(o) for o in entry["data_offsets"])
    chunks: list[ChunkBytes] = []
    for i, rec in enumerate(records):
        offsets = rec.offsets if rec.offsets is not None else (0,) * len(shape)
        box = rec.shape if rec.shape is not None else shape
        if len(offsets) != len(shape) or any(o + n > g for o, n, g in zip(offsets, box, shape, strict=True)):
            raise corrupt(
                name,
                f"tensor {key!r}: chunk {i} (offsets {list(offsets)}, shape {list(box)}) lies outside {list(shape)}",
            )
        nbytes = math.prod(box) * itemsize
        problem = check_chunk_blocks(rec, nbytes, blocks.block_size)
        if problem is not None:
            raise corrupt(name, f"tensor {key!r}: chunk {i}: {problem}")
        partial = [d for d in range(len(shape)) if box[d] != shape[d]]
        if partial and math.prod(box[: partial[-1]]) > MAX_RUNS:
            raise corrupt(name, f"tensor {key!r}: chunk {i} lies in more than {MAX_RUNS} runs of bytes")
        if nbytes:
            starts, run = box_runs(shape, offsets, box, itemsize)
            chunks.append(ChunkBytes(key, i, rec, offsets, box, starts + begin, run, nbytes))
    starts = np.concatenate([c.starts for c in chunks]) if chunks else np.zeros(0, dtype=np.int64)
    ends = starts + np.concatenate([np.full(len(c.starts), c.run) for c in chunks]) if chunks else starts
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    tiled = (
        begin == end
        if not len(starts)
        else (starts[0] == begin and ends[-1] == end and np.array_equal(starts[1:], ends[:-1]))
    )
    if not tiled:
        raise corrupt(name, f"tensor {key!r}: its chunks' digests do not cover its bytes exactly once")
    return chunks


class ChunkCheck:
    """Hashes a chunk's bytes, fed in its own order from block boundary ``start``, block by block."""

    def __init__(self, chunk: ChunkBytes, block_size: int, *, name: str, start: int = 0) -> None:
        self.chunk, self.block_size, self.name = chunk, block_size, name
        self.position = start
        self._hash: Any = None

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        size, pos = self.block_size, 0
        while pos < len(view):
            fill = self.position % size
            take = min(len(view) - pos, size - fill, self.chunk.nbytes - self.position)
            if take <= 0:
                raise corrupt(
                    self.name, f"tensor {self.chunk.key!r}: more bytes than its chunk {self.chunk.index} holds"
                )
            piece = view[pos : pos + take]
            done = self.position + take
            if fill == 0 and (done % size == 0 or done == self.chunk.nbytes):
                self._compare(self.position, digest_hex(piece))  # a whole block in one piece: no hasher object
            else:
                if self._hash is None:
                    self._hash = xxhash.xxh3_64()
                self._hash.update(piece)
                if done % size == 0 or done == self.chunk.nbytes:
                    self._compare(done - (fill + take), self._hash.hexdigest())
                    self._hash = None
            self.position, pos = done, pos + take

    def _compare(self, block_start: int, got: str) -> None:
        k = block_start // self.block_size
        want = self.chunk.digest.blocks[k * DIGEST_CHARS : (k + 1) * DIGEST_CHARS]
        if got != want:
            end = min(block_start + self.block_size, self.chunk.nbytes)
            first, last = self.chunk.file_span(block_start, end)
            raise corrupt(
                self.name,
                f"checksum mismatch in tensor {self.chunk.key!r}, bytes {first}-{last} of the file "
                f"(block {k} of chunk {self.chunk.index}; expected {want}, got {got})",
            )

    def finish(self, end: int | None = None) -> None:
        """Every byte up to ``end`` (the chunk's end by default) was fed and matched."""
        end = self.chunk.nbytes if end is None else end
        if self.position != end or self._hash is not None:
            raise corrupt(self.name, f"tensor {self.chunk.key!r}: chunk {self.chunk.index} is incomplete")


def check_header(header: SafetensorsHeader, expected: FileDigest, *, name: str) -> None:
    """A file's header bytes against the digest its writer recorded, and no digests of tensors it lacks
    (block-digest records only)."""
    if expected.blocks is None:
        return
    if digest_hex(header.header_bytes) != expected.blocks.header:
        raise corrupt(name, f"checksum mismatch in its header (bytes 0-{len(header.header_bytes)})")
    unknown = sorted(set(expected.blocks.tensors) - set(header.entries))
    if unknown:
        raise corrupt(name, f"block digests recorded for tensors {unknown[:3]} the file does not hold")


def check_tensor(
    data: np.ndarray, entry: Mapping[str, Any], data_start: int, expected: FileDigest, *, key: str, name: str
) -> None:
    """Check one tensor's bytes (all of them, in memory) against the file's block digests.

    A chunk that is one run of the tensor is hashed where it lies; an interleaved one (a dim-1
    shard: a run per row) is gathered by numpy into one buffer of its size first, so the cost
    does not grow with the number of rows.
    """
    assert expected.blocks is not None
    begin = data_start + int(entry["data_offsets"][0])
    shape = tuple(torch_shape(entry["dtype"], entry["shape"]) or ())
    for chunk in tensor_chunks(entry, data_start, expected.blocks, key=key, name=name):
        check = ChunkCheck(chunk, expected.blocks.block_size, name=name)
        if len(chunk.starts) == 1:
            start = int(chunk.starts[0]) - begin
            check.update(data[start : start + chunk.nbytes])
        else:
            check.update(np.ascontiguousarray(box_view(data, shape, chunk.offsets, chunk.shape)).reshape(-1))
        check.finish()


class _TensorSink:
    """Collects the bytes of a tensor whose chunks interleave, then checks them with :func:`check_tensor`."""

    def __init__(self, entry: Mapping[str, Any], data_start: int, expected: FileDigest, *, key: str, name: str):
        begin, end = entry["data_offsets"]
        self.data = np.empty(end - begin, dtype=np.uint8)
        self.entry, self.data_start, self.expected, self.key, self.name = entry, data_start, expected, key, name
        self.filled = 0

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        self.data[self.filled : self.filled + len(view)] = view
        self.filled += len(view)
        if self.filled == len(self.data):
            check_tensor(self.data, self.entry, self.data_start, self.expected, key=self.key, name=self.name)
            self.data = np.empty(0, dtype=np.uint8)

    def finish(self) -> None:
        if len(self.data):
            raise corrupt(self.name, f"tensor {self.key!r} is incomplete")


class FileCheck:
    """Checks a file's bytes, fed in order from its first byte, against its record in a marker.

    A whole-file checksum is compared at :meth:`finish`; block digests are checked as the bytes
    pass (the header's first, once it has arrived, then each chunk's blocks), so a copy or a
    verify streams any file in bounded memory. CorruptCheckpointError names the file, and for a
    block the tensor and the byte range; bytes that no digest covers are refused.
    """

    def __init__(self, expected: FileDigest, *, name: str) -> None:
        self.expected, self.name = expected, name
        self.position = 0
        self._checksum = Checksum() if expected.blocks is None else None
        self._head = bytearray()
        self._segments: list[tuple[int, int, ChunkCheck | _TensorSink]] | None = None
        self._next = 0

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if self.position + len(view) > self.expected.size:
            raise corrupt(self.name, f"longer than the committed {self.expected.size} bytes")
        if self._checksum is not None:
            self._checksum.update(view)
            self.position += len(view)
            return
        while len(view) and self._segments is None:
            need = 8 if len(self._head) < 8 else 8 + struct.unpack("<Q", self._head[:8])[0]
            take = min(need - len(self._head), len(view))
            self._head += view[:take]
            view = view[take:]
            self.position += take
            if len(self._head) >= 8:
                need = 8 + struct.unpack("<Q", self._head[:8])[0]
                if need > min(self.expected.size, 8 + MAX_HEADER_SIZE):
                    raise corrupt(self.name, f"header length {need - 8} exceeds the file or safetensors' limit")
                if len(self._head) == need:
                    self._start(bytes(self._head))
        while len(view):
            start, end, check = self._segments[self._next]  # type: ignore[index]
            take = min(end - self.position, len(view))
            check.update(view[:take])
            view = view[take:]
            self.position += take
            if self.position == end:
                self._next += 1

    def _start(self, head: bytes) -> None:
        blocks = self.expected.blocks
        assert blocks is not None
        if digest_hex(head) != blocks.header:  # before parsing: a damaged header is a checksum mismatch
            raise corrupt(self.name, f"checksum mismatch in its header (bytes 0-{len(head)})")
        header = read_safetensors_header(io.BytesIO(head), name=self.name, file_size=self.expected.size)
        check_header(header, self.expected, name=self.name)
        segments: list[tuple[int, int, ChunkCheck | _TensorSink]] = []
        for key, entry in header.entries.items():
            chunks = tensor_chunks(entry, header.data_start, blocks, key=key, name=self.name)
            if all(len(chunk.starts) == 1 for chunk in chunks):  # streamed: each chunk is one range
                for chunk in chunks:
                    start = int(chunk.starts[0])
                    segments.append((start, start + chunk.nbytes, ChunkCheck(chunk, blocks.block_size, name=self.name)))
            else:  # interleaved chunks: the tensor is gathered, then checked (memory: that tensor)
                begin, end = (header.data_start + int(o) for o in entry["data_offsets"])
                sink = _TensorSink(entry, header.data_start, self.expected, key=key, name=self.name)
                segments.append((begin, end, sink))
        segments.sort(key=lambda seg: seg[0])
        edges = [header.data_start] + [end for _, end, _ in segments]
        if [start for start, _, _ in segments] != edges[:-1] or edges[-1] != self.expected.size:
            raise corrupt(self.name, "bytes between or after its tensors are covered by no digest")
        self._segments = segments
        self._checks = {id(c): c for _, _, c in segments}

    def finish(self) -> None:
        """All the committed bytes arrived and matched (CorruptCheckpointError otherwise)."""
        if self.position != self.expected.size:
            raise corrupt(self.name, f"{self.position} bytes read, {self.expected.size} committed (truncated)")
        if self._checksum is not None:
            got = self._checksum.hexdigest()
            if got != self.expected.checksum:
                raise corrupt(self.name, f"checksum mismatch (expected {self.expected.checksum}, got {got})")
            return
        if self._segments is None:
            raise corrupt(self.name, "too short to hold its header")
        for check in self._checks.values():
            check.finish()
