"""Ray Train with FSDP2: a 2-worker TorchTrainer saves its sharded state; a 3-worker one resumes it.

Each Train worker hands ray-ckpt its local shards (the DTensors of ``model.state_dict()`` and of
the optimizer state from ``get_state_dict``); the resumed run, at another world size, fills its
own shards in place with ``WorkerClient.load`` (uneven: 8 rows over 3 ranks) and goes on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointConfig, CheckpointStore

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _loop(cfg: dict[str, Any]) -> None:
    import ray.train
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from ray_ckpt import WorkerClient

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    client = WorkerClient(cfg["run_name"])
    event: dict[str, Any] = {"rank": rank, "world": world}
    first = 1
    if cfg["resume"]:
        model_sd, optim_sd = get_state_dict(model, optim)
        step = client.load("latest", into=model_sd, trainer_into={"optim": optim_sd})
        set_state_dict(model, optim, model_state_dict=model_sd, optim_state_dict=optim_sd)
        saved = CheckpointStore(config=client.config).load(step)
        event["restored_step"] = step
        event["restored_exact"] = all(
            torch.equal(v.full_tensor() if isinstance(v, DTensor) else v, saved[k])
            for k, v in get_state_dict(model, optim)[0].items()
        )
        first = step + 1
    g = torch.Generator().manual_seed(rank)
    for step in range(first, first + 2):
        x = torch.randn(4, 10, generator=g)
        model(x).square().mean().backward()
        optim.step()
        optim.zero_grad()
        model_sd, optim_sd = get_state_dict(model, optim)
        info = client.save(step, model_sd, metrics={"loss": 1.0 / step}, trainer_state={"optim": optim_sd})
        event.setdefault("saved", []).append(info.result(120).step)
        ray.train.report({"step": step})
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).tolist() for k, v in model.state_dict().items()}
    event["final"] = full
    with open(os.path.join(cfg["events"], f"{world}-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(event, f)


def _fit(tmp_path: Path, run_name: str, workers: int, resume: bool) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        _loop,
        train_loop_config={"run_name": run_name, "events": str(tmp_path / "events"), "resume": resume},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name=f"fsdp-{run_name}-{workers}"),
    ).fit()


def test_fsdp2_torch_trainer_resumes_with_another_number_of_workers(tmp_path: Path, run_name: str) -> None:
    from ray_ckpt import start_checkpointer

    (tmp_path / "events").mkdir()
    config = CheckpointConfig(storage_uri=str(tmp_path / "ckpt"), run_name=run_name, write_mode="direct")
    handle = start_checkpointer(config)
    try:
        assert _fit(tmp_path, run_name, 2, resume=False).error is None
        store = CheckpointStore(config=config)
        first = [json.loads((tmp_path / "events" / f"2-{r}.json").read_text()) for r in range(2)]
        assert first[0]["saved"] == [1, 2] and first[0]["final"] == first[1]["final"]
        saved = store.load(2)
        assert {k: v.tolist() for k, v in saved.items()} == first[0]["final"]  # the full tensors, from 2 shards
        assert store.info(2).world_size == 2 and store.load_trainer_state(2)["optim"]["state"]
        assert _fit(tmp_path, run_name, 3, resume=True).error is None
        second = [json.loads((tmp_path / "events" / f"3-{r}.json").read_text()) for r in range(3)]
        for event in second:
            assert event["restored_step"] == 2 and event["restored_exact"], event
            assert event["saved"] == [3, 4]
        store.reload()
        assert store.info(4).world_size == 3
        assert {k: v.tolist() for k, v in store.load(4).items()} == second[0]["final"]
    finally:
        handle.shutdown()
