"""Block digests: the records, their parsing (untrusted input), merging, and the streaming check."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import xxhash

from ray_ckpt import CorruptCheckpointError
from ray_ckpt.core.format.checks import FileCheck
from ray_ckpt.core.format.digests import (
    BLOCK_SIZE,
    BlockDigests,
    ChunkDigest,
    FileDigest,
    block_count,
    block_digests,
    merge_files,
)
from ray_ckpt.core.format.header import safetensors_layout
from ray_ckpt.core.format.safetensors_io import read_safetensors
from ray_ckpt.core.format.tree import flatten_state
from ray_ckpt.core.safejson import JsonObject


def test_block_digests_are_one_xxh3_per_block_the_last_one_short() -> None:
    data = np.arange(10_000, dtype=np.uint8)
    got = block_digests(data, 4096)
    assert len(got) == 16 * block_count(10_000, 4096) == 48
    assert got[32:] == xxhash.xxh3_64_hexdigest(data[8192:].tobytes())
    assert block_digests(np.zeros(0, dtype=np.uint8), 4096) == ""


def test_a_record_round_trips_through_json_and_merges_parts_of_one_file() -> None:
    header_part = FileDigest(100, None, BlockDigests(4096, "0" * 16, {}))
    rank0 = FileDigest(100, None, BlockDigests(4096, None, {"w": (ChunkDigest("a" * 16, (0, 0), (2, 4)),)}))
    rank1 = FileDigest(100, None, BlockDigests(4096, None, {"w": (ChunkDigest("b" * 16, (2, 0), (2, 4)),)}))
    merged = merge_files([{"f": header_part}, {"f": rank0}, {"f": rank1}, {"g": FileDigest(3, "xxh3_64:1")}])
    record = merged["f"]
    assert record.blocks.header == "0" * 16 and [c.offsets for c in record.blocks.tensors["w"]] == [(0, 0), (2, 0)]
    raw = json.loads(json.dumps(record.to_json()))
    assert FileDigest.parse(JsonObject(raw, name="m")) == record
    assert merged["g"] == FileDigest.parse(JsonObject({"size": 3, "checksum": "xxh3_64:1"}, name="m"))
    with pytest.raises(ValueError, match="two writers recorded its header"):
        header_part.merge(header_part, name="f")
    with pytest.raises(ValueError, match="block sizes"):
        rank0.merge(FileDigest(100, None, BlockDigests(8192)), name="f")


@pytest.mark.parametrize(
    "entry,says",
    [
        ({"size": 1}, "neither a checksum nor block digests"),
        ({"size": 1, "blocks": {"block_size": 4096, "header": "x" * 16, "tensors": {}}}, "hex"),
        ({"size": 1, "blocks": {"block_size": 100, "header": "0" * 16, "tensors": {}}}, "block_size"),
        ({"size": 1, "blocks": {"block_size": 4096, "header": "0" * 16, "tensors": {"w": []}}}, "1 to"),
        (
            {"size": 1, "blocks": {"block_size": 4096, "header": "0" * 16, "tensors": {"w": [{"blocks": "0" * 15}]}}},
            "hex",
        ),
        (
            {
                "size": 1,
                "blocks": {"block_size": 4096, "header": "0" * 16, "tensors": {"w": [{"blocks": "", "offsets": [0]}]}},
            },
            "shape",
        ),
        (
            {
                "size": 1,
                "blocks": {
                    "block_size": 4096,
                    "header": "0" * 16,
                    "tensors": {"w": [{"blocks": "", "offsets": [-1], "shape": [1]}]},
                },
            },
            "out of range",
        ),
    ],
)
def test_parsing_a_record_refuses_what_cannot_describe_a_file(entry: dict, says: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=says):
        FileDigest.parse(JsonObject(entry, name="checkpoint.json"))


def _file_and_record(block_size: int = 4096) -> tuple[bytes, FileDigest]:
    flat = flatten_state(
        {"a": np.arange(3000, dtype=np.float32), "b": np.arange(7, dtype=np.int64), "e": np.zeros((0, 3))}
    )
    header, order = safetensors_layout(flat.tensors, list(flat.tensors))
    blob = header + b"".join(flat.tensors[k].data.tobytes() for k in order)
    tensors = {k: (ChunkDigest(block_digests(flat.tensors[k].data, block_size)),) for k in order}
    digest = BlockDigests(block_size, xxhash.xxh3_64_hexdigest(header), tensors)
    return blob, FileDigest(len(blob), None, digest)


@pytest.mark.parametrize("piece", [1, 7, 4096, 5000, 1 << 20])
def test_a_file_streamed_in_any_pieces_is_checked_block_by_block(piece: int) -> None:
    blob, record = _file_and_record()
    check = FileCheck(record, name="f.safetensors")
    for start in range(0, len(blob), piece):
        check.update(blob[start : start + piece])
    check.finish()
    bad = bytearray(blob)
    bad[-9] ^= 1  # in 'b' (laid out after 'a': int64 before float32? the layout decides; any tensor will do)
    check = FileCheck(record, name="f.safetensors")
    with pytest.raises(CorruptCheckpointError, match=r"f.safetensors: checksum mismatch in tensor '\w', bytes \d+-\d+"):
        for start in range(0, len(bad), piece):
            check.update(bad[start : start + piece])
        check.finish()


def test_a_short_or_long_stream_is_damage() -> None:
    blob, record = _file_and_record()
    check = FileCheck(record, name="f")
    check.update(blob[:-1])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        check.finish()
    check = FileCheck(record, name="f")
    with pytest.raises(CorruptCheckpointError, match="longer than"):
        check.update(blob + b"x")


def test_reading_some_keys_checks_their_blocks_and_the_header() -> None:
    blob, record = _file_and_record()
    got = read_safetensors(io.BytesIO(blob), name="f", file_size=len(blob), keys=["b"], expected=record)
    assert got["b"].tolist() == list(range(7))
    assert BLOCK_SIZE % 4096 == 0
    wrong_header = FileDigest(record.size, None, BlockDigests(4096, "0" * 16, record.blocks.tensors))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in its header"):
        read_safetensors(io.BytesIO(blob), name="f", file_size=len(blob), keys=["b"], expected=wrong_header)


def test_a_forked_child_hashes_on_threads_of_its_own() -> None:
    """The parent's hashing threads do not survive a fork; the child's first big hash must not wait on them."""
    import os

    from ray_ckpt.core.format.digests import hash_pool

    assert hash_pool().submit(lambda: 1).result() == 1  # the parent's pool exists, its threads idle
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the pool answers
        code = 1
        try:
            code = 0 if hash_pool().submit(lambda: 2).result(timeout=20) == 2 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
