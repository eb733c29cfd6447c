"""Writing a step and committing it: the commit protocol.

A :class:`StepWriter` writes a step's files into its directory (or, when it replaces a committed
step, into a staging directory), fsyncs them, and commits by writing ``checkpoint.json`` last.
Call order: ``begin`` (the host's ``prepare_step``) -> ``write_*`` / ``add_files`` -> ``commit``
(marker, then the swap of a replacement) or ``abort``. The same file writers serve the store, the
checkpointer (gather mode) and the ranks of a direct-mode save.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import posixpath
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from ray_ckpt.core.config import CheckpointConfig
from ray_ckpt.core.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from ray_ckpt.core.format.buffers import DTYPE_PACKING, DTYPE_SIZE, TensorBuffer, to_tensor
from ray_ckpt.core.format.checks import FileCheck
from ray_ckpt.core.format.digests import (
    BLOCK_SIZE,
    BlockDigests,
    Checksum,
    ChunkDigest,
    FileDigest,
    HashingWriter,
    block_digests,
    digest_hex,
    hash_pool,
)
from ray_ckpt.core.format.hf_index import ShardSpec, hf_index_bytes, index_file_name
from ray_ckpt.core.format.tree import FlatState
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.layout import (
    CHECKPOINTS_DIR,
    EVAL_FILE,
    FORMAT_VERSION,
    INDEX_LOG_DIR,
    LEASES_DIR,
    MARKER_FILE,
    REPLACE_RE,
    RETIRING_FILE,
    TRAINER_STATE_JSON,
    Manifest,
    parse_step_dir,
    retired_dir,
    staging_dir,
    step_dir,
    validate_metrics,
)
from ray_ckpt.core.planner import (
    MASTER,
    MODEL,
    SHARED,
    TRAINER,
    FilePlan,
    PartPlan,
    RankState,
    SavePlan,
    TensorLayout,
    describe,
    plan_save,
)
from ray_ckpt.core.reader import StepReader
from ray_ckpt.core.safejson import check_depth
from ray_ckpt.core.shard import box_runs, box_view
from ray_ckpt.core.storage.base import is_temp_name
from ray_ckpt.core.storage.local import DirectFileWriter, direct_io_alignment
from ray_ckpt.core.storage.storage import Storage

logger = logging.getLogger(__name__)

# Shard files written at once on a local disk: concurrent write()+fsync streams keep this VM's disk
# busier than one stream does (direct mode, where each rank writes its own shard, gets the same).
SHARD_WRITERS = 2


class WriterHost(Protocol):
    """What a StepWriter needs of the run it writes into (the store implements it)."""

    config: CheckpointConfig
    storage: Storage

    def prepare_step(self, step: int, *, overwrite: bool) -> str | None:
        """Check the step may be written and make its directory; a replace id when it replaces one."""
        ...

    def policy(self) -> dict[str, Any]:
        """The ranking and retention settings recorded in the marker."""
        ...

    def record_commit(self, manifest: Manifest) -> CheckpointInfo:
        """Add a just-committed step to the run's index; its record."""
        ...

    def model_side_files(self) -> dict[str, bytes]:
        """Files written beside each step's model index (``config.json`` of a HF model)."""
        ...


