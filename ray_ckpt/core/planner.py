"""The save planner: every rank's description -> one frozen plan of who writes which bytes where.

Call order of a distributed save (the checkpointer drives it; see :mod:`ray_ckpt.distributed.checkpointer`):

1. **describe** - each rank describes its state (:func:`describe`): per key a dtype, its local
   shape, and for a shard of a bigger tensor the global shape and offsets of its box.
2. **plan** - once every rank is in, :func:`plan_save` checks the descriptions against each other
   (one dtype and global shape per key, boxes that neither overlap nor leave a gap) and lays the
   full tensors out in Hugging Face shard files. Identical boxes held by several ranks are one
   chunk with replicas: written once, by the lowest rank, and compared. The result is a frozen
   :class:`SavePlan`, the same object for every rank.
3. **write** - each writer executes its share (:meth:`SavePlan.streams`, :meth:`SavePlan.pieces`,
   :meth:`SavePlan.sends`, :meth:`SavePlan.replicas`) with the one set of file writers in
   :mod:`ray_ckpt.core.writer`; in gather mode the master writes everything.
4. **finish** - the master checks every rank's result, writes the indexes and commits.

A file is written by one process from start to end (streamed, hashed on the way: works on every
storage), or, for tensors whose chunks live on several ranks in a direct-mode save on a local
disk, pre-created by the master and filled by each rank with positioned writes of its own byte
ranges (a dim-0 shard is one range). On an object store such tensors' chunks go to the master
through Ray's object store and the master streams their files. Nothing here does I/O or imports Ray.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ray_ckpt.core.format.buffers import DTYPE_SIZE
from ray_ckpt.core.format.header import MAX_TENSOR_BYTES, RESERVED_KEY, safetensors_layout
from ray_ckpt.core.format.hf_index import plan_shards
from ray_ckpt.core.format.tree import FlatState

# The most bytes a tensor (and a file) may hold: the readers' own limit (a file offset, torch sizes
# and strides are int64), so a description past it could never be written or read back.
MAX_BYTES = MAX_TENSOR_BYTES

MASTER = -1  # a file the checkpointer writes
SHARED = -2  # a file every rank holding chunks of it fills with positioned writes
MODEL, TRAINER = "model", "trainer"
Mode = Literal["gather", "direct"]


@dataclass
class TensorMeta:
    """What a rank tells the master about one tensor (the bytes travel separately).

    ``shape`` is the rank's local shape; for a shard of a bigger tensor ``global_shape`` and
    ``offsets`` say which box of it the rank holds (both None for a whole tensor).
    """

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: str | None = None  # optional; replicas are compared after planning (gather: by the master)
    global_shape: tuple[int, ...] | None = None
    offsets: tuple[int, ...] | None = None


@dataclass
class RankState:
    """One rank's description of one state (model or trainer): tensor metadata in order, ties, nesting."""

    tensors: dict[str, TensorMeta]
    aliases: dict[str, str] = field(default_factory=dict)
    structure: Any = None


def describe(flat: FlatState) -> RankState:
    """The description of a flattened state that a rank sends in place of its bytes."""
    tensors = {
        key: TensorMeta(buf.dtype, tuple(buf.shape), buf.nbytes, None, buf.global_shape, buf.offsets)
        for key, buf in flat.tensors.items()
    }
    return RankState(tensors, dict(flat.aliases), flat.structure)


@dataclass(frozen=True)
class Chunk:
    """One box of a tensor; ``ranks[0]`` writes it, the other ranks hold replicas compared against it."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    ranks: tuple[int, ...]

    @property
    def writer(self) -> int:
        return self.ranks[0]


@dataclass(frozen=True)
class TensorLayout:
    """A full tensor in the committed files: its file, where its bytes start, and its chunks."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    file: str = ""
    begin: int = 0  # byte offset of the tensor's data in its file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZE[self.dtype]

    @property
    def whole(self) -> bool:
        """Whether one chunk is the whole tensor (its bytes are one buffer)."""
        return len(self.chunks) == 1


@dataclass(frozen=True)
class FilePlan:
    """One committed file: name (relative to the step directory), tensors in byte order, header, writer."""

    name: str
    keys: tuple[str, ...]
    header: bytes
    size: int
    writer: int  # a rank, MASTER or SHARED


