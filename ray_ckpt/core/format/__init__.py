"""State dicts <-> safetensors shards with a Hugging Face index; nested-state flattening; checksums.

This module knows bytes and tensors, not where the bytes go: every writer takes an open binary
file, every reader an open random-access file. Nothing here pickles.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import functools
import io
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch
import xxhash

from ray_ckpt.core.errors import CorruptCheckpointError
from ray_ckpt.core.format.digests import (
    DIGEST_CHARS,
    PARALLEL_HASH_MIN,
    BlockDigests,
    Checksum,
    ChunkDigest,
    FileDigest,
    HashingWriter,
    check_chunk_blocks,
    digest_hex,
    hash_pool,
)
from ray_ckpt.core.safejson import JsonObject, corrupt, parse_json
from ray_ckpt.core.shard import Shard, box_runs, box_view, is_dtensor, local_part


@functools.cache
def _safetensors_dtypes() -> tuple[dict[str, torch.dtype], dict[str, int], dict[torch.dtype, str], dict[str, int]]:
    """The safetensors dtype name of every torch dtype the safetensors library stores.

    Asked of the library itself through its public ``save`` (one tiny save per torch dtype, on
    first use), so every dtype it writes we write, under the name it uses. A packed dtype (``F4``:
    two values per byte) records more elements in the header than the torch tensor has: the factor
    goes in the second table. Returns (name -> torch dtype, packing, torch dtype -> name, bytes per
    torch element). Built on first use, not at import: a process that never touches a tensor (the
    CLI listing a run) never imports torch.
    """
    import safetensors.torch as st

    names: dict[str, torch.dtype] = {}
    packing: dict[str, int] = {}
    dtypes = {value for value in vars(torch).values() if isinstance(value, torch.dtype)}
    for dtype in sorted(dtypes, key=str):
        try:
            probe = torch.zeros(32, dtype=torch.uint8).view(dtype)  # 32 bytes: any element size divides it
            raw = st.save({"t": probe})
        except Exception:  # noqa: BLE001 - a dtype this torch/safetensors pair cannot write
            continue
        (length,) = struct.unpack("<Q", raw[:8])
        entry = json.loads(raw[8 : 8 + length])["t"]
        names[entry["dtype"]] = dtype
        elements = math.prod(entry["shape"])
        if elements != probe.numel():
            packing[entry["dtype"]] = elements // probe.numel()
    to_name = {v: k for k, v in names.items()}
    # Bytes per torch element (a packed F4 element is one byte holding two values).
    sizes = {k: torch.empty((), dtype=v).element_size() for k, v in names.items()}
    return names, packing, to_name, sizes


class _DtypeTable(Mapping[Any, Any]):
    """One of :func:`_safetensors_dtypes`' tables, built on first use."""

    def __init__(self, which: int) -> None:
        self._which = which

    def _table(self) -> dict[Any, Any]:
        return _safetensors_dtypes()[self._which]

    def __getitem__(self, key: Any) -> Any:
        return self._table()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __contains__(self, key: object) -> bool:
        return key in self._table()

    def get(self, key: Any, default: Any = None) -> Any:
        return self._table().get(key, default)

    def __repr__(self) -> str:
        return repr(self._table())


DTYPE_TO_TORCH: Mapping[str, torch.dtype] = _DtypeTable(0)
DTYPE_PACKING: Mapping[str, int] = _DtypeTable(1)
TORCH_TO_DTYPE: Mapping[torch.dtype, str] = _DtypeTable(2)
DTYPE_SIZE: Mapping[str, int] = _DtypeTable(3)  # bytes per torch element


def header_shape(dtype: str, shape: tuple[int, ...] | list[int]) -> list[int]:
    """The shape safetensors records for a torch tensor of ``shape`` (packed dtypes count values)."""
    factor = DTYPE_PACKING.get(dtype, 1)
    out = [int(d) for d in shape]
    if factor != 1 and out:
        out[-1] *= factor
    return out


