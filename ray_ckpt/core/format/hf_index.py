"""Shard planning and the Hugging Face index (``*.safetensors.index.json``): file names, which key
goes in which shard, and the index's bytes, written and parsed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ray_ckpt.core.safejson import JsonObject, corrupt

INDEX_SUFFIX = ".index.json"


_PLAIN_FILE_RE = re.compile(r"[^/\\\x00]+")


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
