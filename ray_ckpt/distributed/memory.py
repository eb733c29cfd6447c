"""The memory tier: steps committed in the holders' memory on the training nodes (docs/MEMORY.md).

:class:`MemoryStep` is what the checkpointer records of a step committed in memory: each rank's
description, the copies of its state (node id -> the holder-owned refs) and the digests made when
the first copy was taken. :class:`MemoryTier` is the checkpointer's bookkeeping: holders per node,
routes (which peers replicate a node's copies), the committed steps and their freeing, and node
losses. :func:`read_memory_step` is the one read path, used by workers (resharding into their
targets) and evaluators (whole tensors): boxes come from the nearest live copy, every byte used
is checked against its digests, and a step missing every copy of some rank raises
:class:`MemoryStepLost` before anything is filled, so a caller never sees a partial step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
import torch

from ray_ckpt.core.errors import CorruptCheckpointError, SaveAbortedError
from ray_ckpt.core.format.buffers import DTYPE_TO_TORCH, TORCH_TO_DTYPE, TensorBuffer, to_tensor
from ray_ckpt.core.format.tree import tensor_leaves, unflatten_state
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.planner import MODEL, TRAINER, RankState, TensorMeta
from ray_ckpt.core.shard import copy_overlap, local_part
from ray_ckpt.distributed.holder import Holder, digest_arrays, holder_name
from ray_ckpt.distributed.wire import RankReport

logger = logging.getLogger(__name__)

MEMORY = "memory"  # the durability entry of a step held in memory
_PARTS = (MODEL, TRAINER)
_PART_INDEX = {MODEL: 0, TRAINER: 1}


class MemoryStepLost(RuntimeError):
    """Some rank's state of a memory step has no surviving copy (its nodes are gone)."""

    def __init__(self, step: int, rank: int, nodes: list[str]) -> None:
        super().__init__(f"memory step {step}: every copy of rank {rank}'s state is lost (nodes {nodes})")
        self.step = step
        self.rank = rank
        self.nodes = nodes


@dataclass
class MemoryStep:
    """A step committed in memory: descriptions, copies by node, digests, its index record."""

    step: int
    world_size: int
    reports: dict[int, RankReport]  # descriptions, metrics and metadata (no refs)
    copies: dict[int, dict[str, list[Any]]]  # rank -> node id -> [model ref, trainer ref or None]
    digests: dict[int, dict[str, dict[str, str]]]  # rank -> part -> key -> block digests
    info: CheckpointInfo
    persisted: bool = False

    def nodes(self) -> set[str]:
        return {node for by_node in self.copies.values() for node in by_node}

    def nbytes(self) -> int:
        """Bytes of one copy of the step (every rank's state once)."""
        return sum(_state_bytes(r.model) + _state_bytes(r.trainer) for r in self.reports.values())

    def without(self, dead: set[str]) -> MemoryStep | None:
        """This step without the copies on ``dead`` nodes; None when some rank has none left."""
        copies = {
            rank: {n: refs for n, refs in by_node.items() if n not in dead} for rank, by_node in self.copies.items()
        }
        if any(not by_node for by_node in copies.values()):
            return None
        return replace(self, copies=copies)

    def lost_ranks(self, dead: set[str]) -> dict[int, list[str]]:
        """Ranks whose every copy is on ``dead`` nodes, with those nodes."""
        return {rank: sorted(by_node) for rank, by_node in self.copies.items() if set(by_node) <= dead}


def _state_bytes(state: RankState | None) -> int:
    return 0 if state is None else sum(meta.nbytes for meta in state.tensors.values())


def memory_info(info: CheckpointInfo, *, persisted: bool) -> CheckpointInfo:
    """A record naming memory among the places a step lives."""
    durability = [MEMORY] + [d for d in info.durability if d != MEMORY] if persisted else [MEMORY]
    return replace(info, durability=durability)


def storage_info(info: CheckpointInfo) -> CheckpointInfo:
    """A record without memory among the places a step lives."""
    return replace(info, durability=[d for d in info.durability if d != MEMORY])


# -- reading a memory step ----------------------------------------------------------------------
@dataclass
class _Fetched:
    arrays: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # rank -> key -> bytes
    nodes: dict[int, str] = field(default_factory=dict)  # the node each rank's bytes came from


