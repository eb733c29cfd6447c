"""A node's holder of a run's memory steps: the process that owns the in-memory copies.

One holder actor runs per node per run (named ``ray_ckpt:holder:<run>:<node id>``, detached, pinned
to its node). It takes a rank's state out of the rank's object (``ray.get``: zero-copy on the same
node) and ``ray.put``\\ s its own copy, so the copy is owned by the holder and outlives the rank (a
``ray.put`` object dies with its owner). It then has its peers on other nodes pull that copy and
own one each. Every copy is hashed once, by the holder that first owns it (block digests, as
storage writers record them), and every load checks what it reads against those digests.

Holders also keep what the checkpointer committed (:meth:`Holder.commit`), so a restarted
checkpointer rebuilds its list of memory steps from them, and a byte-bounded LRU cache of persisted
steps read from storage once per node for the evaluators there (:meth:`Holder.cached`).
Memory is accounted: every copy reserves its bytes against the node's budget first; a reservation
that does not fit waits for frees up to a deadline, then fails with :class:`MemoryBudgetError`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from ray_ckpt.core.errors import SaveAbortedError
from ray_ckpt.core.format.digests import block_digests

logger = logging.getLogger(__name__)

HOLDER_PREFIX = "ray_ckpt:holder:"


class MemoryBudgetError(SaveAbortedError):
    """A memory save did not fit the node's memory budget within its deadline."""


def holder_name(run_name: str, node_id: str) -> str:
    """The registered name of a run's holder on a node."""
    return f"{HOLDER_PREFIX}{run_name}:{node_id}"


