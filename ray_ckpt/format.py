"""State dicts <-> safetensors shards with a Hugging Face index; nested-state flattening; checksums.

This module knows bytes and tensors, not where the bytes go: every writer takes an open binary
file, every reader an open random-access file. Nothing here pickles.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import json
import math
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch
import xxhash

from ray_ckpt.errors import CorruptCheckpointError
from ray_ckpt.safejson import JsonObject, corrupt, parse_json
from ray_ckpt.shard import Shard, box_runs, is_dtensor, local_part


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
CHECKSUM_ALGORITHM = "xxh3_64"  # ~10+ GB/s on one core: far below disk time, unlike sha256
INDEX_SUFFIX = ".index.json"
MAX_DIM = 2**62  # a dimension beyond this cannot describe bytes on any disk
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

    A DTensor or :class:`~ray_ckpt.shard.Shard` gives its local part, with its global shape and
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


def read_box_into(f: IO[bytes], entry: Mapping[str, Any], data_start: int, target: Any, *, key: str, name: str) -> None:
    """Fill ``target`` (tensor, numpy array, DTensor or Shard) with its box of a saved tensor.

    Reads only the box's byte runs (one run for a dim-0 shard or a whole tensor); a target that is
    not contiguous CPU memory (e.g. on a GPU) is filled through one host buffer of its size.
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
    starts, length = box_runs(global_shape, offsets, shape, DTYPE_SIZE[dtype])
    if not len(starts):
        return
    direct = local.device.type == "cpu" and local.is_contiguous()
    buf = local if direct else torch.empty(shape, dtype=local.dtype, pin_memory=_can_pin(local))
    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
    base = data_start + int(entry["data_offsets"][0])
    for n, start in enumerate(starts.tolist()):
        f.seek(base + start)
        piece = view[n * length : (n + 1) * length]
        got = 0
        while got < length:
            read = f.readinto(piece[got:])
            if not read:
                raise CorruptCheckpointError(f"{name}: truncated while reading {key!r}", path=name)
            got += read
    if not direct:
        with torch.no_grad():
            local.copy_(buf, non_blocking=buf.is_pinned())
        if buf.is_pinned():
            torch.accelerator.synchronize(local.device)


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
# Checksums.
# ---------------------------------------------------------------------------------------------
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


class HashingWriter:
    """A write-only file wrapper that checksums and counts what passes through it.

    A big buffer is hashed on a helper thread while it is written (same bytes, same order).
    """

    def __init__(self, f: IO[bytes]) -> None:
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


@dataclass
class FileDigest:
    """What the commit marker records of each file."""

    size: int
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "checksum": self.checksum}


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
    expected_checksum: str | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file into torch (one sequential read of the data).

    Every tensor gets a buffer of its own (storage offset 0, as safetensors' own loader gives):
    some torch APIs, e.g. ``torch.set_rng_state``, ignore a view's storage offset.
    With ``keys`` only those tensors are read. With ``expected_checksum`` (whole-file reads
    only) the bytes are checked and a mismatch raises CorruptCheckpointError naming the file.
    """
    header = read_safetensors_header(f, name=name, file_size=file_size)
    wanted = list(header.entries) if keys is None else [k for k in keys if k in header.entries]
    out: dict[str, torch.Tensor] = {}
    if keys is None:
        data_size = file_size - header.data_start
        checksum = Checksum() if expected_checksum is not None else None
        hasher = _OrderedHasher(checksum) if checksum is not None else None
        if checksum is not None:
            checksum.update(header.header_bytes)
        on_chunk = hasher.update if hasher is not None else None
        raw: dict[str, torch.Tensor] = {}
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
        if checksum is not None and checksum.hexdigest() != expected_checksum:
            raise CorruptCheckpointError(
                f"{name}: checksum mismatch (expected {expected_checksum}, got {checksum.hexdigest()})", path=name
            )
        for key in wanted:
            out[key] = _view(raw[key], header.entries[key])
        return out
    for key in wanted:
        entry = header.entries[key]
        begin, end = entry["data_offsets"]
        f.seek(header.data_start + begin)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            _readinto(f, buf, name=name)
        out[key] = _view(buf, entry)
    return out


def map_safetensors(
    path: str, *, name: str, keys: Iterable[str] | None = None, expected_checksum: str | None = None
) -> dict[str, torch.Tensor]:
    """Tensors backed by a private memory map of a local safetensors file (nothing copied).

    Pages come from the page cache when first touched and are shared with every process that
    maps the file; writes to the tensors stay private (copy-on-write). With ``expected_checksum``
    every byte is hashed first (which brings every page in), else nothing is read until used.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = read_safetensors_header(f, name=name, file_size=size)
        # no MAP_POPULATE: on a writable private map it copies every page (0.48 s per GiB here)
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if expected_checksum is not None:
        checksum = Checksum()
        mapped.madvise(mmap.MADV_SEQUENTIAL)  # read ahead hard while hashing (a cold file)
        with memoryview(mapped) as view:
            for start in range(0, size, READ_CHUNK):
                checksum.update(view[start : start + READ_CHUNK])
        mapped.madvise(mmap.MADV_NORMAL)
        if checksum.hexdigest() != expected_checksum:
            mapped.close()
            raise CorruptCheckpointError(
                f"{name}: checksum mismatch (expected {expected_checksum}, got {checksum.hexdigest()})", path=name
            )
    out: dict[str, torch.Tensor] = {}
    for key in list(header.entries) if keys is None else [k for k in keys if k in header.entries]:
        entry = header.entries[key]
        begin, end = entry["data_offsets"]
        raw = (
            torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=header.data_start + begin)
            if end > begin
            else torch.empty(0, dtype=torch.uint8)
        )
        out[key] = _view(raw, entry)  # each tensor holds the mapping open; it closes with the last one
    return out


def _view(raw: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    dtype = DTYPE_TO_TORCH[entry["dtype"]]
    shape = torch_shape(entry["dtype"], entry["shape"]) or []
    if raw.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return raw.view(dtype).reshape(shape)


READ_CHUNK = 64 << 20  # a checksummed read hands its bytes to the hasher in pieces this big


class _OrderedHasher:
    """Feeds a Checksum on a helper thread, strictly in order, while the caller reads the next bytes."""

    def __init__(self, checksum: Checksum) -> None:
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
