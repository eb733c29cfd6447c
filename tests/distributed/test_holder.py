"""The memory tier's parts on one real local Ray: a node's Holder actor, and the one read path.

The Holder runs as it does in a run (an async actor pinned to its node), without peers: its
budget and back-pressure, that it owns its copy (the caller's object can go), the digests it
takes, and its LRU cache of persisted steps for evaluators. The read path
(:func:`read_memory_into` / :func:`read_memory_state`) is driven with a hand-built
:class:`MemoryStep` whose copies are objects in the local object store: resharding into other
boxes, bit-exact; a corrupted copy; copies whose owner died (fallback, then MemoryStepLost).
Multi-node behaviour (replicas on peers, node loss) is in tests/integration.
"""

from __future__ import annotations

import gc
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

from ray_ckpt import CheckpointConfig, CheckpointStore, Shard
from ray_ckpt.core.errors import CorruptCheckpointError, SaveAbortedError
from ray_ckpt.core.format.buffers import TORCH_TO_DTYPE
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.planner import RankState, TensorMeta
from ray_ckpt.core.shard import copy_overlap
from ray_ckpt.distributed.holder import Holder, MemoryBudgetError, digest_arrays
from ray_ckpt.distributed.memory import (
    MemoryStep,
    MemoryStepLost,
    read_cached_state,
    read_memory_into,
    read_memory_state,
    ring_peers,
)
from ray_ckpt.distributed.wire import RankReport

pytestmark = pytest.mark.usefixtures("ray_session")

KB = 1000


def _holder(run_name: str, budget: int | None, eval_cache_bytes: int = 0) -> tuple[Any, str]:
    """A Holder on this node, started as the memory tier starts one (not detached, not named)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    handle = (
        ray.remote(Holder)
        .options(
            num_cpus=0,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        .remote(run_name, node, budget, eval_cache_bytes)
    )
    assert ray.get(handle.ping.remote(), timeout=600) == node
    return handle, node


def _state(nbytes: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    half = nbytes // 2
    return {"w": rng.integers(0, 256, half, dtype=np.uint8), "b": rng.integers(0, 256, nbytes - half, dtype=np.uint8)}


def _keep(holder: Any, step: int, arrays: dict[str, np.ndarray], timeout_s: float) -> Any:
    """What a rank's _run_memory sends: [model ref, None], its bytes, no peers."""
    nbytes = sum(a.nbytes for a in arrays.values())
    return holder.keep.remote(step, 0, [ray.put(arrays), None], nbytes, [], timeout_s)


# -- back-pressure ------------------------------------------------------------------------------
def test_a_keep_over_the_budget_waits_for_a_drop_then_fails_naming_node_and_budget(run_name: str) -> None:
    holder, node = _holder(run_name, budget=1000 * KB)
    ray.get(_keep(holder, 1, _state(600 * KB, 1), timeout_s=1), timeout=600)
    assert ray.get(holder.stats.remote())["bytes_held"] == 600 * KB

    started = time.monotonic()
    with pytest.raises(MemoryBudgetError) as err:
        ray.get(_keep(holder, 2, _state(600 * KB, 2), timeout_s=1), timeout=600)
    waited = time.monotonic() - started
    assert waited >= 0.9, waited  # it waited for frees up to its deadline
    assert node in str(err.value) and "1000000 byte budget" in str(err.value) and "step 2" in str(err.value)
    stats = ray.get(holder.stats.remote())
    assert (stats["bytes_held"], stats["steps"]) == (600 * KB, [1])  # the failed keep took nothing

    # a keep that waits is let in by a drop while it waits
    waiting = _keep(holder, 3, _state(600 * KB, 3), timeout_s=30)
    ready, _ = ray.wait([waiting], timeout=0.5)
    assert not ready  # still waiting for room
    assert ray.get(holder.drop.remote([1])) == 600 * KB
    receipt = ray.get(waiting, timeout=300)
    assert list(receipt["copies"]) == [node]
    stats = ray.get(holder.stats.remote())
    assert (stats["bytes_held"], stats["steps"]) == (600 * KB, [3])

    # after a drop, a keep that did not wait goes through at once
    ray.get(holder.drop.remote([3]))
    ray.get(_keep(holder, 4, _state(600 * KB, 4), timeout_s=1), timeout=600)

    # a state bigger than the whole budget fails at once, not at its deadline
    ray.get(holder.drop.remote([4]))
    started = time.monotonic()
    with pytest.raises(MemoryBudgetError, match=r"never fit") as err:
        ray.get(_keep(holder, 7, _state(1200 * KB, 7), timeout_s=30), timeout=600)
    assert time.monotonic() - started < 25.0  # its deadline is 30 s
    assert node in str(err.value) and "1000000" in str(err.value)
    assert ray.get(holder.stats.remote())["bytes_held"] == 0


