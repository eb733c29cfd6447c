"""Ray Train on ray-ckpt: a 2-worker TorchTrainer (gloo, CPU, DDP) saving through WorkerClient.

The driver starts the run's checkpointer before ``fit()``; Train's controller and worker actors
belong to the driver's job and so share its namespace, which is how every rank finds the named
checkpointer (``WorkerClient(run_name)``, rank and world size from ``ray.train.get_context()``).
DDP keeps the parameters replicated, so both ranks hand in the same keys and the checkpointer
writes them once. Rank 0 reports a pointer checkpoint through ``ray.train.report``; the other
rank reports metrics only (``report`` is a barrier in Train).

Retention has one truth (docs/RAY.md): ray-ckpt keeps only the newest step (``keep_last_n=1``)
while Ray keeps the two best by a score plus its latest; every checkpoint Ray lists loads, and
ray-ckpt deletes what neither keeps. A restart resumes from ray-ckpt's latest committed step
through ``integrations.get_checkpoint`` when Ray hands back no checkpoint (a new Ray run name).
These tests run
Train V2 (Ray's default); test_train_v1.py runs the same loop under Train V1 in its own process.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointConfig, CheckpointStore

pytestmark = pytest.mark.usefixtures("ray_session")

STEPS = 4
# Ray's retention, deliberately unlike ray-ckpt's keep_last_n=1: the two lowest steps plus Ray's latest.
RAY_NUM_TO_KEEP = 2


def _digest(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """A per-tensor sha256 of the bytes (to compare weights across processes)."""
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in sorted(state.items())}


def _train_loop(cfg: dict[str, Any]) -> None:
    """One Train worker: DDP on a shard of a fixed regression problem, saving every step."""
    import ray
    import ray.train
    import ray.train.torch

    from ray_ckpt import WorkerClient
    from ray_ckpt.distributed.train_tune import get_checkpoint, load_from_ray_checkpoint, read_pointer, report

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    client = WorkerClient(cfg["run_name"])  # rank / world size from the train context
    config = client.config
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1))
    module = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.25
    x, y = x[rank::world_size], y[rank::world_size]

    event: dict[str, Any] = {
        "rank": rank,
        "client": [client.rank, client.world_size],
        "namespace": ray.get_runtime_context().namespace,
        "ddp": type(model).__name__,
    }
    first = 1
    # Ray's checkpoint, or the run's latest commit when Ray has none (a new trial, a new run name)
    checkpoint = get_checkpoint(config)
    event["ray_checkpoint"] = ray.train.get_checkpoint() is not None
    if checkpoint is not None:
        pointer = read_pointer(checkpoint)
        step, state, trainer_state = load_from_ray_checkpoint(checkpoint)
        module.load_state_dict(state)
        optimizer.load_state_dict(trainer_state["optimizer"])
        event.update(restored_run=pointer["run_name"], restored_step=step, restored=_digest(module.state_dict()))
        first = step + 1
    saved = []
    for step in range(first, first + cfg["steps"]):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        metrics = {"loss": float(loss.detach())}
        trainer_state = {"optimizer": optimizer.state_dict()}
        info = client.save(step, module.state_dict(), metrics=metrics, trainer_state=trainer_state).result(timeout=60)
        saved.append(info.step)
        if step == cfg.get("fail_after_save"):  # committed in ray-ckpt, never reported to Ray
            raise RuntimeError(f"planned failure after saving step {step}")
        report({**metrics, "step": step}, info if rank == 0 else None, config)
    event.update(saved=saved, final=_digest(module.state_dict()))
    with open(os.path.join(cfg["events"], f"{cfg['attempt']}-rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(event, f)


def _fit(tmp_path: Path, run_name: str, attempt: int, *, name: str | None = None) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "run_name": run_name,
            "steps": STEPS,
            "events": str(tmp_path / "events"),
            "attempt": attempt,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(
            storage_path=str(tmp_path / "ray_results"),
            name=name or f"train-{run_name}",
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=RAY_NUM_TO_KEEP, checkpoint_score_attribute="step", checkpoint_score_order="min"
            ),
        ),
    )
    return trainer.fit()


def _events(tmp_path: Path, attempt: int, ranks: tuple[int, ...] = (0, 1)) -> list[dict[str, Any]]:
    return [json.loads((tmp_path / "events" / f"{attempt}-rank{r}.json").read_text()) for r in ranks]


def ray_kept_steps(first: int) -> set[int]:
    """What Ray's CheckpointConfig keeps of steps first..first+STEPS-1: the two lowest and the latest."""
    steps = list(range(first, first + STEPS))
    return set(steps[:RAY_NUM_TO_KEEP]) | {steps[-1]}


