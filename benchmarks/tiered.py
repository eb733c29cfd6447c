"""Training blocked time per save with a remote tier (S3 on loopback) vs a local-only save.

    python -m benchmarks.tiered [--quick] [--size 256MiB] [--saves 6] [--rounds 2] [--step-s 3]
                                [--out bench_out/tiered.json]

Two worker actors (``WorkerClient``, half the tensors each) run a training loop: one simulated
step (``--step-s`` of sleep: the accelerator computes while the host idles), then
``save(blocking=False)``. The figure is how long each save holds the loop (the slower rank),
for two checkpointers of the same state and retention (``keep_last_n=2``):

* **local only**: ``storage_uri`` on the local disk;
* **remote tier**: the same, plus ``remote_uri`` on moto's ``ThreadedMotoServer`` (127.0.0.1, in
  this driver process): the checkpointer commits locally, acknowledges the ranks and uploads in
  the background while the loop goes on.

Rounds alternate the two (local first in even rounds, remote first in odd ones); after a remote
round the driver waits for the uploads to drain (timed, reported) so that no upload overlaps a
local-only round. The goal: blocked time with a remote tier within 10% of the local-only one.
Prints a Markdown table, writes every save's figure to JSON.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from benchmarks import s3_cases
from benchmarks.measure import load_average, make_state_dict, percentile, rank_indices, state_nbytes, write_report
from benchmarks.ray_cases import NAMESPACE, start_ray
from ray_ckpt import CheckpointConfig, start_checkpointer
from ray_ckpt.core.config import parse_size
from ray_ckpt.distributed.worker import WorkerClient

logger = logging.getLogger("benchmarks.tiered")

WORLD_SIZE = 2
GOAL_RATIO = 1.10  # blocked time with a remote tier / local only
KINDS = ("local", "remote")


@ray.remote(num_cpus=0)
class LoopWorker:
    """A training rank: its half of the state and a WorkerClient per run."""

    def __init__(self, runs: dict[str, str], rank: int, total_bytes: int, tensors: int) -> None:
        self.state = make_state_dict(total_bytes, tensors, indices=rank_indices(tensors, rank, WORLD_SIZE))
        self.clients = {kind: WorkerClient(run, rank, WORLD_SIZE, namespace=NAMESPACE) for kind, run in runs.items()}

    def nbytes(self) -> int:
        return state_nbytes(self.state)

    def train(self, kind: str, first_step: int, saves: int, step_s: float) -> list[float]:
        """``saves`` steps of ``step_s`` each, a non-blocking save after each; seconds each save held the loop.

        Every save is waited for at the end (all committed) before returning.
        """
        client = self.clients[kind]
        blocked: list[float] = []
        futures = []
        for i in range(saves):
            time.sleep(step_s)  # the step's compute (on the accelerator; the host idles)
            step = first_step + i
            started = time.perf_counter()
            futures.append(client.save(step, self.state, metrics={"loss": 1.0 / (step + 1)}, blocking=False))
            blocked.append(time.perf_counter() - started)
        for future in futures:
            future.result(timeout=600)
        return blocked


@contextmanager
def moto_endpoint(nice: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The loopback S3 endpoint of the S3 cases at ``nice``, and a fresh bucket: ``(bucket URI, options)``."""
    with s3_cases.moto_endpoint(nice) as options:
        yield f"s3://{s3_cases.make_bucket(options)}", options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tiered", description=__doc__.splitlines()[0])
    p.add_argument("--size", default=None, help="total state bytes (default 256MiB; 16MiB with --quick)")
    p.add_argument("--tensors", type=int, default=16, help="number of fp32 tensors")
    p.add_argument("--saves", type=int, default=None, help="saves per round and run (default 6; 5 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of both runs (default 2)")
    p.add_argument("--step-s", type=float, default=None, help="simulated step seconds (default 3; 0.5 with --quick)")
    p.add_argument(
        "--server-nice",
        type=int,
        default=19,
        help="nice of the moto server process (default 19: the endpoint stands for another machine)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir under /tmp)")
    p.add_argument("--out", default="bench_out/tiered.json", help="JSON output path")
    args = p.parse_args(argv)
    args.size = args.size or ("16MiB" if args.quick else "256MiB")
    args.saves = args.saves or (5 if args.quick else 6)
    args.rounds = args.rounds or 2
    args.step_s = args.step_s if args.step_s is not None else (0.5 if args.quick else 3.0)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both runs, alternating rounds; every save's blocked seconds and each remote round's drain."""
    total_bytes = int(parse_size(args.size))
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }.items():
        os.environ.setdefault(key, value)  # before Ray starts: its workers inherit them
    workdir = args.workdir or tempfile.mkdtemp(prefix="ray-ckpt-tiered-bench-")
    load_start = load_average()
    started = time.time()
    try:
        with moto_endpoint(args.server_nice) as (bucket, options):
            blocked, drains, uploads, nbytes = _measure(args, total_bytes, workdir, bucket, options)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = {kind: _summary(values) for kind, values in blocked.items()}
    ratio = summary["remote"]["median_s"] / summary["local"]["median_s"]
    return {
        "meta": {
            "argv": sys.argv[1:],
            "size_bytes": nbytes,
            "size_human": args.size,
            "tensors": args.tensors,
            "saves_per_round": args.saves,
            "rounds": args.rounds,
            "step_s": args.step_s,
            "quick": args.quick,
            "nproc": os.cpu_count(),
            "load_average": {"start": load_start, "end": load_average()},
            "seconds": time.time() - started,
            "python": platform.python_version(),
            "remote": f"moto ThreadedMotoServer on 127.0.0.1 in a subprocess at nice {args.server_nice}",
            "server_nice": args.server_nice,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "blocked_s": blocked,
        "summary": summary,
        "ratio_median": ratio,
        "ratio_mean": summary["remote"]["mean_s"] / summary["local"]["mean_s"],
        "goal_ratio": GOAL_RATIO,
        "status": "pass" if ratio <= GOAL_RATIO else "short",
        "upload_drain_s": drains,
        "uploads_at_end": uploads,
    }


def _measure(
    args: argparse.Namespace, total_bytes: int, workdir: str, bucket: str, options: dict[str, Any]
) -> tuple[dict[str, list[float]], list[float], dict[str, Any], int]:
    """The rounds: (blocked seconds per save by run, drain seconds per remote round, upload stats, bytes)."""
    start_ray(total_bytes)
    suffix = uuid.uuid4().hex[:8]
    runs = {kind: f"bench-tiered-{kind}-{suffix}" for kind in KINDS}
    base = CheckpointConfig(
        storage_uri=os.path.join(workdir, "local"), metric_name="loss", keep_last_n=2, max_pending_saves=2
    )
    configs = {
        "local": base.replace(run_name=runs["local"]),
        "remote": base.replace(run_name=runs["remote"], remote_uri=f"{bucket}/remote", remote_storage_options=options),
    }
    handles = {kind: start_checkpointer(cfg, namespace=NAMESPACE) for kind, cfg in configs.items()}
    workers = [LoopWorker.remote(runs, rank, total_bytes, args.tensors) for rank in range(WORLD_SIZE)]
    try:
        nbytes = sum(ray.get([w.nbytes.remote() for w in workers]))
        steps = dict.fromkeys(KINDS, 1)
        blocked: dict[str, list[float]] = {kind: [] for kind in KINDS}
        drains: list[float] = []

        def loop(kind: str, saves: int) -> list[float]:
            first = steps[kind]
            steps[kind] += saves
            per_rank = ray.get([w.train.remote(kind, first, saves, args.step_s) for w in workers])
            if kind == "remote":
                began = time.perf_counter()
                waited = handles["remote"].wait_for_uploads(600)
                drains.append(time.perf_counter() - began)
                if waited["failed"]:
                    raise RuntimeError(f"uploads failed for steps {waited['failed']}")
            return [max(times) for times in zip(*per_rank, strict=True)]  # the step waits for the slower rank

        for kind in KINDS:  # warm-up: actors, imports, first directories, the first upload
            loop(kind, 1)
        drains.clear()
        for round_ in range(args.rounds):
            for kind in KINDS if round_ % 2 == 0 else KINDS[::-1]:
                got = loop(kind, args.saves)
                blocked[kind] += got
                logger.info(
                    "round %d %s: blocked %s ms (load %.2f)",
                    round_,
                    kind,
                    [round(b * 1000, 1) for b in got],
                    os.getloadavg()[0],
                )
        uploads = handles["remote"].stats()["uploads"]
    finally:
        for worker in workers:
            ray.kill(worker)
        for handle in handles.values():
            handle.shutdown()
    return blocked, drains, uploads, nbytes


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(values),
        "mean_s": statistics.fmean(values),
        "p90_s": percentile(values, 90),
        "min_s": min(values),
        "max_s": max(values),
        "saves": len(values),
    }


def markdown(doc: dict[str, Any]) -> str:
    """The results as one Markdown table, with its heading line."""
    meta, summary = doc["meta"], doc["summary"]
    load = meta["load_average"]
    lines = [
        f"**{meta['size_human']} state ({meta['size_bytes'] / 2**20:.0f} MiB), 2 worker actors, "
        f"{meta['saves_per_round']} non-blocking saves x {meta['rounds']} rounds per run, one every "
        f"{meta['step_s']:g} s; remote: moto on 127.0.0.1 at nice {meta['server_nice']}; {meta['nproc']} cores; "
        f"load average at start {load['start'][0]:.2f}, at end {load['end'][0]:.2f} (1-min)**",
        "",
        "| figure | local only | remote tier (S3 loopback) | ratio | goal | status |",
        "|---|---:|---:|---:|---:|---|",
    ]

    def ms(value: float) -> str:
        return f"{value * 1000:.1f} ms"

    for stat, label in (("median_s", "median"), ("mean_s", "mean"), ("p90_s", "p90"), ("max_s", "max")):
        local, remote = summary["local"][stat], summary["remote"][stat]
        goal = f"<= {GOAL_RATIO:.2f}x" if stat == "median_s" else "-"
        status = doc["status"] if stat == "median_s" else "-"
        lines.append(
            f"| training blocked per save, {label} | {ms(local)} | {ms(remote)} | "
            f"{remote / local:.2f}x | {goal} | {status} |"
        )
    drains = doc["upload_drain_s"]
    lines.append(
        f"| uploads still running after a round's last save (drain, median) | - | "
        f"{statistics.median(drains):.2f} s | - | - | - |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("werkzeug", "botocore", "s3fs", "aiobotocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    doc = run(args)
    write_report(doc, args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
