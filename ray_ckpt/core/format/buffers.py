"""Tensors as raw bytes: the safetensors dtype tables and :class:`TensorBuffer`, the neutral,
zero-copy form in which tensors travel (through Ray's object store) and get written."""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ray_ckpt.core.shard import Shard, local_part


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
