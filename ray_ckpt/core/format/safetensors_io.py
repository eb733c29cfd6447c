"""safetensors files written (streamed) and read (validated, checked when a digest is given).

Every writer takes an open binary file, every reader an open random-access file (or, for
:func:`map_safetensors`, a local path): this module knows bytes and tensors, not where they go.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import mmap
import os
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

import numpy as np
import torch

from ray_ckpt.core.errors import CorruptCheckpointError
from ray_ckpt.core.format.buffers import DTYPE_SIZE, DTYPE_TO_TORCH, TORCH_TO_DTYPE, TensorBuffer, torch_shape
from ray_ckpt.core.format.checks import ChunkBytes, ChunkCheck, FileCheck, check_header, check_tensor
from ray_ckpt.core.format.digests import (
    PARALLEL_HASH_MIN,
    FileDigest,
    HashingWriter,
    hash_pool,
)
from ray_ckpt.core.format.header import SafetensorsHeader, read_safetensors_header, safetensors_layout
from ray_ckpt.core.shard import box_runs, local_part


def write_safetensors(
    f: IO[bytes],
    entries: Mapping[str, TensorBuffer],
    keys: list[str],
    metadata: Mapping[str, str] | None = None,
    *,
    layout: tuple[bytes, list[str]] | None = None,
) -> FileDigest:
    """Stream a valid safetensors file of ``keys`` to ``f``: header, then each raw buffer.

    No second in-memory copy of the tensors is made; the checksum is computed on the way out.
    ``layout`` is :func:`safetensors_layout`'s result when the caller checked it already.
    """
    out = HashingWriter(f)
    header, order = layout or safetensors_layout(entries, keys, metadata)
    out.write(header)
    for key in order:
        if entries[key].nbytes:
            out.write(entries[key].data)
    return FileDigest(out.size, out.checksum.hexdigest())


def read_safetensors(
    f: IO[bytes],
    *,
    name: str,
    file_size: int,
    keys: Iterable[str] | None = None,
    expected: FileDigest | None = None,
    expected_checksum: str | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file into torch (one sequential read of the data).

    Every tensor gets a buffer of its own (storage offset 0, as safetensors' own loader gives):
    some torch APIs, e.g. ``torch.set_rng_state``, ignore a view's storage offset.
    With ``keys`` only those tensors are read. With ``expected`` (the file's record in a marker;
    ``expected_checksum`` is the same for a whole-file checksum) every byte returned is checked:
    a whole read hashes the file as it streams, a read of some keys checks those tensors' blocks
    (a file with only a whole-file checksum is then read whole once). A mismatch raises
    CorruptCheckpointError naming the file (and, for block digests, the key and byte range).
    """
    if expected is None and expected_checksum is not None:
        expected = FileDigest(file_size, expected_checksum)
    header = read_safetensors_header(f, name=name, file_size=file_size)
    wanted = list(header.entries) if keys is None else [k for k in keys if k in header.entries]
    out: dict[str, torch.Tensor] = {}
    if keys is None or (expected is not None and expected.blocks is None):
        check = FileCheck(expected, name=name) if expected is not None else None
        hasher = _OrderedHasher(check) if check is not None else None
        if check is not None:
            check.update(header.header_bytes)
        on_chunk = hasher.update if hasher is not None else None
        raw: dict[str, torch.Tensor] = {}
        data_size = file_size - header.data_start
        position = 0  # the file is read in order; bytes no tensor claims are hashed all the same
        spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.entries.items())
        try:
            for begin, end, key in [*spans, (data_size, data_size, None)]:
                if begin > position:
                    gap = torch.empty(begin - position, dtype=torch.uint8)
                    _readinto(f, gap, name=name, on_chunk=on_chunk)
                if key is None:
                    break
                buf = torch.empty(end - begin, dtype=torch.uint8)
                if end > begin:
                    _readinto(f, buf, name=name, on_chunk=on_chunk)
                raw[key] = buf
                position = end
        finally:
            if hasher is not None:
                hasher.finish()
        if check is not None:
            check.finish()
        for key in wanted:
            out[key] = _view(raw[key], header.entries[key])
        return out
    if expected is not None:
        check_header(header, expected, name=name)
    for key in wanted:
        entry = header.entries[key]
        begin, end = entry["data_offsets"]
        f.seek(header.data_start + begin)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            _readinto(f, buf, name=name)
        if expected is not None:
            check_tensor(buf.numpy(), entry, header.data_start, expected, key=key, name=name)
        out[key] = _view(buf, entry)
    return out


