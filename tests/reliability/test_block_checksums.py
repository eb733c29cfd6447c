"""Every byte a load returns is checked against the block digests its writer recorded.

A step is saved by two in-process "ranks" through the same plan/write/finish protocol the
checkpointer drives (direct mode: each rank writes its own files and its ranges of the shared
files), holding a whole tensor, a dim-0 chunked and a dim-1 chunked tensor and sharded trainer
state. One byte is flipped in each, locally and on loopback S3, and the step is read every way:
whole, by keys, into tensors and Shards (resharded), mmap, trainer state, verify, copies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ray_ckpt import CheckpointConfig, CheckpointStore, CorruptCheckpointError, Shard
from ray_ckpt.core.format.digests import Checksum, merge_files
from ray_ckpt.core.format.header import read_safetensors_header
from ray_ckpt.core.format.tree import flatten_state
from ray_ckpt.core.layout import MARKER_FILE, TRAINER_STATE_JSON, step_dir
from ray_ckpt.core.planner import MODEL, TRAINER, describe
from ray_ckpt.core.storage.storage import Storage
from ray_ckpt.core.writer import StepWriter, copy_checked, write_share
from ray_ckpt.tiers.tiered import TieredCheckpointStore

torch.manual_seed(0)
WHOLE = torch.randn(40, 24)  # held whole by rank 0
ROWS = torch.randn(4096, 96)  # dim-0 halves: 1.5 MiB, several 4 KiB... blocks of 4 MiB: one block per chunk
COLS = torch.randn(512, 2048)  # dim-1 halves: 512 strided runs per chunk, 2 MiB per chunk
MOMENT = torch.randn(4096, 96)  # trainer state, dim-0 halves


def rank_state(rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    half = slice(rank * 2048, (rank + 1) * 2048)
    model: dict[str, Any] = {
        "rows": Shard(ROWS[half].clone(), ROWS.shape, (rank * 2048, 0)),
        "cols": Shard(COLS[:, rank * 1024 : (rank + 1) * 1024].clone(), COLS.shape, (0, rank * 1024)),
    }
    if rank == 0:
        model["whole"] = WHOLE.clone()
    trainer = {"exp_avg": Shard(MOMENT[half].clone(), MOMENT.shape, (rank * 2048, 0))}
    return model, trainer


def save_two_ranks(
    store: CheckpointStore, step: int, *, mode: str = "direct", states: Callable[[int], tuple] = rank_state
) -> list[str]:
    """Save ``step`` as two ranks would (plan, each rank's share, the master's finish); returns the
    paths the master opened for reading between the ranks' writes and the commit."""
    flats = {}
    for rank in (0, 1):
        model, trainer = states(rank)
        flats[rank] = {MODEL: flatten_state(model), TRAINER: flatten_state(trainer)}
    states = {r: {p: describe(f) for p, f in fl.items()} for r, fl in flats.items()}

    def source(part: str, key: str, rank: int) -> np.ndarray:
        return flats[rank][part].tensors[key].data

    with StepWriter(store, step) as writer:
        plan = writer.plan(states, mode=mode)
        results = [write_share(store.storage, plan.share(r), r, source) for r in (0, 1)] if mode == "direct" else []
        opened: list[str] = []
        storage = type(store.storage)
        real_open, real_read = storage.open_read, storage.read_bytes

        def open_read(self: Storage, path: str, *args: Any, **kwargs: Any) -> Any:
            opened.append(path)
            return real_open(self, path, *args, **kwargs)

        def read_bytes(self: Storage, path: str, *args: Any, **kwargs: Any) -> Any:
            opened.append(path)
            return real_read(self, path, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(storage, "open_read", open_read)
            patch.setattr(storage, "read_bytes", read_bytes)
            writer.write_share(plan, source)
            writer.add_files(merge_files(results))
            writer.seal_shared(plan)
            writer.write_indexes(plan)
            writer.commit(world_size=2)
    return opened


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    if request.param == "local":
        return CheckpointStore(str(tmp_path), run_name="run")
    uri, options = request.getfixturevalue("s3_bucket")
    return CheckpointStore(uri, run_name="run", storage_options=options)


def file_of(store: CheckpointStore, step: int, key: str) -> str:
    """The step file (relative to the step directory) that holds tensor ``key``."""
    index = json.loads(store.storage.read_bytes(f"{step_dir(step)}/model.safetensors.index.json"))
    if key in index["weight_map"]:
        return index["weight_map"][key]
    trainer = json.loads(store.storage.read_bytes(f"{step_dir(step)}/{TRAINER_STATE_JSON}"))
    return trainer["weight_map"][key]


def flip(store: CheckpointStore, step: int, key: str, element: int) -> tuple[str, int]:
    """Flip one byte of element ``element`` (row-major) of tensor ``key``; its file and file offset."""
    name = file_of(store, step, key)
    path = f"{step_dir(step)}/{name}"
    data = bytearray(store.storage.read_bytes(path))
    with store.storage.open_read(path) as f:
        header = read_safetensors_header(f, name=path, file_size=len(data))
    offset = header.data_start + header.entries[key]["data_offsets"][0] + element * 4
    data[offset] ^= 0x40
    store.storage.write_bytes(path, bytes(data))
    return name, offset


def test_a_direct_mode_save_records_every_chunk_and_the_master_reads_no_shard_back(store: CheckpointStore) -> None:
    opened = save_two_ranks(store, 1)
    assert not [p for p in opened if p.endswith(".safetensors")], opened  # nothing read back to checksum it
    marker = json.loads(store.storage.read_bytes(f"{step_dir(1)}/{MARKER_FILE}"))
    records = {k: v for f in marker["files"].values() if "blocks" in f for k, v in f["blocks"]["tensors"].items()}
    assert len(records["cols"]) == 2 and {tuple(c["offsets"]) for c in records["cols"]} == {(0, 0), (0, 1024)}
    assert all(len(c["blocks"]) == 16 for c in records["cols"])  # one digest per chunk, not one per row
    assert records["whole"] == [{"blocks": records["whole"][0]["blocks"]}]
    out = store.load(1)
    for key, want in (("whole", WHOLE), ("rows", ROWS), ("cols", COLS)):
        assert torch.equal(out[key], want), key
    store.verify(1)
    # Resharded 2 -> 3 with verification (uneven boxes cut through blocks and chunks).
    for rank in range(3):
        lo, hi = rank * 4096 // 3, (rank + 1) * 4096 // 3
        rows, cols = torch.empty(hi - lo, 96), torch.empty(512, 683 if rank < 2 else 682)
        col0 = rank * 683
        store.load(1, into={"rows": Shard(rows, ROWS.shape, (lo, 0)), "cols": Shard(cols, COLS.shape, (0, col0))})
        assert torch.equal(rows, ROWS[lo:hi]) and torch.equal(cols, COLS[:, col0 : col0 + cols.shape[1]])
        moment = torch.empty(hi - lo, 96)
        store.load_trainer_state(1, into={"exp_avg": Shard(moment, MOMENT.shape, (lo, 0))})
        assert torch.equal(moment, MOMENT[lo:hi])


def test_big_dim0_chunks_go_to_disk_with_o_direct_around_unaligned_edges(tmp_path: Path) -> None:
    """Chunks of 18 MB whose boundaries fall on no 4 KiB page: each rank writes the aligned middle of
    its range with O_DIRECT and the edges through the page cache; the file is bit-exact."""
    big = torch.randn(3_000_001, 3)  # 12-byte rows: the rank boundary is at no page boundary

    def halves(rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
        rows = slice(0, 1_500_000) if rank == 0 else slice(1_500_000, None)
        return {"big": Shard(big[rows].clone(), big.shape, (rows.start, 0))}, {}

    store = CheckpointStore(str(tmp_path), run_name="run")
    save_two_ranks(store, 1, states=halves)
    assert torch.equal(store.load(1)["big"], big)
    store.verify(1)


READS: dict[str, Callable[[CheckpointStore, str], Any]] = {
    "load": lambda s, key: s.load(1),
    "load(keys)": lambda s, key: s.load(1, keys=[key]),
    "load(into=tensor)": lambda s, key: s.load(
        1, into={key: torch.empty(dict(whole=WHOLE, rows=ROWS, cols=COLS)[key].shape)}
    ),
    "load(into=Shard)": lambda s, key: (
        s.load(1, into={key: Shard(torch.empty(512, 1024), COLS.shape, (0, 512))})
        if key == "cols"
        else s.load(
            1,
            into={
                key: Shard(
                    torch.empty(20, 24 if key == "whole" else 96),
                    (40, 24) if key == "whole" else ROWS.shape,
                    (20, 0) if key == "whole" else (2040, 0),
                )
            },
        )
    ),
    "verify": lambda s, key: s.verify(1),
}


@pytest.mark.parametrize("key,element", [("whole", 20 * 24 + 3), ("rows", 2040 * 96 + 5), ("cols", 300 * 2048 + 700)])
def test_one_flipped_byte_is_caught_by_every_read_naming_file_key_and_range(
    store: CheckpointStore, key: str, element: int
) -> None:
    save_two_ranks(store, 1)
    name, offset = flip(store, 1, key, element)
    for how, read in READS.items():
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as caught:
            read(store, key)
        message = str(caught.value)
        assert name in message and repr(key) in message, (how, message)
        first, last = (int(x) for x in message.split("bytes ")[1].split(" ")[0].rstrip(",").split("-"))
        assert first <= offset < last, (how, message)
    if store.storage.is_local:
        with pytest.raises(CorruptCheckpointError, match=f"{name}.*checksum mismatch in tensor {key!r}"):
            store.load(1, mmap=True)
    # The other tensors of the step still load, and so does a box of the same tensor far from the flip.
    others = [k for k in ("whole", "rows", "cols") if k != key]
    got = store.load(1, keys=others)
    assert all(torch.equal(got[k], dict(whole=WHOLE, rows=ROWS, cols=COLS)[k]) for k in others)
    if key == "rows":
        far = torch.empty(1000, 96)
        store.load(1, into={"rows": Shard(far, ROWS.shape, (3000, 0))})  # another rank's chunk: not touched
        assert torch.equal(far, ROWS[3000:4000])


def test_a_flipped_trainer_state_byte_is_caught(store: CheckpointStore) -> None:
    save_two_ranks(store, 1)
    name, _ = flip(store, 1, "exp_avg", 3000 * 96)
    with pytest.raises(CorruptCheckpointError, match=f"{name}: checksum mismatch in tensor 'exp_avg'"):
        store.load_trainer_state(1, into={"exp_avg": Shard(torch.empty(1096, 96), MOMENT.shape, (3000, 0))})
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in tensor 'exp_avg'"):
        store.load_trainer_state(1)
    moment = torch.empty(2048, 96)  # rank 0's rows: another chunk, still loads
    store.load_trainer_state(1, into={"exp_avg": Shard(moment, MOMENT.shape, (0, 0))})
    assert torch.equal(moment, MOMENT[:2048])
    assert torch.equal(store.load(1)["rows"], ROWS)  # the model is intact


def test_verify_on_load_false_is_the_explicit_way_to_skip_the_check(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), run_name="run", verify_on_load=False)
    save_two_ranks(store, 1)
    flip(store, 1, "rows", 10)
    assert not torch.equal(store.load(1)["rows"], ROWS)  # returned as stored, as documented
    with pytest.raises(CorruptCheckpointError):
        store.verify(1)


def test_copies_check_every_block_and_keep_no_damaged_copy(store: CheckpointStore, tmp_path: Path) -> None:
    save_two_ranks(store, 1)
    name = file_of(store, 1, "cols")
    digest = store.read_manifest(1).files[name]
    dst = Storage(str(tmp_path / "copy"))
    assert copy_checked(store.storage, f"{step_dir(1)}/{name}", dst, name, digest) == digest
    flip(store, 1, "cols", 100 * 2048 + 1500)
    with pytest.raises(CorruptCheckpointError, match=f"{name}: checksum mismatch in tensor 'cols'.*removed"):
        copy_checked(store.storage, f"{step_dir(1)}/{name}", dst, "again", digest)
    assert not dst.exists("again")


def test_the_tiered_store_checks_the_remote_copy_it_falls_back_to(tmp_path: Path) -> None:
    config = CheckpointConfig(
        storage_uri=str(tmp_path / "local"), remote_uri=f"file://{tmp_path / 'remote'}", run_name="run"
    )
    store = TieredCheckpointStore(config)
    store.save(1, {"w": ROWS})
    assert sorted(store.wait_for_uploads(30)) == [1]
    store.local.delete(1)
    remote = CheckpointStore(f"file://{tmp_path / 'remote'}", run_name="run")
    flip(remote, 1, "w", 77)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors: checksum mismatch in tensor 'w'"):
        store.load(1)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in tensor 'w'"):
        store.load(1, into={"w": torch.empty(ROWS.shape)})
    store.close()


def _as_version_1(store: CheckpointStore, step: int) -> None:
    """Rewrite a step's marker as versions before block digests wrote it (a whole-file checksum each)."""
    path = f"{step_dir(step)}/{MARKER_FILE}"
    marker = json.loads(store.storage.read_bytes(path))
    for name, entry in marker["files"].items():
        checksum = Checksum()
        checksum.update(store.storage.read_bytes(f"{step_dir(step)}/{name}"))
        marker["files"][name] = {"size": entry["size"], "checksum": checksum.hexdigest()}
    marker["format_version"] = 1
    store.storage.write_bytes(path, json.dumps(marker).encode())


def test_steps_written_before_block_digests_load_and_ranged_loads_check_the_whole_file(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), run_name="run")
    save_two_ranks(store, 1)
    _as_version_1(store, 1)
    store.reload()
    assert torch.equal(store.load(1)["cols"], COLS)
    assert torch.equal(store.load(1, keys=["rows"])["rows"], ROWS)
    box = torch.empty(100, 96)
    store.load(1, into={"rows": Shard(box, ROWS.shape, (5, 0))})
    assert torch.equal(box, ROWS[5:105])
    store.verify(1)
    name, _ = flip(store, 1, "rows", 4000 * 96)  # far from the box: the whole file is hashed all the same
    with pytest.raises(CorruptCheckpointError, match=f"{name}: checksum mismatch"):
        store.load(1, into={"rows": Shard(box, ROWS.shape, (5, 0))})
    with pytest.raises(CorruptCheckpointError, match=f"{name}: checksum mismatch"):
        store.load(1, keys=["rows"])