def test_an_abort_racing_a_keep_leaves_no_copy_behind(run_name: str) -> None:
    """The checkpointer's drop of an aborted step can reach a holder while it takes (or its peer
    replicates) a copy of that step: the copy is released, never held for good."""
    holder, _ = _holder(run_name, budget=1000 * KB)
    peer, _ = _holder(run_name + "-peer", budget=1000 * KB)

    def held(h: Any) -> tuple[int, list[int]]:
        stats = ray.get(h.stats.remote())
        return stats["bytes_held"], stats["steps"]

    # the drop arrives while the keep waits for room: its copy is released once taken
    ray.get(_keep(holder, 1, _state(600 * KB, 1), timeout_s=1), timeout=600)
    waiting = _keep(holder, 2, _state(600 * KB, 2), timeout_s=30)
    assert not ray.wait([waiting], timeout=0.5)[0]
    ray.get(holder.drop.remote([1, 2]))
    with pytest.raises(SaveAbortedError, match=r"step 2 rank 0: the step was dropped \(aborted\)"):
        ray.get(waiting, timeout=300)
    assert held(holder) == (0, [])

    # the drop reaches the primary while its peer is still replicating: the peer's replica goes too
    ray.get(_keep(peer, 5, _state(600 * KB, 5), timeout_s=1), timeout=600)  # the peer is full for now
    arrays = _state(600 * KB, 6)
    keeping = holder.keep.remote(6, 0, [ray.put(arrays), None], 600 * KB, [peer], 30)
    deadline = time.monotonic() + 30
    while held(holder) != (600 * KB, [6]):  # the primary copy is taken; the replica waits for room
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ray.get(holder.drop.remote([6]))  # the abort's drop reached the primary only
    ray.get(peer.drop.remote([5]))  # room on the peer: the replica is made
    with pytest.raises(SaveAbortedError, match=r"step 6 was dropped \(aborted\) while its replicas were made"):
        ray.get(keeping, timeout=300)
    while held(peer) != (0, []):
        assert time.monotonic() < deadline, held(peer)
        time.sleep(0.05)
    assert held(holder) == (0, [])


def test_memory_steps_come_before_the_eval_cache_in_the_budget(tmp_path: Path, run_name: str) -> None:
    root = str(tmp_path / "runs")
    store = CheckpointStore(root, run_name=run_name)
    for step in (100, 200):
        store.save(step, {"w": torch.full((125_000,), float(step))})  # 500 KB each
    config = CheckpointConfig(storage_uri=root, run_name=run_name)
    holder, _ = _holder(run_name, budget=1000 * KB, eval_cache_bytes=1000 * KB)

    def stats() -> dict[str, Any]:
        return ray.get(holder.stats.remote())

    # the first read imports the holder's storage stack (slow on a loaded machine); it is cached
    ray.get(holder.cached.remote(100, config), timeout=600)
    assert stats()["cached_steps"] == [100]
    ray.get(_keep(holder, 1, _state(600 * KB, 1), timeout_s=1), timeout=600)  # evicts the cached step
    assert (stats()["cached_steps"], stats()["bytes_held"]) == ([], 600 * KB)
    # no room left for the cache: the evaluator gets its state at once, uncached
    started = time.monotonic()
    (ref,) = ray.get(holder.cached.remote(100, config), timeout=600)
    assert time.monotonic() - started < 10.0
    assert torch.equal(read_cached_state(ref)["w"], torch.full((125_000,), 100.0))
    assert (stats()["cached_steps"], stats()["bytes_held"]) == ([], 600 * KB)
    # with room, the step is cached; a memory save that needs the room evicts it at once
    ray.get(holder.drop.remote([1]))
    ray.get(holder.cached.remote(200, config), timeout=600)
    assert (stats()["cached_steps"], stats()["bytes_held"]) == ([200], 500 * KB)
    ray.get(_keep(holder, 2, _state(600 * KB, 2), timeout_s=1), timeout=600)
    assert (stats()["cached_steps"], stats()["bytes_held"], stats()["steps"]) == ([], 600 * KB, [2])


