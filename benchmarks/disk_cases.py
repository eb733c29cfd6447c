"""Single-process cases on the local disk: the raw-write limit, torch.save, safetensors, DCP and
CheckpointStore saves, then loads of what they wrote (page cache warm, and cold when it can be dropped).

Saves run in interleaved rounds (raw, torch, safetensors, DCP x thread counts, store, raw, ...) so
that a burst of load from other jobs on the machine hits every case alike; each case keeps its best run.
"""

from __future__ import annotations

import logging
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
_WRITE_CHUNK = 1 << 30  # one write() per tensor up to 1 GiB (Linux caps a write at ~2 GiB)


def _byte_views(state: dict[str, torch.Tensor]) -> list[memoryview]:
    """The raw bytes of every tensor, in order, without copying."""
    return [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in state.values()]


def raw_write(path: str, views: list[memoryview]) -> None:
    """Sequential write of the same bytes with plain write() calls, then fsync: the physical limit."""
    with open(path, "wb", buffering=0) as f:
        for view in views:
            offset = 0
            while offset < len(view):
                offset += f.write(view[offset : offset + _WRITE_CHUNK])
        os.fsync(f.fileno())


def raw_read(path: str) -> torch.Tensor:
    """Sequential readinto of a whole file into one preallocated buffer: the read limit."""
    size = os.path.getsize(path)
    buf = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f:
        offset = 0
        while offset < size:
            n = f.readinto(view[offset:])
            if not n:
                raise OSError(f"{path}: short read")
            offset += n
    return buf


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
    views = _byte_views(state)
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
        "raw_write_fsync": (lambda: raw_write(paths["raw"], views), lambda: _rm(paths["raw"])),
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
        "raw": os.path.join(workdir, "raw.bin"),
        "torch": os.path.join(workdir, "torch.pt"),
        "safetensors": os.path.join(workdir, "model.safetensors"),
        "dcp": os.path.join(workdir, "dcp"),
    }


def run_disk_cases(
    state: dict[str, torch.Tensor], workdir: str, repeat: int
) -> tuple[list[CaseResult], dict[str, Any]]:
    """Every local-disk save and load case on ``state``; returns the cases and notes on cache handling."""
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
            "raw_write_fsync", "save", "sequential write() of the same bytes + fsync", nbytes, times["raw_write_fsync"]
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
        "raw_read": lambda: raw_read(paths["raw"]),
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
        if name != "raw_read" and not same_tensors(dict(loaded), state):
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
                "raw_read": "sequential readinto of the raw file into one preallocated buffer",
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
