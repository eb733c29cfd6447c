"""Ray Train (V2) on ray-ckpt: a 2-worker TorchTrainer (gloo, CPU, DDP) saving through WorkerClient.

The driver starts the run's checkpointer before ``fit()``; Train's controller and worker actors
belong to the driver's job and so share its namespace, which is how every rank finds the named
checkpointer (``WorkerClient(run_name)``, rank and world size from ``ray.train.get_context()``).
DDP keeps the parameters replicated, so both ranks hand in the same keys and the checkpointer
writes them once. Rank 0 reports a pointer checkpoint through ``ray.train.report``; the other
rank reports metrics only (``report`` is a barrier in Train). A second ``fit()`` of the same Train
run resumes from that pointer: it loads the latest ray-ckpt checkpoint and carries on at step+1.
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

STEPS = 3


def _digest(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """A per-tensor sha256 of the bytes (to compare weights across processes)."""
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in sorted(state.items())}


def _train_loop(cfg: dict[str, Any]) -> None:
    """One Train worker: DDP on a shard of a fixed regression problem, saving every step."""
    import ray
    import ray.train
    import ray.train.torch

    from ray_ckpt import WorkerClient
    from ray_ckpt.integrations import load_from_ray_checkpoint, read_pointer, report

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
    checkpoint = ray.train.get_checkpoint()
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
        report({**metrics, "step": step}, info if rank == 0 else None, config)
    event.update(saved=saved, final=_digest(module.state_dict()))
    with open(os.path.join(cfg["events"], f"{cfg['attempt']}-rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(event, f)


def _fit(tmp_path: Path, run_name: str, attempt: int) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "run_name": run_name, "steps": STEPS, "events": str(tmp_path / "events"), "attempt": attempt
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray_results"), name=f"train-{run_name}"),
    )
    return trainer.fit()


def _events(tmp_path: Path, attempt: int) -> list[dict[str, Any]]:
    return [json.loads((tmp_path / "events" / f"{attempt}-rank{r}.json").read_text()) for r in (0, 1)]


def test_torch_trainer_saves_through_ray_ckpt_and_resumes(tmp_path: Path, run_name: str, ray_session: str) -> None:
    """Two DDP workers commit world_size-2 checkpoints; a second fit resumes from the pointer at step+1."""
    from ray_ckpt import start_checkpointer
    from ray_ckpt.integrations import read_pointer

    (tmp_path / "events").mkdir()
    storage = str(tmp_path / "ckpt")
    handle = start_checkpointer(CheckpointConfig(storage_uri=storage, run_name=run_name, metric_name="loss"))
    try:
        result = _fit(tmp_path, run_name, attempt=1)
        assert result.error is None, result.error
        events = _events(tmp_path, 1)
        for rank, event in enumerate(events):
            assert event["client"] == [rank, 2]  # WorkerClient took rank / world size from the train context
            assert event["namespace"] == ray_session  # Train workers share the driver's namespace
            assert event["ddp"] == "DistributedDataParallel"
            assert event["saved"] == [1, 2, 3]
        assert events[0]["final"] == events[1]["final"]  # replicated parameters

        pointer = read_pointer(result.checkpoint)
        assert (pointer["run_name"], pointer["step"], pointer["world_size"]) == (run_name, STEPS, 2)
        store = CheckpointStore(storage, run_name=run_name)
        infos = store.list()
        assert [i.step for i in infos] == [1, 2, 3]
        assert all(i.world_size == 2 for i in infos)
        for info in infos:
            state = store.load(info.step)
            assert set(state) == {"weight", "bias"}
            assert store.verify(info.step).step == info.step
        assert _digest(store.load(STEPS)) == events[0]["final"]  # written once, the weights the ranks hold
        assert "momentum_buffer" in store.load_trainer_state(STEPS)["optimizer"]["state"][0]
        assert handle.latest().step == STEPS

        # resumable: the same Train run again; Train hands every rank the pointer of step 3
        result2 = _fit(tmp_path, run_name, attempt=2)
        assert result2.error is None, result2.error
        for event in _events(tmp_path, 2):
            assert (event["restored_run"], event["restored_step"]) == (run_name, STEPS)
            assert event["restored"] == _digest(store.load(STEPS))  # resumed with the saved weights
            assert event["saved"] == [4, 5, 6]  # continued at step + 1
        assert [i.step for i in store.reload().list()] == [1, 2, 3, 4, 5, 6]  # the checkpointer wrote them
        assert read_pointer(result2.checkpoint)["step"] == 2 * STEPS
        assert handle.latest().step == 2 * STEPS
    finally:
        handle.shutdown()