@dataclass(frozen=True)
class PartPlan:
    """The plan of one state of the step (the model, or the trainer state)."""

    part: str
    files: tuple[FilePlan, ...]
    tensors: Mapping[str, TensorLayout]
    aliases: Mapping[str, str]
    structure: Any
    total_size: int
    fmt: str = "safetensors"

    def file(self, name: str) -> FilePlan:
        return next(f for f in self.files if f.name == name)


@dataclass(frozen=True)
class SavePlan:
    """Who writes which bytes of which file, for every rank; the same frozen object for all of them."""

    step: int
    directory: str
    world_size: int
    mode: Mode
    fmt: str
    parts: Mapping[str, PartPlan]

    def _files(self) -> Iterator[tuple[PartPlan, FilePlan]]:
        for part in self.parts.values():
            for fplan in part.files:
                yield part, fplan

    @functools.cached_property
    def _duties(self) -> dict[int, _Duties]:
        """Every writer's share, found in one pass (a plan of a thousand ranks is asked per rank)."""
        duties: dict[int, _Duties] = {}

        def of(rank: int) -> _Duties:
            return duties.setdefault(rank, _Duties())

        for part, fplan in self._files():
            of(fplan.writer).streams.append((part, fplan))  # SHARED: the files the master creates and seals
            for key in fplan.keys:
                layout = part.tensors[key]
                for i, chunk in enumerate(layout.chunks):
                    if fplan.writer == SHARED:
                        of(chunk.writer).pieces.append((part, fplan, layout, i))
                    elif fplan.writer == MASTER and self.mode == "direct":
                        of(chunk.writer).sends.append((part.part, key))
        for part in self.parts.values():
            for key, layout in part.tensors.items():
                for chunk in layout.chunks:
                    if len(chunk.ranks) > 1:
                        for rank in chunk.ranks:
                            of(rank).replicas.append((part.part, key))
        return duties

    def streams(self, rank: int) -> list[tuple[PartPlan, FilePlan]]:
        """Files ``rank`` (or MASTER, or SHARED) writes from start to end."""
        return list(self._duties.get(rank, _NONE).streams)

    def pieces(self, rank: int) -> list[tuple[PartPlan, FilePlan, TensorLayout, int]]:
        """Chunks ``rank`` writes into place in a SHARED file: (part, file, tensor, chunk index)."""
        return list(self._duties.get(rank, _NONE).pieces)

    def sends(self, rank: int) -> list[tuple[str, str]]:
        """(part, key) of the chunks ``rank`` hands to the master, which writes their files (direct mode)."""
        return list(self._duties.get(rank, _NONE).sends)

    def replicas(self, rank: int) -> list[tuple[str, str]]:
        """(part, key) of the chunks ``rank`` holds that other ranks hold too: the ones compared."""
        return list(self._duties.get(rank, _NONE).replicas)

    def idle(self, rank: int) -> bool:
        """Whether ``rank`` has nothing to do after planning (every gather-mode rank)."""
        if self.mode == "gather":
            return True
        duties = self._duties.get(rank)
        return duties is None or not (duties.streams or duties.pieces or duties.sends or duties.replicas)

    def share(self, rank: int) -> SavePlan:
        """The part of the plan ``rank`` needs: its files and the tensors it writes, sends or compares.

        What the master hands each rank (a plan of every rank's tensors is big at a thousand ranks).
        """
        duties = self._duties.get(rank, _NONE)
        files: dict[str, set[str]] = {}
        keys: dict[str, set[str]] = {}
        for part, fplan in duties.streams:
            files.setdefault(part.part, set()).add(fplan.name)
        for part, fplan, _, _ in duties.pieces:
            files.setdefault(part.part, set()).add(fplan.name)
        for part_name, key in [*duties.sends, *duties.replicas]:
            keys.setdefault(part_name, set()).add(key)
        parts = {}
        for name, part in self.parts.items():
            mine = [f for f in part.files if f.name in files.get(name, ())]
            wanted = {k for f in mine for k in f.keys} | keys.get(name, set())
            if not mine and not wanted:
                continue
            if self.mode == "direct":
                # a sent key's file stays so that sends() finds it, but without other ranks' tensors
                mine += [
                    FilePlan(f.name, tuple(k for k in f.keys if k in wanted), b"", 0, f.writer)
                    for f in part.files
                    if f not in mine and f.writer == MASTER and any(k in wanted for k in f.keys)
                ]
            tensors = {k: part.tensors[k] for k in wanted}
            parts[name] = PartPlan(name, tuple(mine), tensors, {}, None, 0, part.fmt)
        return SavePlan(self.step, self.directory, self.world_size, self.mode, self.fmt, parts)

    def chunk_map(self, part: str) -> dict[str, Any]:
        """What the marker records of each sharded tensor: its global shape and every chunk's box and ranks."""
        out: dict[str, Any] = {}
        for key, layout in self.parts[part].tensors.items():
            if len(layout.chunks) > 1 or layout.chunks[0].shape != layout.shape:
                out[key] = {
                    "shape": list(layout.shape),
                    "file": layout.file,
                    "chunks": [
                        {"offsets": list(c.offsets), "shape": list(c.shape), "ranks": list(c.ranks)}
                        for c in layout.chunks
                    ],
                }
        return out


