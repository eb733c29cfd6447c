"""Nested state <-> flat tensors + a JSON structure (no pickle): flattening, rebuilding, and the
validation of a structure read from storage."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ray_ckpt.core.format.buffers import TensorBuffer, to_buffer
from ray_ckpt.core.format.header import RESERVED_KEY
from ray_ckpt.core.shard import Shard, is_dtensor


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