def _fetch(mstep: MemoryStep, part: str, ranks: list[int], node_id: str | None) -> _Fetched:
    """Each rank's bytes of ``part`` from its nearest live copy (this node first, zero-copy)."""
    fetched = _Fetched()
    index = _PART_INDEX[part]
    for rank in ranks:
        by_node = mstep.copies[rank]
        order = sorted(by_node, key=lambda n: (n != node_id, n))
        for node in order:
            ref = by_node[node][index]
            if ref is None:
                raise KeyError(f"memory step {mstep.step}: rank {rank} saved no {part} state")
            try:
                fetched.arrays[rank] = ray.get(ref)
                fetched.nodes[rank] = node
                break
            except (ray.exceptions.ObjectLostError, ray.exceptions.RayActorError, ray.exceptions.RaySystemError):
                logger.info("memory step %d: rank %d's copy on node %s is gone", mstep.step, rank, node)
        else:
            raise MemoryStepLost(mstep.step, rank, sorted(by_node))
    return fetched


def _check(mstep: MemoryStep, part: str, fetched: _Fetched, used: set[tuple[int, str]]) -> None:
    """Every byte used must match the digests made when the first copy was taken."""
    by_rank: dict[int, dict[str, np.ndarray]] = {}
    for rank, key in used:
        by_rank.setdefault(rank, {})[key] = fetched.arrays[rank][key]
    for rank, arrays in by_rank.items():
        expected = mstep.digests.get(rank, {}).get(part, {})
        for key, got in digest_arrays(arrays).items():
            if expected.get(key) != got:
                raise CorruptCheckpointError(
                    f"memory step {mstep.step}: rank {rank}'s {part} tensor {key!r} (copy on node "
                    f"{fetched.nodes[rank]}) does not match the digests taken when it was saved"
                )


def _holders_of(mstep: MemoryStep, part: str, key: str) -> list[tuple[int, str, TensorMeta]]:
    """(rank, saved key, description) of the ranks holding ``key``'s boxes (ties resolved), one per box."""
    seen: set[tuple[Any, Any]] = set()
    out = []
    for rank in sorted(mstep.reports):
        state = mstep.reports[rank].model if part == MODEL else mstep.reports[rank].trainer
        if state is None:
            continue
        name = state.aliases.get(key, key)
        meta = state.tensors.get(name)
        if meta is None:
            continue
        box = (meta.global_shape, meta.offsets)
        if box in seen:  # a replicated box: the lowest rank's copy serves
            continue
        seen.add(box)
        out.append((rank, name, meta))
    return out


def read_memory_into(mstep: MemoryStep, part: str, into: Mapping[str, Any], node_id: str | None) -> None:
    """Fill ``into``'s tensors (tensors, DTensors, Shards) with their boxes of a memory step."""
    leaves = tensor_leaves(into, what=f"into ({'state_dict' if part == MODEL else 'trainer_state'})")
    plan: dict[str, list[tuple[int, str, TensorMeta]]] = {}
    for key in leaves:
        holders = _holders_of(mstep, part, key)
        if not holders:
            raise KeyError(f"memory step {mstep.step}: no tensor named {key!r} ({part})")
        plan[key] = holders
    ranks = sorted({rank for holders in plan.values() for rank, _, _ in holders})
    fetched = _fetch(mstep, part, ranks, node_id)
    used = {(rank, name) for holders in plan.values() for rank, name, _ in holders}
    _check(mstep, part, fetched, used)
    for key, target in leaves.items():
        _fill(mstep.step, key, target, plan[key], fetched)


