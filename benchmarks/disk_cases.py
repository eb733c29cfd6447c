"""Single-process cases on the local disk: the device limit (an O_DIRECT write and read of the same
bytes from aligned buffers, as ``fio --direct=1`` measures it), torch.save, safetensors, DCP and
CheckpointStore saves, then loads of what they wrote (page cache warm, and cold when it can be dropped).

Saves run in interleaved rounds (direct, torch, safetensors, DCP x thread counts, store, direct, ...)
so that a burst of load from other jobs on the machine hits every case alike; each case keeps its
best run.
"""

from __future__ import annotations

import logging
import mmap
import os
import warnings
from collections.abc import Callable
from typing import Any

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from benchmarks.measure import (
    CaseResult,
    drop_page_cache,
    fresh_dir,
    fsync_file,
    same_tensors,
    state_nbytes,
    throughput_case,
    timed,
    touch,
)
from ray_ckpt import CheckpointStore

logger = logging.getLogger(__name__)

DCP_THREAD_COUNTS = (1, 2, 4)
ALIGN = 4096  # O_DIRECT: buffer addresses, offsets and lengths in multiples of the logical block
_DIRECT_CHUNK = 64 << 20  # bytes per write()/readv() (a multiple of ALIGN), as fio's large-block runs


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_copy(state: dict[str, torch.Tensor]) -> tuple[mmap.mmap, int]:
    """The state's bytes, in order, in one page-aligned buffer (an anonymous mmap), and their count.

    Made before the timed write: the device limit is measured from aligned memory, as fio writes
    from its own buffers, not including a copy.
    """
    nbytes = state_nbytes(state)
    buf = mmap.mmap(-1, max(_round_up(nbytes), ALIGN))
    offset = 0
    for t in state.values():
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        buf[offset : offset + len(data)] = data
        offset += len(data)
    return buf, nbytes


def direct_write(path: str, buf: mmap.mmap, nbytes: int) -> None:
    """Write ``nbytes`` from the aligned buffer with O_DIRECT (no page cache), then fsync: the
    device's write limit. The last block is written whole and the file cut to ``nbytes``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        view, size, offset = memoryview(buf), _round_up(nbytes), 0
        while offset < size:
            offset += os.write(fd, view[offset : min(offset + _DIRECT_CHUNK, size)])
        os.ftruncate(fd, nbytes)
        os.fsync(fd)
    finally:
        os.close(fd)


def direct_read(path: str) -> torch.Tensor:
    """Read a whole file with O_DIRECT into one page-aligned buffer: the device's read limit (never
    served from the page cache, warm or cold)."""
    size = os.path.getsize(path)
    buf = mmap.mmap(-1, max(_round_up(size), ALIGN))
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        offset = 0
        while offset < size:
            n = os.readv(fd, [view[offset : offset + _DIRECT_CHUNK]])
            if not n:
                raise OSError(f"{path}: short read")
            offset += n
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=torch.uint8)[:size]


def direct_io_supported(directory: str) -> bool:
    """Whether the filesystem of ``directory`` takes O_DIRECT (tmpfs, for one, does not)."""
    probe = os.path.join(directory, ".direct-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def torch_save(path: str, state: dict[str, torch.Tensor]) -> None:
    """torch.save (zip format, the default) + fsync."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def safetensors_save(path: str, state: dict[str, torch.Tensor]) -> None:
    """safetensors.torch.save_file + fsync (save_file itself does not fsync)."""
    safetensors.torch.save_file(state, path)
    fsync_file(path)


def dcp_save(path: str, state: dict[str, torch.Tensor], thread_count: int) -> None:
    """torch.distributed.checkpoint save, single process, FileSystemWriter (fsyncs its files by default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(path, thread_count=thread_count, sync_files=True))


def dcp_load(path: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DCP load into freshly allocated tensors (the allocation is part of the load)."""
    target = {k: torch.empty_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=FileSystemReader(path))
    return target


def _savers(
    state: dict[str, torch.Tensor], workdir: str, store: CheckpointStore, store_steps: list[int]
) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Each save case as (save, prepare): prepare removes the previous run's output, untimed."""
    aligned, nbytes = aligned_copy(state)
    paths = _paths(workdir)

    def store_save() -> None:
        step = (store_steps[-1] + 1) if store_steps else 0
        store.save(step, state)
        store_steps.append(step)

    def before_store_save() -> None:
        for step in store_steps:  # keep one step on disk; deleting is not part of the save
            store.delete(step)
        store_steps.clear()

    return {
        "direct_write": (lambda: direct_write(paths["direct"], aligned, nbytes), lambda: _rm(paths["direct"])),
        "torch_save_fsync": (lambda: torch_save(paths["torch"], state), lambda: _rm(paths["torch"])),
        "safetensors_save_fsync": (
            lambda: safetensors_save(paths["safetensors"], state),
            lambda: _rm(paths["safetensors"]),
        ),
        **{
            f"dcp_save_t{k}": (
                (lambda k=k: dcp_save(f"{paths['dcp']}_t{k}", state, k)),
                (lambda k=k: fresh_dir(f"{paths['dcp']}_t{k}")),
            )
            for k in DCP_THREAD_COUNTS
        },
        "store_save": (store_save, before_store_save),
    }


def _paths(workdir: str) -> dict[str, str]:
    return {
        "direct": os.path.join(workdir, "direct.bin"),
        "torch": os.path.join(workdir, "torch.pt"),
        "safetensors": os.path.join(workdir, "model.safetensors"),
        "dcp": os.path.join(workdir, "dcp"),
    }