@dataclass
class _Duties:
    streams: list[tuple[PartPlan, FilePlan]] = field(default_factory=list)
    pieces: list[tuple[PartPlan, FilePlan, TensorLayout, int]] = field(default_factory=list)
    sends: list[tuple[str, str]] = field(default_factory=list)
    replicas: list[tuple[str, str]] = field(default_factory=list)


_NONE = _Duties()


def check_rank_state(state: Any, what: str) -> None:
    """ValueError naming the key when ``state`` describes tensors that could not be read back.

    Every key a string (not safetensors' reserved ``__metadata__``), every dtype one of
    :data:`~ray_ckpt.core.format.buffers.DTYPE_SIZE`, every shape a sequence of non-negative ints with
    ``nbytes == numel * itemsize``, a shard's box inside its global shape, every alias naming one
    of the rank's tensors. Checked before anything is planned or written.
    """
    if not isinstance(state, RankState):
        raise ValueError(f"{what}: expected a RankState, got {type(state).__name__}")
    if not isinstance(state.tensors, dict):
        raise ValueError(f"{what}: tensors must be a dict, got {type(state.tensors).__name__}")
    for key, meta in state.tensors.items():
        if not isinstance(key, str):
            raise ValueError(f"{what}: key {key!r} is not a string ({type(key).__name__})")
        if key == RESERVED_KEY:
            raise ValueError(f"{what}: key {key!r} is reserved by safetensors for the file's metadata")
        if not isinstance(meta, TensorMeta):
            raise ValueError(f"{what}: key {key!r}: expected a TensorMeta, got {type(meta).__name__}")
        if not isinstance(meta.dtype, str) or meta.dtype not in DTYPE_SIZE:
            raise ValueError(f"{what}: key {key!r}: unknown dtype {meta.dtype!r} (known: {', '.join(DTYPE_SIZE)})")
        shape = _dims(meta.shape, what, key, "shape")
        expected = math.prod(shape) * DTYPE_SIZE[meta.dtype]
        if isinstance(meta.nbytes, bool) or not isinstance(meta.nbytes, int) or meta.nbytes != expected:
            raise ValueError(
                f"{what}: key {key!r}: declares {meta.nbytes!r} bytes, but {meta.dtype}{list(shape)} "
                f"holds {expected} bytes"
            )
        if meta.global_shape is not None or meta.offsets is not None:
            global_shape = _dims(meta.global_shape, what, key, "global_shape")
            offsets = _dims(meta.offsets, what, key, "offsets")
            if not len(global_shape) == len(offsets) == len(shape):
                raise ValueError(f"{what}: key {key!r}: shape, global_shape and offsets differ in length")
            for d, (n, g, o) in enumerate(zip(shape, global_shape, offsets, strict=True)):
                if o + n > g:
                    raise ValueError(
                        f"{what}: key {key!r}: dimension {d}: offset {o} + local size {n} is past the global size {g}"
                    )
        else:
            global_shape = shape
        total = math.prod(global_shape) * DTYPE_SIZE[meta.dtype]
        if total > MAX_BYTES:
            raise ValueError(
                f"{what}: key {key!r}: {meta.dtype}{list(global_shape)} is {total} bytes, past the {MAX_BYTES}-byte "
                "limit of a file"
            )
    if not isinstance(state.aliases, dict):
        raise ValueError(f"{what}: aliases must be a dict, got {type(state.aliases).__name__}")
    for alias, target in state.aliases.items():
        if not isinstance(alias, str) or alias in state.tensors:
            raise ValueError(f"{what}: alias {alias!r} is not a string key of its own")
        if not isinstance(target, str) or target not in state.tensors:
            raise ValueError(f"{what}: alias {alias!r} points to {target!r}, which is not one of the rank's tensors")