def _fill(step: int, key: str, target: Any, holders: list[tuple[int, str, TensorMeta]], fetched: _Fetched) -> None:
    local, global_shape, offsets = local_part(target, key=key)
    if isinstance(local, np.ndarray):
        local = torch.from_numpy(local)
    meta0 = holders[0][2]
    saved_global = tuple(meta0.global_shape or meta0.shape)
    shape = tuple(local.shape)
    global_shape = tuple(global_shape) if global_shape is not None else shape
    offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
    if TORCH_TO_DTYPE.get(local.dtype) != meta0.dtype or global_shape != saved_global:
        have = f"{TORCH_TO_DTYPE.get(local.dtype, local.dtype)}{list(global_shape)}"
        raise ValueError(f"{key}: memory step {step} holds {meta0.dtype}{list(saved_global)}, the target is {have}")
    if not math.prod(shape):
        return
    itemsize = local.element_size()
    direct = local.device.type == "cpu" and local.is_contiguous()
    buf = local if direct else torch.empty(shape, dtype=local.dtype)
    view = buf.reshape(-1).view(torch.uint8).numpy()
    covered = 0
    for rank, name, meta in holders:
        src = fetched.arrays[rank][name]
        src_offsets = tuple(meta.offsets or (0,) * len(meta.shape))
        covered += copy_overlap(view, offsets, shape, src, src_offsets, tuple(meta.shape), itemsize)
    if covered != math.prod(shape):
        raise CorruptCheckpointError(
            f"memory step {step}: {key!r}: the ranks' boxes cover {covered} of {math.prod(shape)}"
        )
    if not direct:
        with torch.no_grad():
            local.copy_(buf)


def read_memory_state(mstep: MemoryStep, node_id: str | None) -> Any:
    """A memory step's whole model state (full tensors, ties and nesting as saved), checked."""
    keys: dict[str, TensorMeta] = {}
    structure = None
    aliases: dict[str, str] = {}
    for rank in sorted(mstep.reports):
        state = mstep.reports[rank].model
        for key, meta in state.tensors.items():
            keys.setdefault(key, meta)
        aliases.update(state.aliases)
        structure = structure if structure is not None else state.structure
    targets = {
        key: torch.empty(tuple(meta.global_shape or meta.shape), dtype=DTYPE_TO_TORCH[meta.dtype])
        for key, meta in keys.items()
    }
    read_memory_into(mstep, MODEL, targets, node_id)
    return unflatten_state(targets, structure, aliases)


def read_cached_state(ref: Any) -> dict[str, torch.Tensor]:
    """The state a holder cached for evaluators (``{key: (dtype, shape, uint8 array)}``), as tensors."""
    out = {}
    for key, (dtype, shape, data) in ray.get(ref).items():
        out[key] = to_tensor(TensorBuffer(dtype, tuple(shape), data)).clone()  # the cache's copy stays read-only
    return out


# -- the checkpointer's bookkeeping -----------------------------------------------------------
def ring_peers(nodes: list[str], own: str, replicas: int) -> list[str]:
    """The ``replicas`` nodes after ``own`` in the sorted ring of training nodes (never ``own``).

    Each node's copies go to the next nodes around the ring, so copies spread evenly and a node's
    replicas never share its fate. ValueError when there are not enough other nodes.
    """
    ring = sorted(set(nodes))
    if len(ring) < replicas + 1:
        raise ValueError(
            f"memory_replicas={replicas} needs {replicas + 1} training nodes (a copy on each of {replicas} other "
            f"nodes besides a rank's own), but the step's ranks run on {len(ring)}: {ring}"
        )
    i = ring.index(own)
    return [ring[(i + k) % len(ring)] for k in range(1, replicas + 1)]


