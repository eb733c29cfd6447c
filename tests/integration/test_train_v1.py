"""Ray Train V1 (``RAY_TRAIN_V2_ENABLED=0``) on ray-ckpt: the loop of test_train.py, in its own driver.

Ray picks Train V1 or V2 when ``ray.train`` is first imported, so V1 runs in a subprocess that
attaches to the test session's Ray with the variable set for its driver and, through the job's
runtime_env, its workers. The scenario is what V1 users hit: ray-ckpt keeps one step
(``keep_last_n=1``), Ray the two best plus its latest. The first ``fit()`` fails after committing a
step it never reported; ``TorchTrainer.restore(path).fit()`` (Ray hands back an older step) and a
second ``fit()`` under the same name (V1 runs a new trial: Ray hands back none) must both resume
from ray-ckpt's latest commit at step + 1, with no CheckpointExistsError, and every checkpoint Ray
lists must load.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("ray_session")

REPO = Path(__file__).resolve().parents[2]


def _trainer(tmp_path: Path, run_name: str, attempt: int, **extra: Any) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    from tests.integration.test_train import RAY_NUM_TO_KEEP, STEPS, _train_loop

    return TorchTrainer(
        _train_loop,
        train_loop_config={
            "run_name": run_name,
            "steps": STEPS,
            "events": str(tmp_path / "events"),
            "attempt": attempt,
            **extra,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False),
        run_config=ray.train.RunConfig(
            storage_path=str(tmp_path / "ray_results"),
            name="v1",
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=RAY_NUM_TO_KEEP, checkpoint_score_attribute="step", checkpoint_score_order="min"
            ),
        ),
    )


def scenario(tmp_path: Path, run_name: str, address: str, namespace: str) -> None:
    """The V1 driver's three fits of one ray-ckpt run; raises AssertionError on any disagreement."""
    os.environ["RAY_TRAIN_V2_ENABLED"] = "0"
    import ray

    ray.init(
        address=address,
        namespace=namespace,
        logging_level="WARNING",
        runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "0", "PYTHONPATH": str(REPO)}},
    )
    from ray.train.base_trainer import TrainingFailedError
    from ray.train.torch import TorchTrainer

    from ray_ckpt import CheckpointConfig, CheckpointStore, start_checkpointer
    from ray_ckpt.distributed.train_tune import read_pointer, release_unreferenced
    from tests.integration.test_train import STEPS, _events, check_ray_checkpoints_load

    assert not ray.train.v2._internal.constants.is_v2_enabled()
    (tmp_path / "events").mkdir()
    storage = str(tmp_path / "ckpt")
    config = CheckpointConfig(storage_uri=storage, run_name=run_name, metric_name="loss", keep_last_n=1)
    handle = start_checkpointer(config)
    store = CheckpointStore(storage, run_name=run_name)
    try:
        # 1: steps 1-3 reported; step 4 committed, then the loop fails before reporting it
        try:
            _trainer(tmp_path, run_name, 1, fail_after_save=STEPS).fit()
            raise AssertionError("the first fit should have failed")
        except TrainingFailedError:
            pass
        assert [i.step for i in store.reload().list()] == [1, 2, 3, 4]  # Ray's 1, 2, 3 leased; 4 the latest

        # 2: restore the failed run: Ray hands back step 3, ray-ckpt's latest commit is 4
        path = str(tmp_path / "ray_results" / "v1")
        assert TorchTrainer.can_restore(path)
        result = TorchTrainer.restore(path).fit()
        assert result.error is None, result.error
        (event,) = _events(tmp_path, 1, ranks=(0,))  # the restored trial runs attempt 1's config
        assert event["ray_checkpoint"] and event["restored_step"] == STEPS
        assert event["saved"] == [5, 6, 7, 8]
        store.reload()
        check_ray_checkpoints_load(result, store, {1, 2, 8})

        # 3: fit() again under the same name: a new V1 trial, Ray has no checkpoint for it
        result = _trainer(tmp_path, run_name, 3).fit()
        assert result.error is None, result.error
        (event,) = _events(tmp_path, 3, ranks=(0,))
        assert not event["ray_checkpoint"] and event["restored_step"] == 2 * STEPS
        assert event["saved"] == [9, 10, 11, 12]
        assert read_pointer(result.checkpoint)["step"] == 3 * STEPS
        store.reload()
        check_ray_checkpoints_load(result, store, {9, 10, 12})
        release_unreferenced(config, handle=handle)
        # both trials' checkpoints stay (1, 2, 8 and 9, 10, 12); ray-ckpt's own retention took the rest
        assert [i.step for i in store.reload().list()] == [1, 2, 8, 9, 10, 12]
    finally:
        handle.shutdown()
        ray.shutdown()


def test_train_v1_restore_and_refit_resume_from_ray_ckpt(tmp_path: Path, run_name: str, ray_session: str) -> None:
    """Train V1: Ray's kept checkpoints load; restore() and a same-name fit() resume from ray-ckpt's latest."""
    import ray

    address = ray.get_runtime_context().gcs_address
    code = (
        "import sys; from pathlib import Path; from tests.integration.test_train_v1 import scenario; "
        "scenario(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])"
    )
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), run_name, address, ray_session],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