# -- the holder owns its copy -------------------------------------------------------------------
def test_the_holder_owns_its_copy_and_its_digests_are_the_datas(run_name: str) -> None:
    holder, node = _holder(run_name, budget=None)  # without a budget: half its node's object store
    (store,) = [n["Resources"]["object_store_memory"] for n in ray.nodes() if n["NodeID"] == node]
    assert ray.get(holder.stats.remote())["budget"] == int(store) // 2
    arrays = {"a": np.arange(50_000, dtype=np.float32), "b": np.full((300, 7), 3, dtype=np.int64)}
    theirs = ray.put(arrays)
    receipt = ray.get(holder.keep.remote(5, 0, [theirs, None], 200_000 + 300 * 7 * 8, [], 10), timeout=600)
    del theirs  # the rank's object goes (as when the rank dies)
    gc.collect()
    (model_ref, trainer_ref) = receipt["copies"][node]
    assert trainer_ref is None
    copy = ray.get(model_ref, timeout=300)
    assert set(copy) == {"a", "b"}
    for key, arr in arrays.items():
        assert copy[key].dtype == arr.dtype and copy[key].tobytes() == arr.tobytes()
    assert receipt["digests"] == {"model": digest_arrays(arrays)}
    inventory = ray.get(holder.inventory.remote())
    assert list(inventory["copies"]) == [(5, 0)]


# -- the evaluators' cache of persisted steps ---------------------------------------------------
def test_the_eval_cache_reads_a_persisted_step_once_and_evicts_the_least_recently_used(
    tmp_path: Path, run_name: str
) -> None:
    root = str(tmp_path / "runs")
    store = CheckpointStore(root, run_name=run_name)
    states = {
        step: {"w": torch.full((250, 100), float(step)), "b": torch.arange(100.0) + step} for step in (1, 2, 3, 4)
    }
    for step, state in states.items():
        store.save(step, state)
    step_bytes = 250 * 100 * 4 + 100 * 4
    config = CheckpointConfig(storage_uri=root, run_name=run_name)
    holder, _ = _holder(run_name, budget=10**8, eval_cache_bytes=int(2.5 * step_bytes))

    def cached(step: int) -> dict[str, torch.Tensor]:
        (ref,) = ray.get(holder.cached.remote(step, config), timeout=600)
        return read_cached_state(ref)

    def stats() -> dict[str, Any]:
        return ray.get(holder.stats.remote())

    first = cached(1)
    assert set(first) == {"w", "b"} and all(torch.equal(first[k], states[1][k]) for k in first)
    assert (stats()["cache_loads"], stats()["cached_steps"], stats()["bytes_held"]) == (1, [1], step_bytes)
    again = cached(1)  # served from the cache: no second storage read
    assert torch.equal(again["w"], states[1]["w"])
    assert stats()["cache_loads"] == 1

    cached(2)
    cached(1)  # step 1 is now the most recently used
    cached(3)  # the cap holds two steps: step 2, least recently used, goes
    assert (stats()["cache_loads"], stats()["cached_steps"]) == (3, [1, 3])
    assert stats()["bytes_held"] == 2 * step_bytes
    assert torch.equal(cached(2)["b"], states[2]["b"])  # read again from storage
    assert (stats()["cache_loads"], stats()["cached_steps"]) == (4, [3, 2])

    # evaluators asking for a step at the same time share one storage read
    refs = ray.get([holder.cached.remote(4, config) for _ in range(6)], timeout=600)
    assert all(torch.equal(read_cached_state(r[0])["w"], states[4]["w"]) for r in refs)
    assert (stats()["cache_loads"], stats()["cached_steps"]) == (5, [2, 4])