def digest_arrays(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Block digests (xxh3 per 4 MiB, in parallel) of each array's bytes: what loads check."""
    return {key: block_digests(arr) for key, arr in arrays.items()}


@dataclass
class Copy:
    """One rank's state of one step as one holder owns it."""

    refs: list[Any]  # [model ref, trainer ref or None], owned by this holder
    nbytes: int
    primary: bool


@dataclass
class _Cached:
    ref: Any
    nbytes: int
    used: float = field(default_factory=time.monotonic)


class Holder:
    """Owner of a run's in-memory copies on one node (see the module docstring)."""

    def __init__(self, run_name: str, node_id: str, budget_bytes: int | None, eval_cache_bytes: int) -> None:
        self.run_name = run_name
        self.node_id = node_id
        store = _object_store_bytes(node_id)
        if budget_bytes is None:
            budget_bytes = store // 2
        elif budget_bytes > store * 0.9:  # a full object store spills or fails every ray.put on the node
            logger.warning(
                "run %s: memory_budget_bytes=%d is above 90%% of node %s's object store (%d bytes): using %d",
                run_name,
                budget_bytes,
                node_id,
                store,
                int(store * 0.9),
            )
            budget_bytes = int(store * 0.9)
        self.budget = int(budget_bytes)
        self.eval_cache_bytes = int(eval_cache_bytes)
        self.used = 0
        self.copies: dict[tuple[int, int], Copy] = {}
        self.committed: dict[int, Any] = {}  # step -> the checkpointer's record of it (for its restart)
        self.cache: collections.OrderedDict[int, _Cached] = collections.OrderedDict()
        self.cache_loads = 0  # persisted steps this holder read from storage for evaluators
        self._freed: asyncio.Condition | None = None
        self._loading: dict[int, asyncio.Future] = {}

    async def ping(self) -> str:
        return self.node_id

    # -- accounting ---------------------------------------------------------------------------
    def _condition(self) -> asyncio.Condition:
        if self._freed is None:
            self._freed = asyncio.Condition()
        return self._freed

    async def _reserve(self, nbytes: int, what: str, timeout_s: float) -> None:
        """Wait until ``nbytes`` fit the budget (evicting cached persisted steps first), then take them."""
        if nbytes > self.budget:
            raise MemoryBudgetError(
                f"{what}: {nbytes} bytes never fit node {self.node_id}'s memory budget of {self.budget} bytes "
                "(raise memory_budget_bytes, or give the node a bigger object store)"
            )
        freed = self._condition()
        deadline = time.monotonic() + timeout_s
        async with freed:
            while self.used + nbytes > self.budget:
                if self._evict_one():
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MemoryBudgetError(
                        f"{what}: node {self.node_id}'s holder holds {self.used} of its {self.budget} byte budget "
                        f"(steps {sorted({s for s, _ in self.copies})}); {nbytes} more bytes did not fit within "
                        f"{timeout_s:.0f}s. Lower memory_keep_last or max_pending_saves, or raise memory_budget_bytes"
                    )
                try:
                    await asyncio.wait_for(freed.wait(), left)
                except asyncio.TimeoutError:
                    pass
            self.used += nbytes

    async def _release(self, nbytes: int) -> None:
        freed = self._condition()
        async with freed:
            self.used -= nbytes
            freed.notify_all()

    def _evict_one(self) -> bool:
        """Drop the least recently used cached persisted step; False when the cache is empty."""
        if not self.cache:
            return False
        _, entry = self.cache.popitem(last=False)
        self.used -= entry.nbytes
        return True

    # -- memory steps -------------------------------------------------------------------------
    async def _take(
        self, step: int, rank: int, refs: list[Any], nbytes: int, timeout_s: float, *, primary: bool
    ) -> tuple[list[Any], dict[str, dict[str, str]]]:
        """Reserve the bytes, read each object (zero-copy on this node) and own a copy of it here;
        the primary copy is hashed too. (owned refs, digests by part)."""
        what = f"step {step} rank {rank}" + ("" if primary else " (replica)")
        await self._reserve(nbytes, what, timeout_s)
        try:
            loop = asyncio.get_running_loop()
            owned: list[Any] = []
            digests: dict[str, dict[str, str]] = {}
            for part, ref in zip(("model", "trainer"), refs, strict=True):
                if ref is None:
                    owned.append(None)
                    continue
                arrays = await ref
                if primary:
                    digests[part] = await loop.run_in_executor(None, digest_arrays, arrays)
                owned.append(await loop.run_in_executor(None, ray.put, arrays))
                del arrays
            self.copies[step, rank] = Copy(owned, nbytes, primary=primary)
        except BaseException:
            await self._release(nbytes)
            raise
        return owned, digests

    async def keep(
        self, step: int, rank: int, refs: list[Any], nbytes: int, peers: list[Any], timeout_s: float
    ) -> dict[str, Any]:
        """Own rank ``rank``'s state of ``step`` (its ``[model ref, trainer ref or None]``), hash it and
        have ``peers`` own a copy each: ``{"copies": {node: [model, trainer] refs}, "digests": ...}``."""
        owned, digests = await self._take(step, rank, refs, nbytes, timeout_s, primary=True)
        copies = {self.node_id: owned}
        replies = await asyncio.gather(
            *(peer.replicate.remote(step, rank, owned, nbytes, timeout_s) for peer in peers), return_exceptions=True
        )
        failed = [r for r in replies if isinstance(r, BaseException)]
        if failed:
            await self.drop([step])
            for peer, reply in zip(peers, replies, strict=True):
                if not isinstance(reply, BaseException):
                    peer.drop.remote([step])
            raise SaveAbortedError(f"step {step} rank {rank}: a replica could not be made: {failed[0]}") from None
        for node, peer_refs in replies:
            copies[node] = peer_refs
        return {"copies": copies, "digests": digests}

    async def replicate(
        self, step: int, rank: int, refs: list[Any], nbytes: int, timeout_s: float
    ) -> tuple[str, list[Any]]:
        """Pull a peer's copy of a rank's state and own one here: (this node, [model, trainer] refs)."""
        owned, _ = await self._take(step, rank, refs, nbytes, timeout_s, primary=False)
        return self.node_id, owned

    async def commit(self, step: int, record: Any) -> None:
        """The checkpointer committed ``step`` (``record``: what it needs to list it again after a restart)."""
        self.committed[step] = record

    async def drop(self, steps: list[int]) -> int:
        """Free every copy of these steps held here; the bytes returned to the budget."""
        gone = set(steps)
        freed = 0
        for key in [k for k in self.copies if k[0] in gone]:
            freed += self.copies.pop(key).nbytes
        for step in gone:
            self.committed.pop(step, None)
        if freed:
            await self._release(freed)
        return freed

    async def inventory(self) -> dict[str, Any]:
        """What this holder keeps: committed records, and its copies by (step, rank)."""
        return {
            "node": self.node_id,
            "committed": dict(self.committed),
            "copies": {key: copy.refs for key, copy in self.copies.items()},
        }

    async def stats(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "pid": os.getpid(),
            "bytes_held": self.used,
            "budget": self.budget,
            "steps": sorted({s for s, _ in self.copies}),
            "cached_steps": list(self.cache),
            "cache_loads": self.cache_loads,
        }

    # -- the evaluators' cache of persisted steps ---------------------------------------------
    async def cached(self, step: int, config: Any, timeout_s: float) -> list[Any]:
        """``[ref]`` of persisted ``step``'s model state (``{key: (dtype, shape, uint8 array)}``) read
        from storage once for this node's evaluators; later calls share that copy (LRU by bytes)."""
        entry = self.cache.get(step)
        if entry is not None:
            self.cache.move_to_end(step)
            entry.used = time.monotonic()
            return [entry.ref]
        loading = self._loading.get(step)
        if loading is None:
            loading = self._loading[step] = asyncio.get_running_loop().create_future()
            try:
                ref, nbytes = await asyncio.get_running_loop().run_in_executor(None, _read_persisted, step, config)
                self.cache_loads += 1
                if nbytes <= self.eval_cache_bytes:
                    await self._reserve(nbytes, f"step {step} (eval cache)", timeout_s)
                    self.cache[step] = _Cached(ref, nbytes)
                    while sum(e.nbytes for e in self.cache.values()) > self.eval_cache_bytes:
                        self._evict_one()
                loading.set_result(ref)
            except BaseException as exc:
                loading.set_exception(exc)
                loading.exception()
                raise
            finally:
                self._loading.pop(step, None)
        return [await asyncio.shield(loading)]


def _read_persisted(step: int, config: Any) -> tuple[Any, int]:
    """Read a persisted step's model state from storage (checksums checked) into one owned object."""
    from ray_ckpt.core.format.buffers import to_buffer
    from ray_ckpt.tiers.tiered import open_store

    state = open_store(config).load(step)
    arrays: dict[str, Any] = {}
    nbytes = 0
    for key, tensor in state.items():
        buf = to_buffer(tensor, key=key)
        arrays[key] = (buf.dtype, tuple(buf.shape), buf.data)
        nbytes += buf.nbytes
    return ray.put(arrays), nbytes


def _object_store_bytes(node_id: str) -> int:
    """The object store capacity of a node (its ``object_store_memory`` resource)."""
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return int(node.get("Resources", {}).get("object_store_memory", 0))
    raise LookupError(f"node {node_id} is not in the cluster")
