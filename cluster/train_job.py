"""Example ray-ckpt training job for a Ray cluster (``ray job submit``, KubeRay RayJob, or the head node).

Starts the run's checkpointer, trains a tiny torch model on 2 worker actors that save through
``WorkerClient`` (partitioned + replicated keys), and has one evaluation actor follow the run with
``EvalClient`` (wait_for_checkpoint, lease, load, report_eval). The loop is ``ray_ckpt.demo.run_demo``;
this script only adds the cluster-facing command line and connection handling.

    python cluster/train_job.py --storage s3://bucket/ray-ckpt --run-name job1 --steps 20
    ray job submit --working-dir . -- python cluster/train_job.py --storage s3://bucket/ray-ckpt

On more than one node the storage must be shared (S3 or a shared filesystem): every node writes
and reads checkpoints there. Re-running with the same run name resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import ray

# `python cluster/train_job.py` puts cluster/ on sys.path, not the checkout: let a checkout without
# an installed ray-ckpt (e.g. a `ray job submit --working-dir .` of this repository) import it too.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_CHECKOUT, "ray_ckpt")) and _CHECKOUT not in sys.path:
    sys.path.insert(0, _CHECKOUT)

import ray_ckpt  # noqa: E402
from ray_ckpt.core.config import CheckpointConfig  # noqa: E402
from ray_ckpt.demo import format_table, run_demo  # noqa: E402

logger = logging.getLogger("ray_ckpt.train_job")


def build_config(args: argparse.Namespace) -> CheckpointConfig:
    """The run's CheckpointConfig: the YAML if given, then --storage / --run-name on top."""
    if args.config:
        config = CheckpointConfig.from_yaml(args.config)
    else:
        config = CheckpointConfig(
            metric_name="eval/return",
            mode="max",
            keep_top_k=3,
            keep_last_n=2,
            save_interval_steps=2,
            max_shard_size="256KB",
            save_timeout_s=120,
            lease_ttl_s=60,
        )
    changes = {}
    if args.storage:
        # a local path made absolute: under `ray job submit` the cwd is Ray's temporary copy of the working dir
        changes["storage_uri"] = args.storage if "://" in args.storage else os.path.abspath(args.storage)
    if args.run_name:
        changes["run_name"] = args.run_name
    return config.replace(**changes) if changes else config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the job."""
    parser = argparse.ArgumentParser(description="ray-ckpt example training job")
    parser.add_argument("--storage", default=None, help="storage URI (s3://bucket/prefix on multi-node clusters)")
    parser.add_argument("--run-name", default=None, help="run name (default: the config's, else 'run')")
    parser.add_argument("--steps", type=int, default=20, help="training steps per worker")
    parser.add_argument("--workers", type=int, default=2, help="training worker actors")
    parser.add_argument("--evaluators", type=int, default=1, help="evaluation actors following the run")
    parser.add_argument("--config", default=None, help="optional run config YAML (e.g. configs/example.yaml)")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray address; default: RAY_ADDRESS (set by `ray job submit`), else the running cluster or a local one",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the job; exit status 0 once at least one checkpoint has committed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = build_config(args)
    started = time.monotonic()
    ray.init(address=args.address, logging_level="WARNING")
    logger.info(
        "connected to Ray (namespace %s, job %s); run %r on %s, %d workers, %d steps",
        ray.get_runtime_context().namespace,
        ray.get_runtime_context().get_job_id(),
        config.run_name,
        config.storage_uri,
        args.workers,
        args.steps,
    )
    try:
        top = run_demo(config, steps=args.steps, workers=args.workers, evaluators=args.evaluators)
    finally:
        ray.shutdown()
    kept = ray_ckpt.CheckpointStore(config=config).list()
    if not kept:
        logger.error("no checkpoint was committed for run %r", config.run_name)
        return 1
    elapsed = time.monotonic() - started
    logger.info("done in %.1fs: %d checkpoints kept, latest step %d", elapsed, len(kept), kept[-1].step)
    print(f"\nTop checkpoints of run {config.run_name!r} by {config.metric_name} ({config.mode}):\n")
    print(format_table(top, kept))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    raise SystemExit(main())