def map_safetensors(
    path: str,
    *,
    name: str,
    keys: Iterable[str] | None = None,
    expected: FileDigest | None = None,
    expected_checksum: str | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors backed by a private memory map of a local safetensors file (nothing copied).

    Pages come from the page cache when first touched and are shared with every process that
    maps the file; writes to the tensors stay private (copy-on-write). With ``expected`` every
    byte that is returned is hashed once, when the file is mapped (which brings those pages in;
    a file with only a whole-file checksum is hashed whole), else nothing is read until used.
    """
    if expected is None and expected_checksum is not None:
        expected = FileDigest(os.stat(path).st_size, expected_checksum)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = read_safetensors_header(f, name=name, file_size=size)
        # no MAP_POPULATE: on a writable private map it copies every page (0.48 s per GiB here)
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    wanted = list(header.entries) if keys is None else [k for k in keys if k in header.entries]
    if expected is not None:
        try:
            _check_mapped(mapped, header, expected, wanted, whole=keys is None, name=name)
        except BaseException:
            with contextlib.suppress(BufferError):  # a view may live on in the traceback: the GC closes it then
                mapped.close()
            raise
    out: dict[str, torch.Tensor] = {}
    for key in wanted:
        entry = header.entries[key]
        begin, end = entry["data_offsets"]
        raw = (
            torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=header.data_start + begin)
            if end > begin
            else torch.empty(0, dtype=torch.uint8)
        )
        out[key] = _view(raw, entry)  # each tensor holds the mapping open; it closes with the last one
    return out


def _check_mapped(
    mapped: mmap.mmap, header: SafetensorsHeader, expected: FileDigest, wanted: list[str], *, whole: bool, name: str
) -> None:
    """Hash the mapped bytes that will be returned (the whole file for a whole-file checksum)."""
    mapped.madvise(mmap.MADV_SEQUENTIAL)  # read ahead hard while hashing (a cold file)
    view = memoryview(mapped)
    if whole or expected.blocks is None:
        check = FileCheck(expected, name=name)
        for start in range(0, len(view), READ_CHUNK):
            check.update(view[start : start + READ_CHUNK])
        check.finish()
    else:
        check_header(header, expected, name=name)
        for key in wanted:
            begin, end = header.entries[key]["data_offsets"]
            data = np.frombuffer(view, dtype=np.uint8, count=end - begin, offset=header.data_start + begin)
            check_tensor(data, header.entries[key], header.data_start, expected, key=key, name=name)
    del view
    mapped.madvise(mmap.MADV_NORMAL)


def _view(raw: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    dtype = DTYPE_TO_TORCH[entry["dtype"]]
    shape = torch_shape(entry["dtype"], entry["shape"]) or []
    if raw.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return raw.view(dtype).reshape(shape)


READ_CHUNK = 64 << 20  # a checksummed read hands its bytes to the hasher in pieces this big


class _OrderedHasher:
    """Feeds a checker (:class:`FileCheck`, :class:`ChunkCheck`) on a helper thread, strictly in order,
    while the caller reads on."""

    def __init__(self, checksum: FileCheck | ChunkCheck) -> None:
        self.checksum = checksum
        self._pending: concurrent.futures.Future | None = None

    def update(self, data: Any) -> None:
        self.finish()  # the previous piece first: xxh3 is a stream
        if memoryview(data).nbytes >= PARALLEL_HASH_MIN:
            self._pending = hash_pool().submit(self.checksum.update, data)
        else:
            self.checksum.update(data)

    def finish(self) -> None:
        """Wait for the piece being hashed (if any)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _readinto(
    f: IO[bytes], buf: torch.Tensor, *, name: str, on_chunk: Callable[[memoryview], None] | None = None
) -> None:
    """Fill ``buf`` from ``f``; ``on_chunk`` gets each completed READ_CHUNK-sized piece (in order)."""
    view = memoryview(buf.numpy())
    total = 0
    reported = 0
    while total < len(view):
        limit = len(view) if on_chunk is None else min(len(view), reported + READ_CHUNK)
        n = f.readinto(view[total:limit]) if hasattr(f, "readinto") else None
        if n is None:
            chunk = f.read(limit - total)
            n = len(chunk)
            view[total : total + n] = chunk
        if not n:
            raise CorruptCheckpointError(f"{name}: truncated: expected {len(view)} data bytes, got {total}", path=name)
        total += n
        if on_chunk is not None and total == limit:
            on_chunk(view[reported:total])
            reported = total


def read_box_into(
    f: IO[bytes],
    entry: Mapping[str, Any],
    data_start: int,
    target: Any,
    *,
    key: str,
    name: str,
    chunks: list[ChunkBytes] | None = None,
    block_size: int = 0,
) -> None:
    """Fill ``target`` (tensor, numpy array, DTensor or Shard) with its box of a saved tensor.

    Reads only the box's byte runs (one run for a dim-0 shard or a whole tensor); a target that is
    not contiguous CPU memory (e.g. on a GPU) is filled through one host buffer of its size. With
    ``chunks`` (:func:`tensor_chunks`) every byte is checked against its chunk's block digests: the
    reads widen to the blocks around the box (at most one block more at each edge of each chunk)
    and a mismatch raises CorruptCheckpointError naming the file, the key and the byte range.
    """
    local, global_shape, offsets = local_part(target, key=key)
    if isinstance(local, np.ndarray):
        local = torch.from_numpy(local)
    if not isinstance(local, torch.Tensor):
        raise TypeError(f"{key}: cannot load into a {type(local).__name__}")
    dtype = entry["dtype"]
    saved = tuple(torch_shape(dtype, entry["shape"]) or ())
    shape = tuple(local.shape)
    global_shape = tuple(global_shape) if global_shape is not None else shape
    offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
    if TORCH_TO_DTYPE.get(local.dtype) != dtype or global_shape != saved:
        have = f"{TORCH_TO_DTYPE.get(local.dtype, local.dtype)}{list(global_shape)}"
        raise ValueError(f"{key}: the checkpoint holds {dtype}{list(saved)}, the target is {have} ({name})")
    itemsize = DTYPE_SIZE[dtype]
    if not math.prod(shape):
        return
    direct = local.device.type == "cpu" and local.is_contiguous()
    buf = local if direct else torch.empty(shape, dtype=local.dtype, pin_memory=_can_pin(local))
    view = buf.reshape(-1).view(torch.uint8).numpy()
    if chunks is None:
        starts, length = box_runs(global_shape, offsets, shape, itemsize)
        base = data_start + int(entry["data_offsets"][0])
        for n, start in enumerate(starts.tolist()):
            _read_exactly(f, base + start, view[n * length : (n + 1) * length], name=name, key=key)
    else:
        for chunk in chunks:
            _read_verified(f, chunk, offsets, shape, view, itemsize, block_size, name=name)
    if not direct:
        with torch.no_grad():
            local.copy_(buf, non_blocking=buf.is_pinned())
        if buf.is_pinned():
            torch.accelerator.synchronize(local.device)


def _read_exactly(f: IO[bytes], position: int, out: Any, *, name: str, key: str) -> None:
    """Fill ``out`` (a writable buffer) with the file's bytes from ``position``."""
    piece = memoryview(out).cast("B")
    f.seek(position)
    got = 0
    while got < len(piece):
        read = f.readinto(piece[got:])
        if not read:
            raise CorruptCheckpointError(f"{name}: truncated while reading {key!r}", path=name)
        got += read


def _read_local(f: IO[bytes], chunk: ChunkBytes, lo: int, hi: int, out: np.ndarray, *, name: str) -> None:
    """Read bytes ``[lo, hi)`` of a chunk (in its own row-major order) from its runs in the file."""
    pos = lo
    while pos < hi:
        run, within = divmod(pos, chunk.run)
        n = min(chunk.run - within, hi - pos)
        _read_exactly(f, int(chunk.starts[run]) + within, out[pos - lo : pos - lo + n], name=name, key=chunk.key)
        pos += n


BOX_READ_PIECE = 16 << 20  # a verified box is read in pieces this big, each hashed while the next is read


def _split_runs(starts: np.ndarray, length: int, fine: int) -> np.ndarray:
    """Runs of ``length`` bytes as runs of ``fine`` bytes (``fine`` divides ``length``)."""
    if length == fine:
        return starts
    return (starts[:, None] + np.arange(0, length, fine, dtype=np.int64)[None, :]).reshape(-1)


def _read_verified(
    f: IO[bytes],
    chunk: ChunkBytes,
    offsets: tuple[int, ...],
    shape: tuple[int, ...],
    view: np.ndarray,
    itemsize: int,
    block_size: int,
    *,
    name: str,
) -> None:
    """Copy the part of ``chunk`` inside the box ``offsets``/``shape`` into ``view`` (the box's bytes), checked.

    The chunk's bytes from the block before the overlap's first byte to the block after its last
    are read and hashed. Where the overlap is one run in the chunk and one in the box (dim-0
    shards, a whole tensor) the middle is read straight into the target, else through one buffer.
    """
    lo_box = [max(c, t) for c, t in zip(chunk.offsets, offsets, strict=True)]
    hi_box = [min(c + n, t + m) for c, n, t, m in zip(chunk.offsets, chunk.shape, offsets, shape, strict=True)]
    if any(h <= lo for lo, h in zip(lo_box, hi_box, strict=True)):
        return
    inner = tuple(h - lo for lo, h in zip(lo_box, hi_box, strict=True))
    in_chunk, length = box_runs(
        chunk.shape, tuple(a - c for a, c in zip(lo_box, chunk.offsets, strict=True)), inner, itemsize
    )
    in_box, box_length = box_runs(shape, tuple(a - t for a, t in zip(lo_box, offsets, strict=True)), inner, itemsize)
    if box_length != length:  # the overlap is contiguous on one side only: walk both in the finer runs
        fine = min(length, box_length)
        in_chunk, in_box = _split_runs(in_chunk, length, fine), _split_runs(in_box, box_length, fine)
        length = fine
    first, last = int(in_chunk[0]), int(in_chunk[-1]) + length
    lo = first // block_size * block_size
    hi = min(-(-last // block_size) * block_size, chunk.nbytes)
    check = ChunkCheck(chunk, block_size, name=name, start=lo)
    direct = len(in_chunk) == 1 and len(in_box) == 1
    if direct:
        target = view[int(in_box[0]) : int(in_box[0]) + length]
        empty = np.empty(0, dtype=np.uint8)
        head, tail = np.empty(first - lo, dtype=np.uint8) if first > lo else empty, np.empty(hi - last, dtype=np.uint8)
        pieces = [(lo, first, head), (first, last, target), (last, hi, tail)]
    else:
        span = np.empty(hi - lo, dtype=np.uint8)
        pieces = [(lo, hi, span)]
    hasher = _OrderedHasher(check)  # hashes what was read while the next piece is read
    try:
        for a, b, out in pieces:
            for start in range(a, b, BOX_READ_PIECE):
                end = min(start + BOX_READ_PIECE, b)
                piece = out[start - a : end - a]
                _read_local(f, chunk, start, end, piece, name=name)
                hasher.update(piece)
    finally:
        hasher.finish()
    check.finish(hi)
    if not direct:
        for c, t in zip((in_chunk - lo).tolist(), in_box.tolist(), strict=True):
            view[t : t + length] = span[c : c + length]


def _can_pin(tensor: torch.Tensor) -> bool:
    return tensor.device.type not in ("cpu", "meta") and torch.accelerator.is_available()
