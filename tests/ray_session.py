"""One local Ray instance per test session, shared by tests/integration and tests/reliability."""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)

RAY_NAMESPACE = "ray_ckpt_tests"
RAY_NUM_CPUS = 4  # logical slots; the CI machine has 2 cores, our actors mostly ask for 0


def ensure_ray() -> None:
    """Start the session's local Ray once (never attaching to a cluster started by `ray start`)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(
        address="local",
        num_cpus=RAY_NUM_CPUS,
        namespace=RAY_NAMESPACE,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=True,
        object_store_memory=512 * 1024 * 1024,
        # workers import test helper modules (tests.*) by reference, like the driver does
        runtime_env={"env_vars": {"PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", "")}},
    )


def shutdown_ray() -> None:
    """Shut the session's Ray down cleanly, at the end of the session.

    First every EvalClient index follower of this process is stopped and its thread joined:
    a thread still inside a Ray call while ``ray.shutdown()`` destroys the core worker ends the
    process with ``_exit(1)`` (Ray's "core worker process ... already shutdown") or a segfault in
    ``_raylet.so``, after every test passed. Then Ray itself, waiting for its processes (raylet,
    GCS, workers) to exit so none outlives the session.
    """
    if not ray.is_initialized():
        return
    from ray_ckpt.distributed import handle
    from ray_ckpt.distributed.eval import close_all_followers

    stopped = close_all_followers()
    logger.info("ray session teardown: %d index followers stopped", stopped)
    ray.shutdown(wait_for_processes=True)
    # handles of this session's (now gone) checkpointers: nothing may use them after this
    handle._STARTED.clear()
    with handle._SEEN_LOCK:
        handle._SEEN_POSITIONS.clear()