# -- the read path: a hand-built memory step ----------------------------------------------------
A = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)  # saved as dim-0 halves
B = torch.arange(4 * 6, dtype=torch.int64).reshape(4, 6) * 7  # saved as dim-1 halves


def _box(t: torch.Tensor, offsets: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    return t[tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))]


def _rank_boxes(rank: int) -> dict[str, tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]]:
    """Rank ``rank``'s (local tensor, global shape, offsets) of A and B."""
    a_off, b_off = (3 * rank, 0), (0, 3 * rank)
    return {
        "a": (_box(A, a_off, (3, 4)).contiguous(), (6, 4), a_off),
        "b": (_box(B, b_off, (4, 3)).contiguous(), (4, 6), b_off),
    }


def _rank_arrays(rank: int) -> dict[str, np.ndarray]:
    """A rank's bytes as workers put them: {key: flat uint8 array}."""
    return {k: t.reshape(-1).view(torch.uint8).numpy().copy() for k, (t, _, _) in _rank_boxes(rank).items()}


def _report(rank: int) -> RankReport:
    tensors = {
        key: TensorMeta(TORCH_TO_DTYPE[t.dtype], tuple(t.shape), t.nbytes, None, g, o)
        for key, (t, g, o) in _rank_boxes(rank).items()
    }
    return RankReport(rank, 2, RankState(tensors))


def _mstep(step: int, copies: dict[int, dict[str, list[Any]]]) -> MemoryStep:
    digests = {rank: {"model": digest_arrays(_rank_arrays(rank))} for rank in (0, 1)}
    info = CheckpointInfo(step, f"memory://r/step_{step}", world_size=2, durability=["memory"])
    return MemoryStep(step, 2, {rank: _report(rank) for rank in (0, 1)}, copies, digests, info)


def _copies(nodes: tuple[str, ...] = ("node-a",)) -> dict[int, dict[str, list[Any]]]:
    return {rank: {node: [ray.put(_rank_arrays(rank)), None] for node in nodes} for rank in (0, 1)}