def check_ray_checkpoints_load(result: Any, store: CheckpointStore, expected_steps: set[int]) -> None:
    """Every checkpoint Ray lists as kept (best_checkpoints) and its latest load from ray-ckpt, bit for bit."""
    from ray_ckpt.distributed.train_tune import load_from_ray_checkpoint, read_pointer

    listed = [checkpoint for checkpoint, _metrics in result.best_checkpoints] + [result.checkpoint]
    loaded = set()
    for checkpoint in listed:
        step, state, trainer_state = load_from_ray_checkpoint(checkpoint)
        assert step == read_pointer(checkpoint)["step"]
        assert _digest(state) == _digest(store.load(step))
        assert "momentum_buffer" in trainer_state["optimizer"]["state"][0]
        loaded.add(step)
    assert loaded == expected_steps


def test_torch_trainer_saves_through_ray_ckpt_and_resumes(tmp_path: Path, run_name: str, ray_session: str) -> None:
    """DDP workers commit world_size-2 checkpoints; Ray's kept checkpoints all load; restarts resume at step+1."""
    from ray_ckpt import start_checkpointer
    from ray_ckpt.distributed.train_tune import read_pointer, release_unreferenced

    (tmp_path / "events").mkdir()
    storage = str(tmp_path / "ckpt")
    config = CheckpointConfig(storage_uri=storage, run_name=run_name, metric_name="loss", keep_last_n=1)
    handle = start_checkpointer(config)
    try:
        result = _fit(tmp_path, run_name, attempt=1)
        assert result.error is None, result.error
        events = _events(tmp_path, 1)
        for rank, event in enumerate(events):
            assert event["client"] == [rank, 2]  # WorkerClient took rank / world size from the train context
            assert event["namespace"] == ray_session  # Train workers share the driver's namespace
            assert event["ddp"] == "DistributedDataParallel"
            assert event["saved"] == [1, 2, 3, 4]
            assert not event["ray_checkpoint"] and "restored_step" not in event  # a fresh run starts at 1
        assert events[0]["final"] == events[1]["final"]  # replicated parameters

        pointer = read_pointer(result.checkpoint)
        assert (pointer["run_name"], pointer["step"], pointer["world_size"]) == (run_name, STEPS, 2)
        store = CheckpointStore(storage, run_name=run_name)
        # ray-ckpt keeps only its latest (keep_last_n=1), but never a step Ray still lists: 1 and 2 stay
        store.reload()
        check_ray_checkpoints_load(result, store, ray_kept_steps(1))
        assert all(i.world_size == 2 for i in store.list())
        assert _digest(store.load(STEPS)) == events[0]["final"]  # written once, the weights the ranks hold
        # once Ray has dropped step 3 too, its lease goes and retention deletes what neither side keeps
        release_unreferenced(config, handle=handle)
        assert {i.step for i in store.reload().list()} == ray_kept_steps(1)
        assert handle.latest().step == STEPS

        # a new Ray run name: Ray has no checkpoint, ray-ckpt's latest commit is the resume point
        result2 = _fit(tmp_path, run_name, attempt=2, name=f"train-{run_name}-again")
        assert result2.error is None, result2.error
        for event in _events(tmp_path, 2):
            assert not event["ray_checkpoint"]
            assert (event["restored_run"], event["restored_step"]) == (run_name, STEPS)
            assert event["restored"] == _digest(store.load(STEPS))  # resumed with the saved weights
            assert event["saved"] == [5, 6, 7, 8]  # continued at step + 1
        assert read_pointer(result2.checkpoint)["step"] == 2 * STEPS
        store.reload()
        check_ray_checkpoints_load(result2, store, ray_kept_steps(5))
        release_unreferenced(config, handle=handle)
        # both Ray experiments' checkpoints survive (1, 2, 4 and 5, 6, 8); what neither references goes
        assert {i.step for i in store.reload().list()} == ray_kept_steps(1) | ray_kept_steps(5)
        check_ray_checkpoints_load(result, store, ray_kept_steps(1))  # the first experiment's still load
        assert handle.latest().step == 2 * STEPS
    finally:
        handle.shutdown()