def _dims(value: Any, what: str, key: str, field_name: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in value
    ):
        raise ValueError(f"{what}: key {key!r}: {field_name} {value!r} is not a sequence of non-negative integers")
    return tuple(value)


def plan_save(
    step: int,
    states: Mapping[int, Mapping[str, RankState | None]],
    *,
    directory: str,
    mode: Mode,
    max_shard_size: int,
    fmt: str = "safetensors",
    local_storage: bool = True,
) -> SavePlan:
    """Plan a save from every rank's descriptions (``states[rank][part]``); ValueError names key and ranks.

    ``mode`` gather: the master writes every file. direct: each rank writes the files of its own
    whole tensors; files of tensors chunked over several ranks are SHARED on a local disk and
    written by the master from chunks the ranks send on an object store.
    """
    world_size = len(states)
    parts: dict[str, PartPlan] = {}
    for part in (MODEL, TRAINER):
        by_rank = {r: s[part] for r, s in sorted(states.items()) if s.get(part) is not None}
        if not by_rank:
            continue
        parts[part] = _plan_part(  # trainer state is always safetensors: it is never a model file
            part,
            by_rank,
            mode=mode,
            max_shard_size=max_shard_size,
            fmt=fmt if part == MODEL else "safetensors",
            local_storage=local_storage,
        )
    return SavePlan(step, directory, world_size, mode, fmt, parts)


def _plan_part(
    part: str,
    states: Mapping[int, RankState],
    *,
    mode: Mode,
    max_shard_size: int,
    fmt: str,
    local_storage: bool,
) -> PartPlan:
    what = "trainer_state" if part == TRAINER else "model"
    layouts = _merge(states, what)
    if fmt != "safetensors":
        sharded = [k for k, lay in layouts.items() if not lay.whole]
        if sharded:
            raise ValueError(
                f"{what}: keys {sharded[:3]} are sharded over ranks; checkpoint_format={fmt!r} stores whole "
                "tensors only (use safetensors)"
            )
    # One group of files per rank (its whole tensors, written by it in direct mode), then one
    # group for the tensors chunked over several ranks: every file has one writer or is SHARED.
    groups: dict[int, list[tuple[str, int]]] = {}
    for key, layout in layouts.items():
        writers = {c.writer for c in layout.chunks}
        owner = next(iter(writers)) if len(writers) == 1 else SHARED
        groups.setdefault(owner, []).append((key, layout.nbytes))
    order = sorted(r for r in groups if r >= 0) + ([SHARED] if SHARED in groups else [])
    prefix, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if part == TRAINER:
        prefix = "trainer_state/trainer_state"
    specs = plan_shards([groups[g] for g in order], max_shard_size, prefix=prefix, ext=ext)
    group_of = {key: g for g in order for key, _ in groups[g]}
    files: list[FilePlan] = []
    placed: dict[str, TensorLayout] = {}
    for spec in specs:
        group = group_of[spec.keys[0]] if spec.keys else (order[0] if order else MASTER)
        if mode == "gather":
            writer = MASTER
        elif group == SHARED:
            writer = SHARED if local_storage else MASTER
        else:
            writer = group
        if fmt == "safetensors":
            entries = {k: _Entry(layouts[k].dtype, layouts[k].shape, layouts[k].nbytes) for k in spec.keys}
            header, keys = safetensors_layout(entries, spec.keys)  # type: ignore[arg-type]
        else:
            header, keys = b"", list(spec.keys)
        position = len(header)
        for key in keys:
            placed[key] = TensorLayout(
                key, layouts[key].dtype, layouts[key].shape, layouts[key].chunks, spec.name, position
            )
            position += layouts[key].nbytes
        if position > MAX_BYTES:
            raise ValueError(f"{what}: file {spec.name} would hold {position} bytes, past the {MAX_BYTES}-byte limit")
        files.append(FilePlan(spec.name, tuple(keys), header, position, writer))
    aliases = _merge_aliases(states, layouts, what)
    structure = _structure(states, what)
    tensors = {key: placed[key] for key in layouts}
    total = sum(t.nbytes for t in tensors.values())
    return PartPlan(part, tuple(files), tensors, aliases, structure, total, fmt)


