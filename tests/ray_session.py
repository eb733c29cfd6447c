"""One local Ray instance per test session, shared by tests/integration and tests/reliability."""

from __future__ import annotations

import os

import ray

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
