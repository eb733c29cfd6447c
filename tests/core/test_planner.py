"""The save planner: descriptions -> one frozen plan; bad descriptions refused naming key and ranks."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_ckpt import CheckpointStore, Shard
from ray_ckpt.core.format.tree import flatten_state
from ray_ckpt.core.planner import MASTER, MODEL, SHARED, TRAINER, RankState, TensorMeta, describe, plan_save
from ray_ckpt.core.shard import box_runs, box_view


def shard_meta(global_shape: tuple[int, ...], offsets: tuple[int, ...], shape: tuple[int, ...]) -> TensorMeta:
    return TensorMeta("F32", shape, math.prod(shape) * 4, None, global_shape, offsets)


def rows(rank: int, world: int, n: int = 8, m: int = 6) -> TensorMeta:
    per = -(-n // world)
    start = min(n, rank * per)
    return shard_meta((n, m), (start, 0), (min(n, start + per) - start, m))


def plan_of(states: dict[int, dict[str, TensorMeta]], **kwargs: object) -> object:
    options = {"directory": "d", "mode": "direct", "max_shard_size": 1 << 20, **kwargs}
    return plan_save(1, {r: {MODEL: RankState(t)} for r, t in states.items()}, **options)  # type: ignore[arg-type]


def test_row_shards_plan_one_shared_file_each_rank_writing_its_rows() -> None:
    plan = plan_of({r: {"w": rows(r, 3), f"own{r}": TensorMeta("F32", (2,), 8)} for r in range(3)})
    part = plan.parts[MODEL]
    assert [f.writer for f in part.files] == [0, 1, 2, SHARED]  # each rank's own file, then the shared one
    layout = part.tensors["w"]
    assert [c.offsets for c in layout.chunks] == [(0, 0), (3, 0), (6, 0)]  # uneven: 3, 3, 2 rows
    assert [len(plan.pieces(r)) for r in range(3)] == [1, 1, 1] and not plan.sends(0)
    assert plan.streams(1) == [(part, part.files[1])]
    gathered = plan_of({r: {"w": rows(r, 3)} for r in range(3)}, mode="gather")
    assert all(f.writer == MASTER for f in gathered.parts[MODEL].files) and gathered.idle(2)
    remote = plan_of({r: {"w": rows(r, 3)} for r in range(3)}, local_storage=False)
    assert remote.parts[MODEL].files[0].writer == MASTER and remote.sends(2) == [(MODEL, "w")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.step = 2  # type: ignore[misc]


def test_replicated_boxes_are_one_chunk_written_once_and_compared() -> None:
    whole = shard_meta((4, 4), (0, 0), (4, 4))  # e.g. a Replicate() placement
    plan = plan_of({0: {"e": whole}, 1: {"e": whole}})
    (chunk,) = plan.parts[MODEL].tensors["e"].chunks
    assert chunk.ranks == (0, 1) and plan.replicas(1) == [(MODEL, "e")]
    assert plan.parts[MODEL].files[0].writer == 0  # one writer: rank 0 streams it


def test_share_holds_only_what_the_rank_needs() -> None:
    plan = plan_of({r: {"w": rows(r, 2), f"own{r}": TensorMeta("F32", (2,), 8)} for r in range(2)})
    share = plan.share(1)
    assert set(share.parts[MODEL].tensors) == {"w", "own1"}
    assert [f.name for _, f in share.streams(1)] == [f.name for _, f in plan.streams(1)]
    assert share.pieces(1)[0][2] == plan.pieces(1)[0][2]


@pytest.mark.parametrize(
    ("states", "says"),
    [
        ({0: {"w": rows(0, 2)}, 1: {"w": shard_meta((9, 6), (4, 0), (4, 6))}}, r"key 'w': ranks 0 and 1 disagree"),
        (
            {0: {"w": rows(0, 2)}, 1: {"w": shard_meta((8, 6), (3, 0), (5, 6))}},
            r"key 'w': the chunks of ranks \[0\].*overlap",
        ),
        ({0: {"w": rows(0, 2)}}, r"key 'w': the chunks of ranks \[0\] cover 24 of the 48 elements"),
        (
            {0: {"w": rows(0, 2)}, 1: {"w": TensorMeta("F16", (4, 6), 48, None, (8, 6), (4, 0))}},
            r"F32\[8, 6\] vs F16\[8, 6\]",
        ),
    ],
    ids=["global shape", "overlap", "missing", "dtype"],
)
def test_inconsistent_shards_are_refused_naming_key_and_ranks(states: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        plan_of(states)


def test_trainer_structure_must_agree_across_ranks() -> None:
    a = describe(flatten_state({"step": 1, "m": torch.ones(2)}))
    b = describe(flatten_state({"step": 2, "m": torch.ones(2)}))
    with pytest.raises(ValueError, match="trainer_state: ranks 0 and 1 pass differently nested state"):
        plan_save(
            1,
            {0: {MODEL: None, TRAINER: a}, 1: {MODEL: None, TRAINER: b}},
            directory="d",
            mode="gather",
            max_shard_size=1 << 20,
        )


@pytest.mark.parametrize(
    "shape,offsets,box",
    [((8, 6), (2, 0), (3, 6)), ((8, 6), (0, 2), (8, 3)), ((4, 5, 6), (1, 2, 3), (2, 2, 2)), ((7,), (3,), (4,))],
)
def test_box_runs_match_numpy_slicing(shape: tuple, offsets: tuple, box: tuple) -> None:
    full = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    raw = full.view(np.uint8).reshape(-1)
    starts, length = box_runs(shape, offsets, box, 4)
    got = np.concatenate([raw[s : s + length] for s in starts]).view(np.float32).reshape(box)
    want = full[tuple(slice(o, o + n) for o, n in zip(offsets, box, strict=True))]
    assert np.array_equal(got, want)
    assert np.array_equal(box_view(raw.copy(), shape, offsets, box).reshape(-1).view(np.float32).reshape(box), want)


def test_a_single_process_saves_and_reshards_framework_neutral_shards(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), run_name="run")
    full = torch.arange(48.0).reshape(8, 6)
    with pytest.raises(ValueError, match="cover 24 of the 48 elements"):
        store.save(1, {"w": Shard(full[:4].clone(), (8, 6), (0, 0))})
    assert store.list() == []  # nothing committed
    store.save(1, {"w": full})
    left, right = Shard(torch.zeros(8, 2), (8, 6), (0, 4)), Shard(torch.zeros(3, 6), (8, 6), (5, 0))
    store.load(1, into={"w": left})
    store.load(1, into={"w": right})
    assert torch.equal(left.local, full[:, 4:]) and torch.equal(right.local, full[5:])
    with pytest.raises(ValueError, match=r"w: the checkpoint holds F32\[8, 6\], the target is F32\[8, 7\]"):
        store.load(1, into={"w": Shard(torch.zeros(8, 1), (8, 7), (0, 6))})
    with pytest.raises(ValueError, match="outside the global size"):
        Shard(torch.zeros(4, 6), (8, 6), (5, 0))