@dataclass
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _merge_aliases(states: Mapping[int, RankState], layouts: Mapping[str, TensorLayout], what: str) -> dict[str, str]:
    """Every rank's ties (alias -> tensor), checked against the other ranks' keys.

    A rank checks its own aliases (:func:`check_rank_state`); across ranks an alias must not be
    a tensor another rank holds (the load would return the target's values for it), and ranks
    that declare the same alias must tie it to the same tensor. ValueError names key and ranks.
    """
    aliases: dict[str, tuple[str, int]] = {}
    holders = {key: min(c.ranks[0] for c in layout.chunks) for key, layout in layouts.items()}
    for rank in sorted(states):
        for alias, target in states[rank].aliases.items():
            if alias in holders:
                raise ValueError(
                    f"{what}: key {alias!r}: rank {rank} ties it to {target!r}, but rank {holders[alias]} holds it "
                    "as a tensor of its own"
                )
            seen = aliases.setdefault(alias, (target, rank))
            if seen[0] != target:
                raise ValueError(
                    f"{what}: key {alias!r}: ranks {seen[1]} and {rank} tie it to different tensors "
                    f"({seen[0]!r} vs {target!r})"
                )
    return {alias: target for alias, (target, _) in aliases.items()}


def _structure(states: Mapping[int, RankState], what: str) -> Any:
    """The nesting every rank shares; ranks that disagree are named (their non-tensor state differs)."""
    first_rank = min(states)
    structure = states[first_rank].structure
    for rank, state in states.items():
        if state.structure != structure:
            raise ValueError(
                f"{what}: ranks {first_rank} and {rank} pass differently nested state (or different non-tensor "
                "values); every rank must pass the same structure, with per-rank values as tensors or shards"
            )
    return structure


def _merge(states: Mapping[int, RankState], what: str) -> dict[str, TensorLayout]:
    """Per key: one dtype and global shape, its distinct boxes (replicas merged), full coverage."""
    dtype: dict[str, tuple[str, tuple[int, ...], int]] = {}
    boxes: dict[str, dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]]] = {}
    for rank in sorted(states):
        for key, meta in states[rank].tensors.items():
            shape = tuple(meta.shape)
            global_shape = tuple(meta.global_shape) if meta.global_shape is not None else shape
            offsets = tuple(meta.offsets) if meta.offsets is not None else (0,) * len(shape)
            seen = dtype.get(key)
            if seen is None:
                dtype[key] = (meta.dtype, global_shape, rank)
            elif seen[:2] != (meta.dtype, global_shape):
                raise ValueError(
                    f"{what}: key {key!r}: ranks {seen[2]} and {rank} disagree on the tensor: "
                    f"{seen[0]}{list(seen[1])} vs {meta.dtype}{list(global_shape)}"
                )
            boxes.setdefault(key, {}).setdefault((offsets, shape), []).append(rank)
    layouts: dict[str, TensorLayout] = {}
    for key, (dt, global_shape, _) in dtype.items():
        chunks = tuple(Chunk(o, s, tuple(r)) for (o, s), r in boxes[key].items())
        _check_coverage(key, global_shape, chunks, what)
        layouts[key] = TensorLayout(key, dt, global_shape, chunks)
    return layouts


def _check_coverage(key: str, shape: tuple[int, ...], chunks: tuple[Chunk, ...], what: str) -> None:
    """Chunks must tile the tensor: no two overlap, and together they hold every element."""
    for i, a in enumerate(chunks):
        if any(n == 0 for n in a.shape):
            continue
        for b in chunks[i + 1 :]:
            if any(n == 0 for n in b.shape):
                continue
            if all(
                ao < bo + bn and bo < ao + an
                for ao, an, bo, bn in zip(a.offsets, a.shape, b.offsets, b.shape, strict=True)
            ):
                raise ValueError(
                    f"{what}: key {key!r}: the chunks of ranks {list(a.ranks)} (offsets {list(a.offsets)}, "
                    f"shape {list(a.shape)}) and {list(b.ranks)} (offsets {list(b.offsets)}, shape "
                    f"{list(b.shape)}) overlap"
                )
    covered = sum(math.prod(c.shape) for c in chunks)
    if covered != math.prod(shape):
        ranks = sorted({r for c in chunks for r in c.ranks})
        raise ValueError(
            f"{what}: key {key!r}: the chunks of ranks {ranks} cover {covered} of the {math.prod(shape)} elements of "
            f"{list(shape)}: parts of the tensor are missing"
        )
