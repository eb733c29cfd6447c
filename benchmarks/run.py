"""Run every benchmark case in one process, on one state dict and one disk; write JSON, print Markdown.

python -m benchmarks.run --size 1GiB --tensors 16 [--quick] [--out bench_out/results.json] [--cases disk ray]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.measure import CaseResult, load_average, make_state_dict, state_nbytes, wait_for_quiet
from benchmarks.report import evaluate_targets, markdown
from ray_ckpt.core.config import parse_size

logger = logging.getLogger("benchmarks")

GROUPS = ("disk", "index", "s3", "ray")
LOADS = (
    "direct_read",
    "torch_load",
    "torch_load_mmap",
    "safetensors_load",
    "safetensors_load_mmap",
    "dcp_load",
    "store_load",
    "store_load_mmap",
)
# Every case a full run (all groups) produces; tests/test_benchmarks.py checks the JSON against it.
CASES: dict[str, tuple[str, ...]] = {
    "disk": (
        "direct_write",
        "torch_save_fsync",
        "safetensors_save_fsync",
        "dcp_save",
        "store_save",
        *(f"{name}_{cache}" for cache in ("warm", "cold") for name in LOADS),
    ),
    "index": ("index_topk", "index_restart"),
    "s3": ("s3_store_save", "s3fs_put", "s3_store_load", "s3fs_get"),
    "ray": (
        "e2e_gather_save",
        "e2e_direct_save",
        "ray_train_save",
        "async_gather_blocked",
        "async_direct_blocked",
        "gather_transfer",
        "pickled_transfer",
        "checkpointer_rss",
        "topk_concurrent",
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks every size for CI."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--size", default=None, help="total state dict bytes (default 1GiB; 16MiB with --quick)")
    p.add_argument("--tensors", type=int, default=16, help="number of fp32 tensors")
    p.add_argument("--quick", action="store_true", help="small sizes and short runs (CI: proves the benchmark works)")
    p.add_argument("--out", default="bench_out/results.json", help="JSON output path")
    p.add_argument("--cases", nargs="+", choices=GROUPS, default=list(GROUPS), help="case groups to run")
    p.add_argument("--repeat", type=int, default=5, help="runs per case (the best is the headline)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir under /tmp)")
    p.add_argument("--eval-actors", type=int, default=32, help="eval actors querying top_k during saves")
    p.add_argument("--topk-duration", type=float, default=20.0, help="seconds of top_k querying during saves")
    p.add_argument("--topk-interval-ms", type=float, default=100.0, help="pause between one actor's queries")
    p.add_argument("--index-records", type=int, default=100_000, help="checkpoints in the index cases")
    p.add_argument("--wait-quiet", type=float, default=0.0, help="first wait (up to 10 min) for 1-min load below this")
    p.add_argument("-v", "--verbose", action="store_true", help="log every run")
    args = p.parse_args(argv)
    args.size = args.size if args.size or args.quick else "1GiB"
    if args.quick:
        args.size = args.size or "16MiB"
        args.repeat = 1
        args.eval_actors = min(args.eval_actors, 2)
        args.topk_duration = min(args.topk_duration, 1.0)
        args.index_records = min(args.index_records, 10_000)
    return args


def _filesystem(path: str) -> str:
    """``df`` of the scratch directory, and whether it is the repository's filesystem."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    same = os.stat(path).st_dev == os.stat(repo).st_dev
    try:
        df = subprocess.run(["df", "-hT", path], capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        device, fstype = df.split()[0], df.split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        device, fstype = "?", "?"
    return f"{device} ({fstype}){', same filesystem as the repo' if same else ''}"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected groups and return the result document (also written to ``args.out``)."""
    if args.wait_quiet:
        logger.info("waiting for the 1-min load to fall below %.2f (now %.2f)", args.wait_quiet, os.getloadavg()[0])
        wait_for_quiet(args.wait_quiet, 600)
    size = parse_size(args.size, field_name="--size")
    workdir = args.workdir or tempfile.mkdtemp(prefix="ray-ckpt-bench-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    load_start = load_average()
    started = time.time()
    state = make_state_dict(size, args.tensors)
    nbytes = state_nbytes(state)
    results: list[CaseResult] = []
    notes: dict[str, Any] = {}
    try:
        if "disk" in args.cases:
            from benchmarks.disk_cases import run_disk_cases

            disk_results, disk_notes = run_disk_cases(state, workdir, args.repeat)
            results += disk_results
            notes.update(disk_notes)
        if "index" in args.cases:
            from benchmarks.index_cases import index_topk, snapshot_restart

            results.append(index_topk(args.index_records, queries=2000))
            results.append(snapshot_restart(workdir, args.index_records, args.repeat))
        if "s3" in args.cases:
            from benchmarks.s3_cases import run_s3_cases

            results += run_s3_cases(state, workdir, args.repeat)
        if "ray" in args.cases:
            from benchmarks.ray_cases import run_ray_cases

            results += run_ray_cases(
                workdir,
                size,
                args.tensors,
                args.repeat,
                args.eval_actors,
                args.topk_duration,
                args.topk_interval_ms / 1e3,
            )
    finally:
        filesystem = _filesystem(workdir)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    cases = {r.name: r.to_json() for r in results}
    document: dict[str, Any] = {
        "meta": {
            "argv": sys.argv[1:],
            "size_bytes": nbytes,
            "size_human": args.size,
            "tensors": args.tensors,
            "quick": args.quick,
            "repeat": args.repeat,
            "groups": list(args.cases),
            "nproc": os.cpu_count(),
            "mem_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            "load_average": {"start": load_start, "end": load_average()},
            "seconds": time.time() - started,
            "workdir": workdir,
            "filesystem": filesystem,
            "python": platform.python_version(),
            "versions": _versions(),
            "git_commit": _git_commit(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "cases": cases,
        "targets": evaluate_targets(cases),
        "notes": notes,
    }
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(document, f, indent=2, default=str)
    return document


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "ray", "safetensors", "s3fs", "moto", "xxhash", "pyarrow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run, write the JSON, print the Markdown tables."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    logger.setLevel(logging.INFO)
    document = run(args)
    print(markdown(document))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
