"""Measurement primitives shared by every case: result records, fsync, page-cache control, state dicts.

Kept apart from the cases so that each case module only says *what* it times.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

GB = 1e9  # throughput is reported in GB/s (10**9 bytes), sizes are parsed like the config (GiB = 2**30)


@dataclass
class CaseResult:
    """One benchmark case: its headline metrics (all positive numbers) plus every run and notes."""

    name: str
    group: str
    description: str
    metrics: dict[str, float] = field(default_factory=dict)
    runs: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form written to results.json."""
        return {
            "group": self.group,
            "description": self.description,
            "metrics": self.metrics,
            "runs": self.runs,
            "extra": self.extra,
        }


def throughput_case(
    name: str, group: str, description: str, nbytes: int, runs: list[float], **extra: Any
) -> CaseResult:
    """A throughput case from its run times: the best run is the headline (least disturbed by others' load)."""
    best = min(runs)
    return CaseResult(
        name,
        group,
        description,
        metrics={"seconds": best, "gbps": nbytes / best / GB, "median_seconds": statistics.median(runs)},
        runs=list(runs),
        extra={"nbytes": nbytes, **extra},
    )


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (wall clock)."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def fsync_file(path: str) -> None:
    """fsync a file written by a library that does not (torch.save, safetensors) so every case is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_file(root)


def drop_page_cache() -> bool:
    """Drop the kernel page cache (root only); True when the cached byte count actually fell."""
    before = _cached_bytes()
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        logger.info("cannot drop the page cache: %s", exc)
        return False
    after = _cached_bytes()
    return after < before or before < (64 << 20)


def _cached_bytes() -> int:
    """'Cached' from /proc/meminfo in bytes (0 when unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Cached:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_average() -> tuple[float, float, float]:
    """The 1/5/15-minute load averages (others' jobs share this machine)."""
    return os.getloadavg()


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait up to ``max_wait_s`` for the 1-minute load to fall below ``max_load``; returns the load seen."""
    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    while load >= max_load and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def make_state_dict(
    total_bytes: int, tensors: int, *, seed: int = 0, indices: range | list[int] | None = None
) -> dict[str, torch.Tensor]:
    """``tensors`` fp32 tensors of (almost) equal size totalling ``total_bytes`` (random, incompressible).

    ``indices`` builds only those tensors, with the very same values: ranks hold parts of one state dict.
    """
    numel_total = total_bytes // 4
    base, rem = divmod(numel_total, tensors)
    state: dict[str, torch.Tensor] = {}
    for i in range(tensors) if indices is None else indices:
        numel = base + (1 if i < rem else 0)
        cols = 1024 if numel % 1024 == 0 else 1
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        state[f"layers.{i:03d}.weight"] = torch.rand((numel // cols, cols), generator=gen, dtype=torch.float32)
    return state


def rank_indices(tensors: int, rank: int, world_size: int) -> list[int]:
    """The tensor indices a rank holds when ``tensors`` are split evenly over ``world_size`` ranks."""
    return [i for i in range(tensors) if i * world_size // tensors == rank]


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Total tensor bytes of a state dict."""
    return sum(t.numel() * t.element_size() for t in state.values())


def touch(state: Any) -> int:
    """Read one value per 4 KiB page of every tensor, so lazily mapped loads are really materialised."""
    total = 0
    values = state.values() if isinstance(state, dict) else state
    for t in values:
        if isinstance(t, torch.Tensor) and t.numel():
            flat = t.reshape(-1)
            step = max(1, 4096 // t.element_size())
            total += int(flat[::step].numel())
            flat[::step].sum()
    return total


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same keys and bytes (a benchmark that loads garbage is no benchmark)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fresh_dir(path: str) -> str:
    """Remove and recreate a directory."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def write_report(doc: dict[str, Any], out: str, render: Callable[[dict[str, Any]], str]) -> None:
    """Write a standalone case's results as JSON to ``out`` and print its Markdown report."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    print(render(doc))
    print(f"\nwrote {out}")