def run_disk_cases(
    state: dict[str, torch.Tensor], workdir: str, repeat: int
) -> tuple[list[CaseResult], dict[str, Any]]:
    """Every local-disk save and load case on ``state``; returns the cases and notes on cache handling."""
    if not direct_io_supported(workdir):
        raise RuntimeError(f"{workdir}: this filesystem refuses O_DIRECT; the device-limit baseline needs a disk")
    nbytes = state_nbytes(state)
    store = CheckpointStore(os.path.join(workdir, "store"), run_name="bench")
    store_steps: list[int] = []
    # Warm-up on a small state (imports, first-call costs), untimed, into separate paths.
    small = {k: v.reshape(-1)[:1024].clone() for k, v in state.items()}
    os.makedirs(os.path.join(workdir, "warmup"), exist_ok=True)
    warm_store = CheckpointStore(os.path.join(workdir, "warmup"), run_name="bench")
    for save, prepare in _savers(small, os.path.join(workdir, "warmup"), warm_store, []).values():
        prepare()
        save()
    savers = _savers(state, workdir, store, store_steps)
    times: dict[str, list[float]] = {name: [] for name in savers}
    for round_no in range(repeat):
        for name, (save, prepare) in savers.items():
            prepare()
            os.sync()  # others' dirty pages are not ours to flush
            times[name].append(timed(save))
            logger.info("round %d %s: %.3fs (load %.2f)", round_no, name, times[name][-1], os.getloadavg()[0])

    results = [
        throughput_case(
            "direct_write",
            "save",
            "O_DIRECT write of the same bytes from an aligned buffer + fsync (the device limit, as fio --direct=1)",
            nbytes,
            times["direct_write"],
        ),
        throughput_case("torch_save_fsync", "save", "torch.save (zip) + fsync", nbytes, times["torch_save_fsync"]),
        throughput_case(
            "safetensors_save_fsync",
            "save",
            "safetensors.torch.save_file + fsync",
            nbytes,
            times["safetensors_save_fsync"],
        ),
    ]
    best_k = min(DCP_THREAD_COUNTS, key=lambda k: min(times[f"dcp_save_t{k}"]))
    results.append(
        throughput_case(
            "dcp_save",
            "save",
            f"torch.distributed.checkpoint FileSystemWriter, best thread_count ({best_k})",
            nbytes,
            times[f"dcp_save_t{best_k}"],
            thread_count=best_k,
            by_thread_count={k: min(times[f"dcp_save_t{k}"]) for k in DCP_THREAD_COUNTS},
        )
    )
    results.append(
        throughput_case(
            "store_save",
            "save",
            "CheckpointStore.save: safetensors shard + index + marker, fsync'd, committed",
            nbytes,
            times["store_save"],
            files_size=store.info(store_steps[-1]).files_size,
        )
    )

    step = store_steps[-1]
    paths = _paths(workdir)
    loaders: dict[str, Callable[[], Any]] = {
        "direct_read": lambda: direct_read(paths["direct"]),
        "torch_load": lambda: torch.load(paths["torch"], map_location="cpu", weights_only=True),
        "torch_load_mmap": lambda: torch.load(paths["torch"], map_location="cpu", weights_only=True, mmap=True),
        "safetensors_load": lambda: safetensors.torch.load_file(paths["safetensors"], backend="pread"),
        "safetensors_load_mmap": lambda: safetensors.torch.load_file(paths["safetensors"]),
        "dcp_load": lambda: dcp_load(f"{paths['dcp']}_t{best_k}", state),
        "store_load": lambda: store.load(step),
        "store_load_mmap": lambda: store.load(step, mmap=True),
    }
    for name, load in loaders.items():  # correctness once, untimed: a fast loader of garbage is no win
        loaded = load()
        if name != "direct_read" and not same_tensors(dict(loaded), state):
            raise AssertionError(f"{name}: loaded tensors differ from the saved state")
        del loaded

    cold_ok = drop_page_cache()
    notes = {
        "page_cache_drop": "works" if cold_ok else "not permitted here (cold loads skipped)",
        "warm_loads": "read right after the saves: served from the page cache, not the disk",
    }
    for cache in ("warm", "cold") if cold_ok else ("warm",):
        load_times: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(repeat):
            for name, load in loaders.items():
                if cache == "cold":
                    drop_page_cache()
                else:
                    load()  # make sure the file is cached (an earlier cold run may have evicted it)
                holder: list[Any] = []
                load_times[name].append(timed(lambda load=load, holder=holder: holder.append(touch_loaded(load()))))
                del holder
        for name in loaders:
            what = {
                "direct_read": "O_DIRECT read of the direct_write file into one aligned buffer (the device limit)",
                "torch_load": "torch.load(weights_only=True), tensors in memory",
                "torch_load_mmap": "torch.load(weights_only=True, mmap=True): file-backed, each page touched",
                "safetensors_load": "safetensors.torch.load_file(backend='pread'): tensors materialised in memory",
                "safetensors_load_mmap": "safetensors.torch.load_file default (mmap): file-backed, each page touched",
                "dcp_load": "torch.distributed.checkpoint load into freshly allocated tensors",
                "store_load": "CheckpointStore.load (checksums verified, the default)",
                "store_load_mmap": "CheckpointStore.load(mmap=True): file-backed, checksums verified, pages touched",
            }[name]
            results.append(
                throughput_case(
                    f"{name}_{cache}", f"load_{cache}", f"{what}; page cache {cache}", nbytes, load_times[name]
                )
            )
    return results, notes


def touch_loaded(loaded: Any) -> Any:
    """Touch every page of a load's tensors (see :func:`benchmarks.measure.touch`)."""
    touch(loaded if isinstance(loaded, dict) else [loaded])
    return loaded


def _rm(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