def torch_shape(dtype: str, shape: list[int]) -> list[int] | None:
    """Inverse of :func:`header_shape`; None when a packed dtype's last dimension does not divide."""
    factor = DTYPE_PACKING.get(dtype, 1)
    out = [int(d) for d in shape]
    if factor != 1:
        if not out or out[-1] % factor:
            return None
        out[-1] //= factor
    return out


MAX_HEADER_SIZE = 100 * 1024 * 1024  # safetensors' own limit
INDEX_SUFFIX = ".index.json"
MAX_DIM = 2**62  # a dimension beyond this cannot describe bytes on any disk
MAX_TENSOR_BYTES = 2**63 - 1  # torch sizes and strides are int64: every shape must be allocatable
RESERVED_KEY = "__metadata__"  # safetensors keeps the header's metadata under this name
_PLAIN_FILE_RE = re.compile(r"[^/\\\x00]+")


# ---------------------------------------------------------------------------------------------
# Tensor buffers: the neutral, zero-copy form in which tensors travel and get written.
# ---------------------------------------------------------------------------------------------
@dataclass
class TensorBuffer:
    """A tensor as raw little-endian bytes: dtype name, shape and a flat uint8 numpy view.

    Numpy views move through Ray's object store without pickling and are written to storage
    without another copy.
    """

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray
    # A shard of a bigger tensor: its global shape and where this box starts (None: a whole tensor).
    global_shape: tuple[int, ...] | None = None
    offsets: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def same_contents(self, other: TensorBuffer) -> bool:
        """Whether two buffers hold the same dtype, shape and bytes."""
        return (
            self.dtype == other.dtype
            and tuple(self.shape) == tuple(other.shape)
            and np.array_equal(self.data, other.data)
        )


def is_tensor_like(value: Any) -> bool:
    """Whether a value is stored as a tensor (torch tensor or DTensor, numpy array, Shard, TensorBuffer)."""
    return isinstance(value, (torch.Tensor, np.ndarray, TensorBuffer, Shard))


def to_buffer(value: torch.Tensor | np.ndarray | TensorBuffer | Shard, *, key: str = "?") -> TensorBuffer:
    """A zero-copy byte view of a tensor (copies only a non-contiguous or non-CPU tensor).

    A DTensor or :class:`~ray_ckpt.core.shard.Shard` gives its local part, with its global shape and
    offsets: nothing is gathered.
    """
    if isinstance(value, TensorBuffer):
        return value
    local, global_shape, offsets = local_part(value, key=key)
    if global_shape is not None:
        buf = to_buffer(local, key=key)
        buf.global_shape, buf.offsets = global_shape, offsets
        return buf
    if isinstance(value, np.ndarray):
        try:
            value = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as exc:
            raise TypeError(f"{key}: numpy dtype {value.dtype} cannot be stored as a tensor") from exc
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{key}: expected a tensor, got {type(value).__name__}")
    tensor = value.detach()
    if tensor.device.type == "meta":
        raise TypeError(f"{key}: a meta tensor has no data to save (materialise it first, e.g. to_empty())")
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise TypeError(f"{key}: sparse/non-strided tensors are not supported ({tensor.layout})")
    dtype = TORCH_TO_DTYPE.get(tensor.dtype)
    if dtype is None:
        raise TypeError(f"{key}: dtype {tensor.dtype} is not supported by safetensors")
    if dtype in DTYPE_PACKING and tensor.dim() == 0:
        raise TypeError(f"{key}: a 0-d {tensor.dtype} tensor has no shape safetensors can record (packed dtype)")
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.resolve_conj().resolve_neg()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    flat = tensor.reshape(-1)
    if flat.numel() and flat.stride(0) != 1:
        # is_contiguous() ignores the strides of size-1 dims, so a lone element (e.g. t[::2] of a
        # 2-vector) can keep any stride; give it a unit stride over the same memory (no copy).
        flat = flat.as_strided((flat.numel(),), (1,))
    data = flat.view(torch.uint8).numpy()
    return TensorBuffer(dtype=dtype, shape=tuple(tensor.shape), data=data)