def _edit_blocks(store: CheckpointStore, edit: Callable[[dict[str, Any]], None]) -> str:
    path = f"{step_dir(1)}/{MARKER_FILE}"
    marker = json.loads(store.storage.read_bytes(path))
    name = file_of(store, 1, "cols")
    edit(marker["files"][name]["blocks"])
    store.storage.write_bytes(path, json.dumps(marker).encode())
    return name


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "a block digest too few": (lambda b: b["tensors"]["cols"][0].update(blocks=""), "0 block digests recorded"),
    "a block digest too many": (
        lambda b: b["tensors"]["cols"][0].update(blocks=b["tensors"]["cols"][0]["blocks"] * 2),
        "2 block digests recorded",
    ),
    "overlapping chunks": (lambda b: b["tensors"]["cols"][1].update(offsets=[0, 0]), "exactly once"),
    "a chunk missing": (lambda b: b["tensors"]["cols"].pop(), "exactly once"),
    "a box outside the tensor": (lambda b: b["tensors"]["cols"][1].update(offsets=[0, 2**40]), "lies outside"),
    "a box of absurd size": (lambda b: b["tensors"]["cols"][1].update(shape=[2**62, 2**62]), "lies outside"),
    "a block size of a terabyte": (lambda b: b.update(block_size=2**40), "block_size"),
    "a block size of 1 byte": (lambda b: b.update(block_size=1), "block_size"),
    "digests for a tensor the file lacks": (lambda b: b["tensors"].update(ghost=[{"blocks": ""}]), "ghost"),
    "no digests for a tensor": (lambda b: b["tensors"].pop("cols"), "no block digests"),
    "not hex": (lambda b: b["tensors"]["cols"][0].update(blocks="z" * 16), "hex"),
    "a header digest of the wrong length": (lambda b: b.update(header="00"), "header"),
    "a box of the wrong rank": (lambda b: b["tensors"]["cols"][0].update(offsets=[0], shape=[512]), "outside"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_digest_lists_are_clear_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    store = CheckpointStore(str(tmp_path), run_name="run")
    save_two_ranks(store, 1)
    edit, says = HOSTILE[case]
    name = _edit_blocks(store, edit)
    reads = [
        lambda: store.load(1, keys=["cols"]),
        lambda: store.load(1, into={"cols": Shard(torch.empty(512, 100), COLS.shape, (0, 1000))}),
        lambda: store.verify(1),
    ]
    for read in reads:
        with pytest.raises(CorruptCheckpointError, match=says) as caught:
            read()
        assert name in str(caught.value) or "checkpoint.json" in str(caught.value)
    assert os.path.exists(tmp_path)  # nothing else happened: no crash, no huge allocation
