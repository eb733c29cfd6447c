"""The safetensors header: the layout a writer gives a file and the validating parser of a read one.

Apart from the file I/O (:mod:`ray_ckpt.core.format.safetensors_io`) because the checksum checks
(:mod:`ray_ckpt.core.format.checks`) parse headers too, and the I/O uses the checks.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from ray_ckpt.core.format.buffers import DTYPE_SIZE, TensorBuffer, header_shape, torch_shape
from ray_ckpt.core.safejson import JsonObject, corrupt, parse_json

MAX_HEADER_SIZE = 100 * 1024 * 1024  # safetensors' own limit


MAX_DIM = 2**62  # a dimension beyond this cannot describe bytes on any disk


MAX_TENSOR_BYTES = 2**63 - 1  # torch sizes and strides are int64: every shape must be allocatable


RESERVED_KEY = "__metadata__"  # safetensors keeps the header's metadata under this name


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