def to_tensor(buf: TensorBuffer) -> torch.Tensor:
    """A torch tensor sharing memory with the buffer (no copy)."""
    dtype = DTYPE_TO_TORCH[buf.dtype]
    if buf.nbytes == 0:
        return torch.empty(buf.shape, dtype=dtype)
    flat = torch.from_numpy(np.ascontiguousarray(buf.data).reshape(-1))
    return flat.view(dtype).reshape(buf.shape)


def _alias_id(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """Identity of a tensor view: equal ids mean the very same values in the same memory."""
    if tensor.layout != torch.strided or tensor.numel() == 0 or tensor.device.type == "meta":
        return None  # sparse tensors have no storage to compare (to_buffer refuses them by key)
    return (
        tensor.device.type,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


# ---------------------------------------------------------------------------------------------
# Nested state <-> flat tensors + a JSON structure (no pickle).
# ---------------------------------------------------------------------------------------------
@dataclass
class FlatState:
    """A state flattened for storage.

    ``tensors`` holds each distinct tensor once, in the state's order; ``aliases`` maps a key
    that shares memory with an earlier one (tied weights) to that key; ``structure`` is a JSON
    tree that rebuilds the nesting, or None when the state is a flat ``{str: tensor}`` dict.
    """

    tensors: dict[str, TensorBuffer] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    structure: Any = None

    @property
    def total_size(self) -> int:
        return sum(b.nbytes for b in self.tensors.values())


def flatten_state(state: Mapping[str, Any], *, what: str = "state_dict", convert: bool = True) -> FlatState:
    """Split a (possibly nested) state into tensors and a JSON structure.

    Tensors and numpy arrays become safetensors entries; None, bools, ints, floats (NaN/inf
    included), strings, bytes, torch dtypes/devices and numpy scalars go into the structure.
    Any other value raises TypeError naming its key path. Tied tensors are stored once. With
    ``convert=False`` the tensors are kept as given (the targets of a load, under the same keys).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{what}: expected a mapping, got {type(state).__name__}")
    flat = FlatState()
    seen: dict[tuple[Any, ...], str] = {}

    def add_tensor(key: str, value: Any) -> None:
        if key == RESERVED_KEY:
            raise ValueError(
                f"{what}: the key {RESERVED_KEY!r} is reserved by safetensors for the file's metadata; rename it"
            )
        if isinstance(value, torch.Tensor) and not is_dtensor(value):
            ident = _alias_id(value.detach())
            if ident is not None and ident in seen:
                flat.aliases[key] = seen[ident]
                return
            if ident is not None:
                seen[ident] = key
        flat.tensors[key] = to_buffer(value, key=key) if convert else value

    simple = all(isinstance(k, str) for k in state) and all(
        isinstance(v, (torch.Tensor, TensorBuffer, Shard)) for v in state.values()
    )
    if simple:
        for key, value in state.items():
            add_tensor(key, value)
        return flat

    used: set[str] = set()

    def unique_key(path: str) -> str:
        key, n = path or "_", 1
        while key in used:
            key, n = f"{path}#{n}", n + 1
        used.add(key)
        return key

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, (torch.Tensor, TensorBuffer, Shard)):
            key = unique_key(path)
            add_tensor(key, value)
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            key = unique_key(path)
            add_tensor(key, value)
            return {"__ndarray__": key}
        # numpy scalars first: np.float64 subclasses float and would come back as a plain float.
        if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
            item = value.item()
            if isinstance(item, float) and not math.isfinite(item):
                item = {"__float__": repr(item)}
            elif not isinstance(item, (bool, int, float, str)):
                raise TypeError(f"{what}: {path or '<root>'}: unsupported numpy scalar {value.dtype}")
            return {"__npscalar__": [value.dtype.str, item]}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(float(value))}
        if isinstance(value, bytes):
            return {"__bytes__": base64.b64encode(value).decode("ascii")}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"__device__": str(value)}
        if isinstance(value, Mapping):
            items = []
            for k, v in value.items():
                if not (k is None or isinstance(k, (str, int, bool)) or (isinstance(k, float) and math.isfinite(k))):
                    raise TypeError(f"{what}: {path or '<root>'}: unsupported dict key {k!r} ({type(k).__name__})")
                items.append([k, encode(v, f"{path}.{k}" if path else str(k))])
            return {"__dict__": items}
        if isinstance(value, (list, tuple)):
            encoded = [encode(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
            return encoded if type(value) is list else {"__tuple__": encoded}
        raise TypeError(
            f"{what}: {path or '<root>'}: cannot store a {type(value).__module__}.{type(value).__qualname__} "
            "(only tensors, numpy arrays, containers and JSON scalars; ray-ckpt never pickles)"
        )

    flat.structure = encode(dict(state), "")
    return flat


def unflatten_state(tensors: Mapping[str, torch.Tensor], structure: Any, aliases: Mapping[str, str]) -> Any:
    """Rebuild the state written by :func:`flatten_state`; tied tensors come back tied."""

    def tensor_for(key: str) -> torch.Tensor:
        return tensors[aliases.get(key, key)]

    if structure is None:
        out = dict(tensors)
        for alias, target in aliases.items():
            out[alias] = tensors[target]
        return out

    def decode(node: Any) -> Any:
        if isinstance(node, list):
            return [decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        ((tag, value),) = node.items()
        if tag == "__dict__":
            return {k: decode(v) for k, v in value}
        if tag == "__tuple__":
            return tuple(decode(v) for v in value)
        if tag == "__tensor__":
            return tensor_for(value)
        if tag == "__ndarray__":
            return tensor_for(value).numpy()
        if tag == "__float__":
            return float(value)
        if tag == "__npscalar__":
            dtype, item = value
            return np.dtype(dtype).type(decode(item))
        if tag == "__bytes__":
            return base64.b64decode(value)
        if tag == "__dtype__":
            dtype = getattr(torch, value, None)
            if not isinstance(dtype, torch.dtype):  # never hand back another torch attribute
                raise ValueError(f"structure: {value!r} is not a torch dtype")
            return dtype
        if tag == "__device__":
            return torch.device(value)
        raise ValueError(f"unknown structure tag {tag!r}")

    return decode(structure)


_KEY_TYPES = (str, int, float)  # dict keys a structure may hold (bool is an int)
_SCALAR_KINDS = frozenset("biufc")  # numpy scalar kinds a structure may name (no object/void dtypes)


def tensor_leaves(state: Mapping[str, Any], *, what: str = "into") -> dict[str, Any]:
    """The tensors of a state under the keys a save gives them (ties once), as given: the targets of a load."""
    return dict(flatten_state(state, what=what, convert=False).tensors)


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


def check_structure(structure: Any) -> None:
    """Refuse a structure (read from storage) that :func:`unflatten_state` could not decode safely.

    Raises ValueError naming the offending node; walks iteratively, so depth costs no recursion.
    """
    stack: list[tuple[Any, str]] = [(structure, "<root>")]
    while stack:
        node, path = stack.pop()
        if node is None or isinstance(node, (bool, int, float, str)):
            continue
        if isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
            continue
        if not isinstance(node, dict) or len(node) != 1:
            raise ValueError(f"{path}: expected a JSON scalar, an array or a one-key tagged object")
        ((tag, value),) = node.items()
        ok = True
        if tag == "__dict__":
            ok = isinstance(value, list) and all(
                isinstance(item, list) and len(item) == 2 and (item[0] is None or isinstance(item[0], _KEY_TYPES))
                for item in value
            )
            if ok:
                stack.extend((v, f"{path}.{k}") for k, v in value)
        elif tag == "__tuple__":
            ok = isinstance(value, list)
            if ok:
                stack.append((value, path))
        elif tag in ("__tensor__", "__ndarray__", "__bytes__", "__device__"):
            ok = isinstance(value, str)
        elif tag == "__float__":
            ok = value in ("nan", "inf", "-inf")
        elif tag == "__dtype__":
            ok = isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)
        elif tag == "__npscalar__":
            ok = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if ok:
                try:
                    ok = np.dtype(value[0]).kind in _SCALAR_KINDS
                except (TypeError, ValueError):
                    ok = False
                stack.append((value[1], f"{path}.__npscalar__"))
        else:
            raise ValueError(f"{path}: unknown structure tag {tag!r}")
        if not ok:
            raise ValueError(f"{path}: malformed {tag} value {str(value)[:60]!r}")


def structure_keys(structure: Any) -> Iterator[str]:
    """Every tensor key a structure refers to."""
    if isinstance(structure, list):
        for v in structure:
            yield from structure_keys(v)
    elif isinstance(structure, dict):
        ((tag, value),) = structure.items()
        if tag in ("__tensor__", "__ndarray__"):
            yield value
        elif tag == "__dict__":
            for _, v in value:
                yield from structure_keys(v)
        elif tag == "__tuple__":
            yield from structure_keys(value)


# ---------------------------------------------------------------------------------------------
# Shard planning and the Hugging Face index.
# ---------------------------------------------------------------------------------------------
@dataclass
class ShardSpec:
    """One shard file and the keys it holds, in write order."""

    name: str
    keys: list[str]


def shard_file_name(index: int, count: int, prefix: str = "model", ext: str = "safetensors") -> str:
    """Hugging Face shard naming: ``model.safetensors`` or ``model-00001-of-00003.safetensors``."""
    if count == 1:
        return f"{prefix}.{ext}"
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.{ext}"


def index_file_name(prefix: str = "model", ext: str = "safetensors") -> str:
    return f"{prefix}.{ext}{INDEX_SUFFIX}"


def plan_shards(
    groups: Iterable[Iterable[tuple[str, int]]],
    max_shard_size: int,
    *,
    prefix: str = "model",
    ext: str = "safetensors",
) -> list[ShardSpec]:
    """Assign keys to shards: fill each shard in key order up to ``max_shard_size``.

    A tensor bigger than the limit gets a shard of its own. Each group (one rank's keys) starts
    a new shard, so every shard is written from one rank's buffers whoever writes it.
    """
    shards: list[list[str]] = []
    for group in groups:
        current: list[str] = []
        current_size = 0
        for key, nbytes in group:
            if current and current_size + nbytes > max_shard_size:
                shards.append(current)
                current, current_size = [], 0
            current.append(key)
            current_size += nbytes
        if current:
            shards.append(current)
    if not shards:
        shards = [[]]
    return [ShardSpec(shard_file_name(i, len(shards), prefix, ext), keys) for i, keys in enumerate(shards)]


def hf_index_bytes(shards: list[ShardSpec], total_size: int, total_parameters: int | None = None) -> bytes:
    """The ``*.index.json`` of a sharded checkpoint, with the metadata transformers writes.

    ``total_parameters`` (the number of values) sits beside ``total_size`` (bytes), as in
    ``save_pretrained``'s index, when the caller knows it.
    """
    weight_map = {key: shard.name for shard in shards for key in shard.keys}
    metadata: dict[str, int] = {"total_size": total_size}
    if total_parameters is not None:
        metadata = {"total_parameters": total_parameters, **metadata}
    return json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2).encode()


def parse_hf_index(data: bytes, *, name: str) -> dict[str, str]:
    """The weight_map of an index file; CorruptCheckpointError naming the file if malformed.

    Every file it names must be a plain file name beside the index (no directories, no ``..``).
    """
    weight_map = JsonObject.parse(data, name=name).dict("weight_map")
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or not _PLAIN_FILE_RE.fullmatch(fname) or fname in (".", ".."):
            raise corrupt(name, f"weight_map[{key!r}]: {fname!r} is not a file name beside the index")
    return weight_map


# ---------------------------------------------------------------------------------------------
# safetensors writing (streamed) and reading (validated).
# ---------------------------------------------------------------------------------------------
def safetensors_layout(
    entries: Mapping[str, TensorBuffer], keys: list[str], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[str]]:
    """The header bytes of a safetensors file and the order its buffers follow.

    Buffers are laid out by decreasing element size (then key order) so every tensor is aligned
    to its dtype when the file is mapped or read into one buffer, as safetensors itself does.
    """
    order = sorted(keys, key=lambda k: -DTYPE_SIZE[entries[k].dtype])
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key in order:
        buf = entries[key]
        header[key] = {
            "dtype": buf.dtype,
            "shape": header_shape(buf.dtype, buf.shape),
            "data_offsets": [offset, offset + buf.nbytes],
        }
        offset += buf.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    if len(raw) > MAX_HEADER_SIZE:
        raise ValueError(
            f"safetensors header of {len(keys)} tensors is {len(raw)} bytes, over safetensors' "
            f"{MAX_HEADER_SIZE}-byte limit: no reader could open the file. Use a smaller max_shard_size "
            "(more shards, fewer tensors each) or shorter tensor names"
        )
    return struct.pack("<Q", len(raw)) + raw, order


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


@dataclass
class SafetensorsHeader:
    """A parsed, validated safetensors header."""

    entries: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    data_start: int
    header_bytes: bytes


def read_safetensors_header(f: IO[bytes], *, name: str, file_size: int) -> SafetensorsHeader:
    """Read and validate a header: sizes, dtypes, shapes and offsets within the file."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise corrupt(name, f"truncated: {file_size} bytes is too short for a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_SIZE:
        raise corrupt(name, f"header length {length} is over safetensors' {MAX_HEADER_SIZE}-byte limit")
    if 8 + length > file_size:
        raise corrupt(name, f"header length {length} exceeds the file ({file_size} bytes)")
    raw = f.read(length)
    if len(raw) != length:
        raise corrupt(name, "truncated header")
    doc = JsonObject(parse_json(raw, name=name), name=name)
    header = dict(doc.raw)
    metadata = doc.dict(RESERVED_KEY, {})
    if not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(name, f"{RESERVED_KEY}: values must be strings")
    header.pop(RESERVED_KEY, None)
    data_size = file_size - 8 - length
    spans = []
    for key, entry in doc.objects():
        if key == RESERVED_KEY:
            continue
        dtype = entry.str("dtype")
        if dtype not in DTYPE_SIZE:
            raise entry.error("dtype", f"unknown dtype {dtype!r}")
        shape = entry.list("shape")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape):
            raise entry.error("shape", f"expected non-negative integer dimensions, got {str(shape)[:60]}")
        # Every tensor must be allocatable: torch's strides multiply the dimensions (a 0 among them
        # does not stop that), so the product of the non-zero ones, in bytes, must fit an int64.
        if math.prod(max(d, 1) for d in shape) * DTYPE_SIZE[dtype] > MAX_TENSOR_BYTES:
            raise entry.error("shape", f"{str(shape)[:60]} of {dtype}: dimensions multiply past 2**63 (no tensor fits)")
        offsets = entry.list("data_offsets")
        if len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            raise entry.error("data_offsets", f"expected [begin, end], got {str(offsets)[:60]}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise corrupt(name, f"tensor {key!r}: bad data_offsets {[begin, end]}")
        if end > data_size:
            raise corrupt(name, f"tensor {key!r}: data_offsets end {end} past the end of the data ({data_size} bytes)")
        local = torch_shape(dtype, shape)
        if local is None or end - begin != math.prod(local) * DTYPE_SIZE[dtype]:
            raise corrupt(name, f"tensor {key!r}: {end - begin} bytes do not match shape {shape} of {dtype}")
        spans.append((begin, end, key))
    spans.sort()
    for (_, prev_end, prev_key), (begin, _, key) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:
            raise corrupt(name, f"tensors {prev_key!r} and {key!r} overlap")
    return SafetensorsHeader(header, metadata, 8 + length, prefix + raw)


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


# ---------------------------------------------------------------------------------------------
# Bytes read, checked against the digests their writers recorded (see ray_ckpt.core.format.digests).
# ---------------------------------------------------------------------------------------------
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
