"""Shards of global tensors: DTensors (FSDP2, tensor parallel) and framework-neutral slices.

A rank that holds part of a tensor saves only that part. This module turns the value a rank
holds into (local tensor, global shape, offsets), the one description the planner, the writers
and the resharding loader share, and computes where a box of a tensor lies in its row-major
bytes. Nothing here talks to other ranks: no collective runs on the training path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Shard:
    """A rank's slice of a global tensor: ``local == global[offsets[d] : offsets[d] + local.shape[d]]``.

    For actors that hold a slice without torch.distributed (any Ray actor can save its part of a
    tensor this way); DTensors describe themselves and need no wrapper.
    """

    local: Any  # torch.Tensor or np.ndarray
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = tuple(self.local.shape)
        global_shape = tuple(int(d) for d in self.global_shape)
        offsets = tuple(int(o) for o in self.offsets)
        object.__setattr__(self, "global_shape", global_shape)
        object.__setattr__(self, "offsets", offsets)
        if not (len(shape) == len(global_shape) == len(offsets)):
            raise ValueError(
                f"Shard: local shape {list(shape)}, global_shape {list(global_shape)} and offsets "
                f"{list(offsets)} must have the same number of dimensions"
            )
        for d, (n, g, o) in enumerate(zip(shape, global_shape, offsets, strict=True)):
            if o < 0 or g < 0 or o + n > g:
                raise ValueError(f"Shard: dimension {d}: offset {o} + local size {n} lies outside the global size {g}")


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a torch.distributed DTensor (without importing torch.distributed eagerly)."""
    if not isinstance(value, torch.Tensor) or type(value) is torch.Tensor:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(value, DTensor)


def local_part(value: Any, *, key: str = "?") -> tuple[Any, tuple[int, ...] | None, tuple[int, ...] | None]:
    """(local data, global shape, offsets) of a value; global shape and offsets are None for a whole tensor.

    A DTensor gives its local shard and the box it covers (``Replicate`` placements cover the whole
    tensor, so replicated copies are recognised as such and written once). ``Partial`` placements
    hold unreduced values and are refused: reduce them first.
    """
    if isinstance(value, Shard):
        return value.local, value.global_shape, value.offsets
    if not is_dtensor(value):
        return value, None, None
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(p, Partial) for p in value.placements):
        raise TypeError(f"{key}: a DTensor with Partial placements holds unreduced values; reduce it before saving")
    local = value.to_local()
    shape, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    if tuple(shape) != tuple(local.shape):
        raise ValueError(f"{key}: the DTensor's local shard {list(local.shape)} does not match its placement {shape}")
    return local, tuple(int(d) for d in value.shape), tuple(int(o) for o in offsets)


def box_runs(
    global_shape: tuple[int, ...], offsets: tuple[int, ...], shape: tuple[int, ...], itemsize: int
) -> tuple[np.ndarray, int]:
    """Where a box of a row-major tensor lies in its bytes: (run start offsets, run length).

    The box's own bytes, in row-major order, are the runs one after another (run ``i`` is bytes
    ``[i * length, (i + 1) * length)`` of the box). A dim-0 shard is one run; a dim-1 shard of an
    ``[m, n]`` tensor is ``m`` runs. Empty boxes have no runs.
    """
    if any(n == 0 for n in shape):
        return np.zeros(0, dtype=np.int64), 0
    ndim = len(global_shape)
    partial = [d for d in range(ndim) if shape[d] != global_shape[d]]
    if not partial:
        return np.zeros(1, dtype=np.int64), math.prod(global_shape) * itemsize
    j = partial[-1]
    strides = [math.prod(global_shape[d + 1 :]) * itemsize for d in range(ndim)]
    length = shape[j] * strides[j]
    starts = np.full((), offsets[j] * strides[j], dtype=np.int64)
    for d in range(j):
        axis = (offsets[d] + np.arange(shape[d], dtype=np.int64)) * strides[d]
        starts = np.add.outer(starts, axis) if starts.ndim else starts + axis
    return starts.reshape(-1), length


def box_view(full: np.ndarray, global_shape: tuple[int, ...], offsets: tuple[int, ...], shape: tuple[int, ...]) -> Any:
    """The box ``offsets : offsets + shape`` of a flat uint8 buffer holding a whole row-major tensor."""
    itemsize = full.nbytes // max(1, math.prod(global_shape)) if math.prod(global_shape) else 1
    grid = full.reshape(*global_shape, itemsize)
    return grid[tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))]


def copy_overlap(
    dst: np.ndarray,
    dst_offsets: tuple[int, ...],
    dst_shape: tuple[int, ...],
    src: np.ndarray,
    src_offsets: tuple[int, ...],
    src_shape: tuple[int, ...],
    itemsize: int,
) -> int:
    """Copy where two boxes of one tensor overlap, from ``src``'s bytes to ``dst``'s; the elements copied.

    ``dst`` and ``src`` are flat uint8 buffers holding their boxes in row-major order (a rank's
    shard, a target's local part); offsets are in the global tensor. Used to reshard from memory.
    """
    lo = [max(a, b) for a, b in zip(dst_offsets, src_offsets, strict=True)]
    hi = [min(a + n, b + m) for a, n, b, m in zip(dst_offsets, dst_shape, src_offsets, src_shape, strict=True)]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        return 0
    out = dst.reshape(*dst_shape, itemsize)
    inp = src.reshape(*src_shape, itemsize)
    out_box = tuple(slice(lo_ - o, h - o) for lo_, h, o in zip(lo, hi, dst_offsets, strict=True))
    in_box = tuple(slice(lo_ - o, h - o) for lo_, h, o in zip(lo, hi, src_offsets, strict=True))
    np.copyto(out[out_box], inp[in_box])
    return math.prod(h - lo_ for lo_, h in zip(lo, hi, strict=True))