def test_a_memory_step_reshards_into_other_boxes_bit_exact() -> None:
    mstep = _mstep(4, _copies())
    for parts in (1, 3, 6):  # whole tensors, thirds, sixths
        for rank in range(parts):
            into = {
                "a": Shard(torch.full((6 // parts, 4), -1.0), (6, 4), (rank * 6 // parts, 0)),
                "b": Shard(torch.full((4, 6 // parts), -1, dtype=torch.int64), (4, 6), (0, rank * 6 // parts)),
            }
            read_memory_into(mstep, "model", into, "node-a")
            assert torch.equal(into["a"].local, _box(A, into["a"].offsets, (6 // parts, 4)))
            assert torch.equal(into["b"].local, _box(B, into["b"].offsets, (4, 6 // parts)))
    # across the saved split: B (saved by columns) into row thirds, A (saved by rows) into column halves
    b_rows = [Shard(torch.empty(1, 6, dtype=torch.int64), (4, 6), (r, 0)) for r in range(4)]
    a_cols = [Shard(torch.empty(6, 2), (6, 4), (0, 2 * c)) for c in range(2)]
    for b_part, a_part in itertools.zip_longest(b_rows, a_cols):
        into = {"b": b_part} if a_part is None else {"b": b_part, "a": a_part}
        read_memory_into(mstep, "model", into, None)
    assert torch.equal(torch.cat([s.local for s in b_rows]), B)
    assert torch.equal(torch.cat([s.local for s in a_cols], dim=1), A)
    # a non-contiguous plain tensor target is filled through a staging buffer
    target = torch.zeros(4, 6).t()  # [6, 4], not contiguous
    read_memory_into(mstep, "model", {"a": target}, None)
    assert torch.equal(target, A)
    # the whole state, as evaluators read it
    whole = read_memory_state(mstep, "node-a")
    assert set(whole) == {"a", "b"} and torch.equal(whole["a"], A) and torch.equal(whole["b"], B)


def test_a_target_of_another_shape_or_dtype_or_an_unknown_key_is_refused() -> None:
    mstep = _mstep(4, _copies())
    with pytest.raises(ValueError, match=r"memory step 4 holds F32\[6, 4\]"):
        read_memory_into(mstep, "model", {"a": torch.empty(6, 5)}, None)
    with pytest.raises(ValueError, match=r"a: memory step 4"):
        read_memory_into(mstep, "model", {"a": torch.empty(6, 4, dtype=torch.float64)}, None)
    with pytest.raises(KeyError, match=r"no tensor named 'c'"):
        read_memory_into(mstep, "model", {"c": torch.empty(2)}, None)
    into = {"a": torch.zeros(6, 4), "b": torch.zeros(4, 5, dtype=torch.int64)}
    with pytest.raises(ValueError, match=r"b: memory step 4"):
        read_memory_into(mstep, "model", into, None)
    assert not into["a"].any()  # every target is checked before any is filled


def test_a_flipped_byte_in_a_copy_is_refused_naming_step_rank_and_key() -> None:
    copies = _copies()
    bad = _rank_arrays(1)
    bad["b"][5] ^= 0x01
    copies[1]["node-a"] = [ray.put(bad), None]
    mstep = _mstep(9, copies)
    into = {"a": torch.zeros(6, 4), "b": torch.zeros(4, 6, dtype=torch.int64)}
    with pytest.raises(CorruptCheckpointError, match=r"memory step 9: rank 1's model tensor 'b'"):
        read_memory_into(mstep, "model", into, None)
    assert not into["b"].any() and not into["a"].any()  # checked before anything is filled
    # a read that does not use the damaged tensor is not refused
    read_memory_into(mstep, "model", {"a": into["a"]}, None)
    assert torch.equal(into["a"], A)


def test_a_damaged_copy_is_skipped_for_a_good_replica(caplog: pytest.LogCaptureFixture) -> None:
    copies = _copies(("node-a", "node-b"))
    bad = _rank_arrays(0)
    bad["a"][0] ^= 0x80
    copies[0]["node-a"] = [ray.put(bad), None]  # the nearest copy of rank 0 is damaged
    mstep = _mstep(10, copies)
    into = {"a": torch.zeros(6, 4), "b": torch.zeros(4, 6, dtype=torch.int64)}
    with caplog.at_level("WARNING", logger="ray_ckpt.distributed.memory"):
        read_memory_into(mstep, "model", into, "node-a")
    assert torch.equal(into["a"], A) and torch.equal(into["b"], B)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "rank 0's model tensor 'a' (copy on node node-a)" in warning and "trying another copy" in warning


@ray.remote(num_cpus=0)
class _Owner:
    """A process that owns objects (as a holder does), so they are lost when it is killed."""

    def put(self, arrays: dict[str, np.ndarray]) -> list[Any]:
        return [ray.put(arrays)]  # wrapped: the caller gets the ref, the object stays owned here


def _owned_copy(owner: Any, rank: int) -> list[Any]:
    # padded past Ray's inlining threshold (100 KiB): a small object would travel with its ref and survive
    arrays = {**_rank_arrays(rank), "padding": np.zeros(200_000, dtype=np.uint8)}
    (ref,) = ray.get(owner.put.remote(arrays), timeout=600)
    return [ref, None]


def _kill(owner: Any, refs: list[Any]) -> None:
    """Kill the owner, and wait until this process sees its objects lost (Ray frees them shortly after)."""
    ray.kill(owner, no_restart=True)
    deadline = time.monotonic() + 300  # generous on a loaded machine
    for ref in refs:
        while True:
            try:
                ray.get(ref, timeout=5)
            except ray.exceptions.ObjectLostError:
                break
            except ray.exceptions.GetTimeoutError:
                pass
            assert time.monotonic() < deadline, "the killed owner's objects are still readable"
            time.sleep(0.1)


def test_a_lost_copy_falls_back_to_another_and_a_rank_with_none_left_is_lost() -> None:
    owner = _Owner.remote()
    copies = {
        0: {"node-a": _owned_copy(owner, 0), "node-b": [ray.put(_rank_arrays(0)), None]},
        1: {"node-a": _owned_copy(owner, 1)},
    }
    mstep = _mstep(12, copies)
    _kill(owner, [copies[0]["node-a"][0], copies[1]["node-a"][0]])  # node-a's copies are gone
    into = {"a": Shard(torch.zeros(3, 4), (6, 4), (0, 0))}  # rank 0's box only: node-a's copy first, then node-b
    read_memory_into(mstep, "model", into, "node-a")
    assert torch.equal(into["a"].local, A[:3])
    whole = {"a": torch.zeros(6, 4), "b": torch.zeros(4, 6, dtype=torch.int64)}
    with pytest.raises(MemoryStepLost) as err:
        read_memory_into(mstep, "model", whole, "node-a")
    assert (err.value.step, err.value.rank, err.value.nodes) == (12, 1, ["node-a"])
    assert "memory step 12" in str(err.value) and "rank 1" in str(err.value)
    assert not whole["a"].any() and not whole["b"].any()  # never a partial step
    with pytest.raises(MemoryStepLost):
        read_memory_state(mstep, None)


# -- placement and box arithmetic ----------------------------------------------------------------
def test_ring_peers_are_the_next_nodes_in_sorted_order_never_the_own_node() -> None:
    nodes = ["n3", "n1", "n4", "n2", "n1"]  # as ranks report them: unsorted, repeated
    assert ring_peers(nodes, "n1", 1) == ["n2"]
    assert ring_peers(nodes, "n4", 1) == ["n1"]  # wraps around
    assert ring_peers(nodes, "n3", 2) == ["n4", "n1"]
    assert ring_peers(nodes, "n2", 3) == ["n3", "n4", "n1"]
    # every node's copies land on distinct other nodes, and each node takes replicas of as many
    for replicas in (1, 2, 3):
        taken = [peer for own in ["n1", "n2", "n3", "n4"] for peer in ring_peers(nodes, own, replicas)]
        assert sorted(set(taken)) == ["n1", "n2", "n3", "n4"]
        assert all(taken.count(n) == replicas for n in set(taken))
    with pytest.raises(ValueError, match=r"memory_replicas=4 needs 5 training nodes.*on 4"):
        ring_peers(nodes, "n1", 4)
    with pytest.raises(ValueError, match=r"memory_replicas=1 needs 2"):
        ring_peers(["n1", "n1"], "n1", 1)


def test_copy_overlap_copies_exactly_the_intersection_of_two_boxes() -> None:
    rng = np.random.default_rng(0)
    shape = (5, 7, 3)
    whole = rng.integers(0, 2**31, shape, dtype=np.int32)
    itemsize = whole.itemsize

    def random_box() -> tuple[tuple[int, ...], tuple[int, ...]]:
        offsets = tuple(int(rng.integers(0, d)) for d in shape)
        sizes = tuple(int(rng.integers(1, d - o + 1)) for d, o in zip(shape, offsets, strict=True))
        return offsets, sizes

    overlapping = 0
    for _ in range(300):
        (so, ss), (do, ds) = random_box(), random_box()
        src = np.ascontiguousarray(whole[tuple(slice(o, o + n) for o, n in zip(so, ss, strict=True))])
        dst = np.full(ds, -1, dtype=np.int32)
        copied = copy_overlap(dst.reshape(-1).view(np.uint8), do, ds, src.reshape(-1).view(np.uint8), so, ss, itemsize)
        # the reference: which global elements both boxes cover
        expected = np.full(ds, -1, dtype=np.int32)
        count = 0
        for idx in np.ndindex(*ds):
            g = tuple(i + o for i, o in zip(idx, do, strict=True))
            if all(s <= gi < s + n for gi, s, n in zip(g, so, ss, strict=True)):
                expected[idx] = whole[g]
                count += 1
        assert copied == count
        assert np.array_equal(dst, expected)
        overlapping += bool(count)
    assert 50 < overlapping < 300  # both cases were exercised