class StepWriter:
    """Writes the files of one step, then commits them with the marker written last.

    Until :meth:`commit` the step directory is invisible to every reader; :meth:`abort` removes it.
    """

    def __init__(self, store: WriterHost, step: int, *, overwrite: bool = False) -> None:
        self.store = store
        self.step = step
        self.files: dict[str, FileDigest] = {}
        self.model: dict[str, Any] = {}
        self.trainer_state = False
        self.committed = False
        # Where the files go: the step's own directory, or, when this replaces a committed step
        # (overwrite=True), a staging directory swapped in only once it is committed.
        self.replace_id: str | None = store.prepare_step(step, overwrite=overwrite)
        self.dir = step_dir(step) if self.replace_id is None else staging_dir(step, self.replace_id)

    # -- planned files (the one write path of every save) ---------------------------------------
    def plan(self, states: Mapping[int, Mapping[str, RankState | None]], *, mode: str = "gather") -> SavePlan:
        """The plan of this step from every rank's descriptions (see :func:`ray_ckpt.core.planner.plan_save`).

        SHARED files (direct mode, tensors chunked over ranks, local disk) are created here, header
        written and sized, so that every rank can write its byte ranges into place.
        """
        config = self.store.config
        plan = plan_save(
            self.step,
            states,
            directory=self.dir,
            mode=mode,  # type: ignore[arg-type]
            max_shard_size=int(config.max_shard_size),
            fmt=config.checkpoint_format,
            local_storage=self.store.storage.is_local,
        )
        for _, fplan in plan.streams(SHARED):
            self.add_part(fplan.name, create_shared_file(self.store.storage, self.dir, fplan))
        return plan

    def write_share(self, plan: SavePlan, source: ChunkSource) -> None:
        """Write the master's share of a plan (every file in gather mode)."""
        files = write_share(self.store.storage, plan, MASTER, source, direct_io=self.store.config.direct_io)
        for name, digest in files.items():
            self.add_part(name, digest)

    def add_part(self, name: str, digest: FileDigest) -> None:
        """Record one writer's digests of a file (merged with other writers' parts of a SHARED file)."""
        self.files[name] = self.files[name].merge(digest, name=name) if name in self.files else digest

    def seal_shared(self, plan: SavePlan) -> None:
        """fsync the SHARED files once every rank has written its ranges into them (nothing is read back:
        each rank recorded the block digests of what it wrote)."""
        for _, fplan in plan.streams(SHARED):
            fsync_file(self.store.storage, f"{self.dir}/{fplan.name}")

    def check_digests(self, plan: SavePlan) -> None:
        """Every planned tensor file holds its header's digest and one record per non-empty chunk.

        What the master checks before the commit: a rank that wrote no digests, or digests of
        chunks the plan did not give it, aborts the step (ValueError names the file and key).
        """
        for part in plan.parts.values():
            if part.fmt != "safetensors":
                continue
            for fplan in part.files:
                blocks = self.files[fplan.name].blocks if fplan.name in self.files else None
                if blocks is None or blocks.header is None:
                    raise ValueError(f"{fplan.name}: written without its header's digest")
                for key in fplan.keys:
                    layout = part.tensors[key]
                    planned = sorted(recorded_boxes(layout))
                    whole = ((0,) * len(layout.shape), layout.shape)
                    recorded = sorted(
                        whole if c.offsets is None else (c.offsets, c.shape) for c in blocks.tensors.get(key, ())
                    )
                    if recorded != planned:
                        raise ValueError(
                            f"{fplan.name}: tensor {key!r}: digests recorded for the chunks {recorded[:4]}, "
                            f"planned {planned[:4]}"
                        )

    def check_planned(self, plan: SavePlan) -> None:
        """Every file the ranks wrote holds what the plan says: ValueError naming the file, key and ranks.

        A rank's description is a claim: a file it streamed must have its planned size, and the
        ranges it declared in a SHARED file must have been written (a range never written is a
        hole in the sparse file the master created). So a rank declaring more than it holds
        (halves of a 2 TiB tensor it does not have) is refused before the master reads or
        commits anything of it.
        """
        for part, fplan in plan.streams(SHARED):
            hole = first_hole(self.store.storage, f"{self.dir}/{fplan.name}", len(fplan.header), fplan.size)
            if hole is not None:
                key = next((k for k in fplan.keys if part.tensors[k].begin + part.tensors[k].nbytes > hole), "?")
                ranks = sorted({r for c in part.tensors[key].chunks for r in c.ranks}) if key != "?" else []
                raise ValueError(
                    f"{fplan.name}: byte {hole} of key {key!r} was never written: ranks {ranks} declared more than "
                    "they wrote"
                )
        for rank in range(plan.world_size):
            for part, fplan in plan.streams(rank):
                got = self.files.get(fplan.name)
                if part.fmt == "safetensors" and got is not None and got.size != fplan.size:
                    raise ValueError(f"{fplan.name}: rank {rank} wrote {got.size} bytes, its plan {fplan.size} bytes")

    def write_indexes(self, plan: SavePlan) -> None:
        """Write each part's index (the HF ``*.index.json``; trainer_state.json) and record them for the marker.

        Called once every file is written: the files' digests are checked against the plan first.
        """
        self.check_digests(plan)
        model = plan.parts.get(MODEL)
        if model is not None:
            fmt = plan.fmt
            name = index_file_name(*(("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")))
            shards = [ShardSpec(f.name, list(f.keys)) for f in model.files]
            values = sum(math.prod(t.shape) * DTYPE_PACKING.get(t.dtype, 1) for t in model.tensors.values())
            self._write_small(name, hf_index_bytes(shards, model.total_size, values))
            self.model = {
                "format": fmt,
                "index": name,
                "total_size": model.total_size,
                "structure": model.structure,
                "aliases": dict(model.aliases),
            }
            chunks = plan.chunk_map(MODEL)
            if chunks:
                self.model["sharded"] = chunks
            for side, data in self.store.model_side_files().items():  # a complete HF model folder
                self._write_small(side, data)
        trainer = plan.parts.get(TRAINER)
        if trainer is not None:
            payload = {
                "format_version": FORMAT_VERSION,
                "structure": trainer.structure,
                "aliases": dict(trainer.aliases),
                "weight_map": {key: layout.file for key, layout in trainer.tensors.items()},
            }
            chunks = plan.chunk_map(TRAINER)
            if chunks:
                payload["sharded"] = chunks
            check_depth(payload, name=f"{self.dir}/{TRAINER_STATE_JSON}")  # what its reader would refuse
            self._write_small(TRAINER_STATE_JSON, json.dumps(payload, indent=1).encode())
            self.trainer_state = True

    def write_state(self, flat: FlatState | None, trainer: FlatState | None = None) -> SavePlan:
        """Plan and write a single process's state (and trainer state), with their indexes."""
        states = {
            0: {
                MODEL: describe(flat) if flat is not None else None,
                TRAINER: describe(trainer) if trainer is not None else None,
            }
        }
        plan = self.plan(states)
        flats = {MODEL: flat, TRAINER: trainer}
        self.write_share(plan, lambda part, key, rank: flats[part].tensors[key].data)  # type: ignore[union-attr]
        self.write_indexes(plan)
        return plan

    def write_trainer_state(self, flat: FlatState) -> None:
        """Write a trainer state alone (a step of trainer files, e.g. the Metta layout)."""
        self.write_state(None, flat)

    def adopt_records(self, manifest: Manifest) -> None:
        """Record the model index and trainer state of a step whose files were copied here as-is."""
        self.model = dict(manifest.model)
        self.trainer_state = manifest.trainer_state

    def add_file(self, name: str, digest: FileDigest) -> None:
        """Record a file some other process wrote into the step directory (direct mode)."""
        self.add_files({name: digest})

    def add_files(self, files: Mapping[str, FileDigest]) -> None:
        """Record files other processes wrote into the step directory (direct mode).

        Each must exist with the reported size (one listing per directory, not a stat per file:
        on an object store that is one request for a thousand ranks' shards); digests are taken
        as reported (parts of one SHARED file from several ranks are merged; see
        :meth:`check_digests`).
        """
        by_dir: dict[str, list[str]] = {}
        for name in files:
            by_dir.setdefault(posixpath.dirname(name), []).append(name)
        for sub, names in by_dir.items():
            sizes = self.store.storage.file_sizes(f"{self.dir}/{sub}" if sub else self.dir)
            for name in names:
                size = sizes.get(posixpath.basename(name))
                if size is None:
                    raise CorruptCheckpointError(f"{name}: reported written but missing from {self.dir}", path=name)
                if size != files[name].size:
                    raise CorruptCheckpointError(
                        f"{name}: size {size} differs from the reported {files[name].size}", path=name
                    )
        for name, digest in files.items():
            self.add_part(name, digest)

    def _write_small(self, name: str, data: bytes) -> None:
        self.files[name] = write_small_file(self.store.storage, self.dir, name, data)

    # -- commit -------------------------------------------------------------------------------
    def commit(
        self,
        *,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        world_size: int = 1,
        kind: str = "state_dict",
        extra: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Make the step visible: fsync the directory, then write checkpoint.json last."""
        storage = self.store.storage
        storage.fsync_dir(self.dir)
        manifest = Manifest(
            step=self.step,
            created=time.time(),
            metrics=validate_metrics(metrics),
            world_size=int(world_size),
            metadata=dict(metadata or {}),
            files=dict(self.files),
            model=self.model,
            trainer_state=self.trainer_state,
            kind=kind,
            extra={
                "policy": self.store.policy(),
                **{k: v for k, v in (extra or {}).items() if k != "replace_id"},  # a copied step's is not ours
                **({"replace_id": self.replace_id} if self.replace_id else {}),
            },
        )
        try:
            json.dumps(manifest.metadata)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata: not JSON serialisable: {exc}") from exc
        except RecursionError:
            raise ValueError("metadata: nested too deep to be written as JSON") from None
        check_depth(
            {"metadata": manifest.metadata, "model": manifest.model, **manifest.extra}, name=f"{self.dir}/{MARKER_FILE}"
        )
        storage.write_atomic(f"{self.dir}/{MARKER_FILE}", manifest.to_json_bytes())
        storage.fsync_dir(CHECKPOINTS_DIR)
        if self.replace_id is not None:
            # The new version is complete and committed under its staging name: swap it in.
            # Any crash from here on leaves the old or the new version (see swap_in_replacement);
            # a failed swap keeps the staged copy (no abort removes it): the next start finishes it.
            self.committed = True
            swap_in_replacement(storage, self.step, self.replace_id)
            self.dir = step_dir(self.step)
        self.committed = True
        return self.store.record_commit(manifest)

    def abort(self) -> None:
        """Remove everything written for this step (it was never visible)."""
        if not self.committed:
            self.store.storage.rm(self.dir, recursive=True, missing_ok=True)

    def __enter__(self) -> StepWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            try:
                self.abort()
            except OSError as exc:  # e.g. the endpoint is down: keep the save's own error, gc() cleans up later
                logger.warning("could not remove the aborted %s (gc() will): %s", self.dir, exc)


def swap_in_replacement(storage: Storage, step: int, replace_id: str) -> None:
    """Put the committed staging copy of ``step`` in place of the committed old one.

    A crash at any point leaves the old or the new version at the step's path, or the new one
    committed under its staging name, which the next writer start (``gc``) proves complete and
    swaps in:
    - local disk: one atomic ``renameat2(RENAME_EXCHANGE)`` of the two directories; where that
      is missing, the old directory is renamed aside, then the new one into place;
    - object store (no renames): the old marker goes first (the step turns invisible), the new
      files are copied in server-side over the old ones, the marker is copied last, and only
      then are the old version's other objects removed. The staged copy stays complete until
      the new version is in place, so a copy that fails loses nothing: the next start redoes it.
    """
    staged, target = staging_dir(step, replace_id), step_dir(step)
    if storage.is_local:
        if storage.exchange(staged, target):
            storage.fsync_dir(CHECKPOINTS_DIR)
            storage.rm(staged, recursive=True, missing_ok=True)  # the old version, now under that name
            return
        old = retired_dir(step, replace_id)
        if storage.exists(target):
            storage.move(target, old)
        storage.move(staged, target)
        storage.fsync_dir(CHECKPOINTS_DIR)
        storage.rm(old, recursive=True, missing_ok=True)
        return
    marker = f"{staged}/{MARKER_FILE}"
    manifest = Manifest.from_json_bytes(storage.read_bytes(marker), name=marker)
    storage.rm(f"{target}/{MARKER_FILE}", missing_ok=True)
    storage.rm(f"{target}/{EVAL_FILE}", missing_ok=True)  # the old version's scores are not the new one's
    for name in sorted(manifest.files):
        storage.copy(f"{staged}/{name}", f"{target}/{name}")
    storage.copy(marker, f"{target}/{MARKER_FILE}")
    keep = {*manifest.files, MARKER_FILE}
    for name in storage.find(target):
        if name not in keep:
            storage.rm(f"{target}/{name}", missing_ok=True)  # the old version's files the new one lacks
    storage.rm(staged, recursive=True, missing_ok=True)


def prove_staged(storage: Storage, run_name: str, step: int, directory: str) -> Manifest:
    """The marker of a staged version of ``step`` in ``directory``, proven complete; else an error.

    What lets a crashed replacement be finished without trusting whatever sits under a staging
    name: the directory is no symlink and holds none, its marker is one of ``step``, and every
    file the marker lists is there with its committed size and checksum and passes every check
    a load makes (the reader's own :meth:`~ray_ckpt.core.reader.StepReader.verify`). Raises
    CorruptCheckpointError (or CheckpointNotFoundError without a marker) naming what is wrong;
    a storage failure is a StorageError.
    """
    links = storage.symlinks(directory)
    if links:
        raise CorruptCheckpointError(f"{links[0]}: a symlink in a staged step (never swapped in)", path=links[0])
    reader = StepReader(storage, run_name, directory=lambda _: directory)
    manifest = reader.read_manifest(step)  # its step must be this one
    reader.verify(manifest)
    return manifest


COPY_CHUNK = 16 << 20  # bytes read at a time by copy_checked


def copy_checked(
    src: Storage,
    src_path: str,
    dst: Storage,
    dst_path: str,
    expected: FileDigest | None = None,
    *,
    on_chunk: Callable[[int], None] | None = None,
) -> FileDigest:
    """Stream one file from ``src`` to ``dst``, hashing the bytes as they pass; their digest.

    The one checksum-checking copy between storages (a tiered store's uploads, the CLI's
    ``download``). With ``expected`` (the file's record in a marker: its size and checksum or
    block digests, checked as the bytes pass, see :class:`~ray_ckpt.core.format.checks.FileCheck`) a copy
    that differs is removed and raises CorruptCheckpointError naming the file (and for a block,
    the tensor and byte range): a damaged file is never passed on as good, and the copy's record
    is ``expected`` itself. ``on_chunk`` gets each chunk's size (progress). The target is fsync'd
    when local; a failed remote write is retried by ``dst`` from the start. Hashed on the calling
    thread (xxh3 is far faster than any upload): a background copy puts no work on the thread
    pools that commits share.
    """
    failure: list[CorruptCheckpointError] = []

    def copy(f: Any) -> FileDigest:
        failure.clear()
        check = FileCheck(expected, name=src.url(src_path)) if expected is not None else None
        checksum, size = Checksum(), 0
        with src.open_read(src_path) as source:
            while chunk := source.read(COPY_CHUNK):
                try:
                    (check or checksum).update(chunk)
                except CorruptCheckpointError as exc:
                    failure.append(exc)  # not a storage failure: no retry, no partial copy kept
                    break
                f.write(chunk)
                size += len(chunk)
                if on_chunk is not None:
                    on_chunk(len(chunk))
        if check is not None and not failure:
            try:
                check.finish()
            except CorruptCheckpointError as exc:
                failure.append(exc)
        return expected if check is not None else FileDigest(size, checksum.hexdigest())  # type: ignore[return-value]

    got = dst.write_stream(dst_path, copy, size_hint=expected.size if expected is not None else 0)
    if failure:
        dst.rm(dst_path, missing_ok=True)
        raise CorruptCheckpointError(f"{failure[0]}; not copying a damaged file (the copy was removed)", path=src_path)
    return got


def write_small_file(storage: Storage, directory: str, name: str, data: bytes) -> FileDigest:
    """Write a small file whole (fsync'd when local) and return its digest."""
    storage.write_bytes(f"{directory}/{name}", data)
    checksum = Checksum()
    checksum.update(data)
    return FileDigest(len(data), checksum.hexdigest())


ChunkSource = Callable[[str, str, int], np.ndarray]
"""(part, key, rank) -> that rank's bytes of the key, a flat uint8 array (its local chunk)."""


def write_share(
    storage: Storage, plan: SavePlan, writer: int, source: ChunkSource, *, direct_io: bool = True
) -> dict[str, FileDigest]:
    """Execute one writer's share of a plan: the files it streams and its ranges of SHARED files.

    The one write path: the master (``writer=MASTER``) and every rank in a direct-mode save call
    it. Streamed files go SHARD_WRITERS at a time on a local disk (parallel writes and fsyncs).
    Returns the digests of the files written whole; SHARED files are sealed by the master.
    """
    streams = plan.streams(writer)
    files: dict[str, FileDigest] = {}

    def one(item: tuple[PartPlan, FilePlan]) -> None:
        part, fplan = item
        files[fplan.name] = write_planned_file(
            storage, plan.directory, part, fplan, source, part.fmt, direct_io=direct_io
        )

    if len(streams) < 2 or not storage.is_local:
        for item in streams:
            one(item)
    else:
        with concurrent.futures.ThreadPoolExecutor(min(SHARD_WRITERS, len(streams)), "ray-ckpt-shard") as pool:
            for future in [pool.submit(one, item) for item in streams]:
                future.result()  # the first error; leaving the pool still waits for the other writes
    pieces = plan.pieces(writer)
    if pieces:
        files.update(write_pieces(storage, plan.directory, pieces, source, direct_io=direct_io))
    return files


def write_planned_file(
    storage: Storage,
    directory: str,
    part: PartPlan,
    fplan: FilePlan,
    source: ChunkSource,
    fmt: str = "safetensors",
    *,
    direct_io: bool = True,
) -> FileDigest:
    """Stream one planned file: its header, then each tensor's bytes, hashed on the way out.

    A tensor held whole by one rank is written from that rank's buffer (no copy); one chunked over
    ranks is assembled in a buffer of its own size first (memory bounded by the biggest tensor).
    """
    path = f"{directory}/{fplan.name}"
    if fmt != "safetensors":

        def write_pt(f: Any) -> FileDigest:
            out = HashingWriter(f)
            tensors = {}
            for key in fplan.keys:
                layout = part.tensors[key]
                data = source(part.part, key, layout.chunks[0].writer)
                tensors[key] = to_tensor(TensorBuffer(layout.dtype, layout.shape, data))
            torch.save(tensors, out)
            return FileDigest(out.size, out.checksum.hexdigest())

        return storage.write_stream(path, write_pt)

    def write(f: Any) -> FileDigest:
        f.write(fplan.header)
        hashed: dict[str, list[tuple[TensorLayout, int, concurrent.futures.Future]]] = {}
        for key in fplan.keys:
            layout = part.tensors[key]
            hashed[key] = [
                (layout, i, hash_pool().submit(block_digests, source(part.part, key, layout.chunks[i].writer)))
                for i in recorded_chunks(layout)
            ]
            if not layout.nbytes:
                continue
            for piece in tensor_bytes(layout, lambda rank, key=key: source(part.part, key, rank)):
                f.write(memoryview(piece).cast("B"))
        tensors = {
            key: tuple(chunk_digest(lay, i, job.result()) for lay, i, job in jobs) for key, jobs in hashed.items()
        }
        return FileDigest(fplan.size, None, BlockDigests(BLOCK_SIZE, digest_hex(fplan.header), tensors))

    return storage.write_stream(path, write, size_hint=fplan.size if direct_io else 0)


def recorded_chunks(layout: TensorLayout) -> list[int]:
    """The chunks of a tensor that get block digests: every non-empty one (an empty tensor: its one chunk)."""
    if not layout.nbytes:
        return [0]
    return [i for i, c in enumerate(layout.chunks) if math.prod(c.shape)]


def recorded_boxes(layout: TensorLayout) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, shape) of each chunk :func:`recorded_chunks` gives (the whole tensor for an empty one)."""
    if not layout.nbytes:
        return [((0,) * len(layout.shape), layout.shape)]
    return [(layout.chunks[i].offsets, layout.chunks[i].shape) for i in recorded_chunks(layout)]


def chunk_digest(layout: TensorLayout, index: int, blocks: str) -> ChunkDigest:
    """The record of one chunk's block digests: its box, unless it is the whole tensor."""
    chunk = layout.chunks[index]
    if not layout.nbytes or (layout.whole and chunk.shape == layout.shape):
        return ChunkDigest(blocks)
    return ChunkDigest(blocks, chunk.offsets, chunk.shape)


def tensor_bytes(layout: TensorLayout, chunk_bytes: Callable[[int], np.ndarray]) -> list[np.ndarray]:
    """A tensor's full bytes, in order, as buffers to write one after another.

    A whole tensor is its buffer; chunks that are each one contiguous range of the tensor (dim-0
    shards, the FSDP case) are their own buffers in offset order: no copy. Only chunks that
    interleave (dim-1 shards) are assembled into one buffer of the tensor's size.
    """
    if layout.whole:
        return [chunk_bytes(layout.chunks[0].writer)]
    itemsize = DTYPE_SIZE[layout.dtype]
    runs = []
    for chunk in layout.chunks:
        starts, length = box_runs(layout.shape, chunk.offsets, chunk.shape, itemsize)
        if len(starts) > 1:
            return [assemble(layout, chunk_bytes)]
        if len(starts):
            runs.append((int(starts[0]), chunk))
    return [chunk_bytes(chunk.writer) for _, chunk in sorted(runs, key=lambda r: r[0])]


def assemble(layout: TensorLayout, chunk_bytes: Callable[[int], np.ndarray]) -> np.ndarray:
    """A tensor's full bytes from its chunks (a whole tensor's buffer as it is, without a copy)."""
    if layout.whole:
        return chunk_bytes(layout.chunks[0].writer)
    full = np.empty(layout.nbytes, dtype=np.uint8)
    itemsize = DTYPE_SIZE[layout.dtype]
    for chunk in layout.chunks:
        if math.prod(chunk.shape):
            data = chunk_bytes(chunk.writer)
            box_view(full, layout.shape, chunk.offsets, chunk.shape)[...] = data.reshape(*chunk.shape, itemsize)
    return full


def write_pieces(
    storage: Storage,
    directory: str,
    pieces: list[tuple[PartPlan, FilePlan, TensorLayout, int]],
    source: ChunkSource,
    *,
    direct_io: bool = True,
) -> dict[str, FileDigest]:
    """Write chunks into place in SHARED files (positioned writes; local disk only) and fsync them.

    With ``direct_io`` the aligned middle of each big run (a dim-0 shard is one run) goes to disk
    with O_DIRECT, as a streamed file does; its unaligned edges through the page cache. Returns this
    writer's part of each file's digests: the block digests of the chunks it wrote, hashed from
    its own buffers while they are written (nothing is read back).
    """
    parts: dict[str, FileDigest] = {}
    fds: dict[str, int] = {}
    local_paths: dict[str, str] = {}
    try:
        for part, fplan, layout, index in pieces:
            chunk = layout.chunks[index]
            if fplan.name not in fds:
                local = storage.local_path(f"{directory}/{fplan.name}")
                if local is None:
                    raise ValueError(f"{fplan.name}: positioned writes need local storage, not {storage.uri!r}")
                fds[fplan.name] = os.open(local, os.O_WRONLY)
                local_paths[fplan.name] = local
            fd = fds[fplan.name]
            starts, length = box_runs(layout.shape, chunk.offsets, chunk.shape, DTYPE_SIZE[layout.dtype])
            data = source(part.part, layout.key, chunk.writer)
            hashed = hash_pool().submit(block_digests, data)
            view = memoryview(data).cast("B")
            try:
                for n, start in enumerate(starts.tolist()):
                    piece = view[n * length : (n + 1) * length]
                    position = layout.begin + start
                    if direct_io and length >= DIRECT_IO_MIN_RUN:
                        piece, position = _pwrite_direct(fds[fplan.name], local_paths[fplan.name], piece, position)
                    _pwrite(fd, piece, position)
            finally:
                blocks = hashed.result()
            if index in recorded_chunks(layout):
                record = BlockDigests(BLOCK_SIZE, None, {layout.key: (chunk_digest(layout, index, blocks),)})
                mine = FileDigest(fplan.size, None, record)
                parts[fplan.name] = parts[fplan.name].merge(mine, name=fplan.name) if fplan.name in parts else mine
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    return parts


DIRECT_IO_MIN_RUN = 16 << 20  # a run of a SHARED file this long has its aligned middle written with O_DIRECT


def _pwrite(fd: int, piece: memoryview, position: int) -> None:
    while piece:
        done = os.pwrite(fd, piece, position)
        piece, position = piece[done:], position + done


def _pwrite_direct(fd: int, path: str, piece: memoryview, position: int) -> tuple[memoryview, int]:
    """Write the aligned middle of ``piece`` (bound for ``position``) with O_DIRECT and its head through
    ``fd``; returns the tail still to write. Where the filesystem has no O_DIRECT, nothing is written."""
    try:
        probe = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return piece, position  # e.g. tmpfs: everything through the page cache
    try:
        align = direct_io_alignment(probe)
    finally:
        os.close(probe)
    first = -(-position // align) * align
    last = (position + len(piece)) // align * align
    if last - first < align:
        return piece, position
    _pwrite(fd, piece[: first - position], position)
    with DirectFileWriter(path, offset=first) as out:
        out.write(piece[first - position : last - position])
    return piece[last - position :], last


def create_shared_file(storage: Storage, directory: str, fplan: FilePlan) -> FileDigest:
    """Create a SHARED file at its final size with its header written (ranks fill in the rest);
    the header's digest, the master's part of the file's record."""

    def write(f: Any) -> None:
        f.write(fplan.header)
        f.flush()
        os.ftruncate(f.fileno(), fplan.size)

    storage.write_stream(f"{directory}/{fplan.name}", write, durable=False)
    return FileDigest(fplan.size, None, BlockDigests(BLOCK_SIZE, digest_hex(fplan.header), {}))


def first_hole(storage: Storage, path: str, start: int, size: int) -> int | None:
    """The first byte in ``[start, size)`` of a local file that was never written (a hole), if any.

    ``lseek(SEEK_HOLE)``: a few system calls, no data read. Where the filesystem cannot tell, it
    reports no hole.
    """
    local = storage.local_path(path)
    if local is None or start >= size or not hasattr(os, "SEEK_HOLE"):
        return None
    fd = os.open(local, os.O_RDONLY)
    try:
        hole = os.lseek(fd, start, os.SEEK_HOLE)
    except OSError:
        return None
    finally:
        os.close(fd)
    return hole if hole < size else None


def fsync_file(storage: Storage, path: str) -> None:
    """fsync a local file that other processes wrote into."""
    local = storage.local_path(path)
    assert local is not None
    fd = os.open(local, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def collect_leftovers(
    storage: Storage, run_name: str, *, dry_run: bool = False, older_than_s: float = 0.0
) -> list[str]:
    """Remove what crashed saves left: step dirs without a marker, temp files, tombstones; finish
    or undo interrupted replacements. Returns the removed paths.

    Only a run's writer should call this (an in-progress save looks like a leftover);
    ``older_than_s`` spares leftovers touched more recently.
    """
    removed: list[str] = []
    now = time.time()
    names = storage.list_names(CHECKPOINTS_DIR)
    # Replacements first ("replace" sorts before "old"): a finished one may restore a step.
    for name in sorted((n for n in names if REPLACE_RE.match(n)), key=lambda n: n.split(".")[2]):
        removed += _recover_replacement(storage, run_name, name, now, older_than_s, dry_run)
    for name in names:
        if REPLACE_RE.match(name):
            continue
        path = f"{CHECKPOINTS_DIR}/{name}"
        step = parse_step_dir(name)
        if step is not None and storage.exists(f"{path}/{MARKER_FILE}"):
            for inner in storage.list_names(path):
                if is_temp_name(inner) or inner == RETIRING_FILE:  # a tombstone outlives only a crash
                    removed.append(f"{path}/{inner}")
            continue
        if older_than_s and _age(storage, path, now) < older_than_s:
            continue
        removed.append(path)
    removed += [n for n in storage.list_names("") if is_temp_name(n)]
    for directory in (LEASES_DIR, INDEX_LOG_DIR):
        removed += [f"{directory}/{n}" for n in storage.list_names(directory) if is_temp_name(n)]
    if not dry_run:
        for path in removed:
            storage.rm(path, recursive=True, missing_ok=True)
    if removed:
        logger.info("gc %s %s", "would remove" if dry_run else "removed", removed)
    return removed


def _recover_replacement(
    storage: Storage, run_name: str, name: str, now: float, older_than_s: float, dry_run: bool
) -> list[str]:
    """Finish or drop what an interrupted ``overwrite=True`` save left; the paths removed.

    A staging copy committed for this very replacement is swapped in (the save had committed
    it; only the swap was cut short), the old version left aside is moved back when the step's
    path holds no committed version, but either only once :func:`prove_staged` has proven it a
    complete, intact version of that step: anything else under a staging name (a copy of a
    marker without its files, another step, a symlink, damaged files) is removed with a warning
    and never touches the step. A storage failure leaves it for the next start.
    """
    match = REPLACE_RE.match(name)
    assert match is not None
    step, kind, replace_id = int(match.group(1)), match.group(2), match.group(3)
    path = f"{CHECKPOINTS_DIR}/{name}"
    if older_than_s and _age(storage, path, now) < older_than_s:
        return []  # a writer may be in the middle of it
    target_committed = storage.exists(f"{step_dir(step)}/{MARKER_FILE}")
    if kind == "replace" or not target_committed:
        try:
            manifest = prove_staged(storage, run_name, step, path)
            if kind == "replace" and manifest.extra.get("replace_id") != replace_id:
                raise CorruptCheckpointError(f"{path}/{MARKER_FILE}: not committed for replacement {replace_id}")
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            logger.warning("run %s: %s is no complete version of step %d (%s); removing it", run_name, path, step, exc)
        except StorageError as exc:
            logger.warning("run %s: could not check %s (%s); left for the next start", run_name, path, exc)
            return []
        else:
            if not dry_run:
                if kind == "replace":
                    swap_in_replacement(storage, step, replace_id)
                    logger.warning("run %s: finished the interrupted replacement of step %d", run_name, step)
                else:
                    storage.rm(step_dir(step), recursive=True, missing_ok=True)
                    storage.move(path, step_dir(step))
                    logger.warning("run %s: restored step %d from an interrupted replacement", run_name, step)
            return [path]
    if not dry_run:
        storage.rm(path, recursive=True, missing_ok=True)
    return [path]


def _age(storage: Storage, path: str, now: float) -> float:
    """Seconds since anything under ``path`` last changed (inf when unknown).

    A directory counts as young while any file in it is: object stores have no directory
    mtimes, and locally a shard still being streamed does not touch its directory's mtime.
    """
    fs, full = storage.fs, storage.full_path(path)
    try:
        infos = [fs.info(full)]
        if infos[0].get("type") == "directory":
            infos += list(fs.find(full, withdirs=True, detail=True).values())
    except (OSError, ValueError, TypeError):
        return float("inf")
    times = []
    for info in infos:
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        if isinstance(mtime, (int, float)) and not isinstance(mtime, bool):
            times.append(float(mtime))
    return now - max(times) if times else float("inf")