class MemoryTier:
    """The checkpointer's view of the memory tier: holders, committed memory steps, node losses.

    Holders are detached named actors, one per node that runs a rank or an evaluator; this object
    only references them. Used from the checkpointer's event loop (plain calls, no locking).
    """

    def __init__(self, config: Any, namespace: str | None) -> None:
        self.config = config
        self.namespace = namespace
        self.holders: dict[str, Any] = {}
        self.steps: dict[int, MemoryStep] = {}
        self.lost_steps: list[int] = []

    # -- holders ------------------------------------------------------------------------------
    def holder(self, node_id: str) -> Any:
        """The run's holder on ``node_id`` (started on first use, pinned to the node, detached)."""
        handle = self.holders.get(node_id)
        if handle is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            handle = (
                ray.remote(Holder)
                .options(
                    name=holder_name(self.config.run_name, node_id),
                    namespace=self.namespace,
                    get_if_exists=True,
                    lifetime="detached",
                    num_cpus=0,
                    max_concurrency=1000,
                    max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                )
                .remote(self.config.run_name, node_id, self.config.memory_budget_bytes, self.config.eval_cache_bytes)
            )
            self.holders[node_id] = handle
        return handle

    def find_holders(self) -> dict[str, Any]:
        """The run's live holders as Ray lists them (after a restart of the checkpointer)."""
        prefix = holder_name(self.config.run_name, "")
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name, namespace = entry["name"], entry["namespace"]
            if name.startswith(prefix) and (self.namespace is None or namespace == self.namespace):
                node = name[len(prefix) :]
                try:
                    self.holders[node] = ray.get_actor(name, namespace=namespace)
                except ValueError:
                    continue
        return dict(self.holders)

    # -- committed steps ----------------------------------------------------------------------
    def add(self, mstep: MemoryStep) -> list[int]:
        """Record a committed memory step; the steps now beyond ``memory_keep_last`` (to free)."""
        self.steps[mstep.step] = mstep
        return self.beyond_kept()

    def beyond_kept(self) -> list[int]:
        """Memory steps older than the newest ``memory_keep_last``."""
        steps = sorted(self.steps)
        return steps[: max(0, len(steps) - self.config.memory_keep_last)]

    def free(self, steps: list[int]) -> None:
        """Forget these steps and have every holder release its copies of them."""
        for step in steps:
            self.steps.pop(step, None)
        if steps:
            for handle in self.holders.values():
                handle.drop.remote(list(steps))

    def bytes_held(self) -> int:
        """Bytes of every copy of every memory step ((1 + replicas) x state x steps)."""
        return sum(m.nbytes() * len(next(iter(m.copies.values()), {})) for m in self.steps.values())

    def nodes_lost(self, dead: set[str]) -> tuple[list[int], list[int]]:
        """Drop the copies on ``dead`` nodes: (steps still whole, steps that lost a rank and leave the
        tier). ``lost_steps`` records the lost steps storage does not hold either."""
        for node in dead:
            self.holders.pop(node, None)
        kept, lost = [], []
        persisted = {s for s, m in self.steps.items() if m.persisted}
        for step, mstep in sorted(self.steps.items()):
            if not mstep.nodes() & dead:
                continue
            survivor = mstep.without(dead)
            if survivor is None:
                logger.warning(
                    "run %s: memory step %d lost every copy of ranks %s (nodes %s gone)",
                    self.config.run_name,
                    step,
                    sorted(mstep.lost_ranks(dead)),
                    sorted(dead & mstep.nodes()),
                )
                del self.steps[step]
                lost.append(step)
            else:
                self.steps[step] = survivor
                kept.append(step)
        self.lost_steps.extend(s for s in lost if s not in persisted)  # work lost for good
        return kept, lost

    def rebuild(self) -> list[MemoryStep]:
        """After a restart: the committed steps whose every rank still has a copy in a live holder."""
        found = self.find_holders()
        inventories = {}
        for node, handle in found.items():
            try:
                inventories[node] = ray.get(handle.inventory.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001 - a dead or unreachable holder holds nothing
                logger.warning("run %s: holder on node %s did not answer (%s)", self.config.run_name, node, exc)
                self.holders.pop(node, None)
        records: dict[int, MemoryStep] = {}
        for inventory in inventories.values():
            for step, record in inventory["committed"].items():
                records.setdefault(step, record)
        rebuilt = []
        for step, record in sorted(records.items()):
            copies: dict[int, dict[str, list[Any]]] = {}
            for node, inventory in inventories.items():
                for (s, rank), refs in inventory["copies"].items():
                    if s == step:
                        copies.setdefault(rank, {})[node] = refs
            if set(copies) != set(record.reports):
                logger.warning(
                    "run %s: memory step %d is missing ranks after the restart: dropped", self.config.run_name, step
                )
                continue
            mstep = replace(record, copies=copies)
            self.steps[step] = mstep
            rebuilt.append(mstep)
        return rebuilt


def check_replicas(step: int, copies: Mapping[int, Mapping[str, Any]], replicas: int) -> None:
    """The commit rule: every rank's state has ``1 + replicas`` copies on distinct nodes."""
    for rank, by_node in sorted(copies.items()):
        if len(by_node) < 1 + replicas:
            raise SaveAbortedError(
                f"step {step}: rank {rank}'s state has copies on {len(by_node)} nodes ({sorted(by_node)}), "
                f"memory_replicas={replicas} needs {1 + replicas}; nothing was committed"
            )
