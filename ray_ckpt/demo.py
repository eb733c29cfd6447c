"""The end-to-end demo: local Ray, 2 worker actors training a small torch model and saving through
the checkpointer, 2 evaluation actors following the run (wait, lease, load, report_eval), retention
running, and a closing table of the top-k checkpoints with train and eval metrics.

    python -m ray_ckpt.demo --config configs/example.yaml [--steps 40] [--fresh]

Each rank owns one "tower" of the model (partitioned keys) and both hold the same frozen input
projection (replicated keys, written once). Re-running resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import ray
import torch
from torch import nn

import ray_ckpt
from ray_ckpt.config import CheckpointConfig
from ray_ckpt.index import CheckpointInfo

logger = logging.getLogger(__name__)

DIM, HIDDEN = 16, 32


class DemoNet(nn.Module):
    """A frozen shared projection feeding two towers whose outputs are averaged."""

    def __init__(self, dim: int = DIM, hidden: int = HIDDEN, towers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(1234)  # the shared projection is identical on every rank
        self.proj = nn.Linear(dim, hidden)
        self.towers = nn.ModuleList(nn.Sequential(nn.Tanh(), nn.Linear(hidden, 1)) for _ in range(towers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return torch.stack([t(h) for t in self.towers]).mean(0).squeeze(-1)

    def tower_output(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.towers[i](self.proj(x)).squeeze(-1)


def make_data(seed: int, n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic regression task (the same target function for every rank)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.linspace(-1, 1, DIM)
    x = torch.randn(n, DIM, generator=g)
    y = torch.tanh(0.5 * (x @ w)) + 0.05 * torch.randn(n, generator=g)
    return x, y


@ray.remote(num_cpus=0)
class DemoTrainer:
    """One rank: trains its own tower and saves its share of the model each interval."""

    def __init__(self, run_name: str, rank: int, world_size: int) -> None:
        logging.basicConfig(level=logging.INFO)
        self.rank = rank
        self.client = ray_ckpt.WorkerClient(run_name, rank, world_size)
        self.model = DemoNet()
        self.model.proj.requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.towers[rank].parameters(), lr=3e-2)
        self.x, self.y = make_data(seed=rank)
        self.step = 0
        store = ray_ckpt.CheckpointStore(config=self.client.config)
        latest = store.latest()
        if latest is not None:  # resume this rank's share from the run's latest checkpoint
            state = store.load(latest.step)
            self.model.load_state_dict({k: v for k, v in state.items()}, strict=False)
            self.step = latest.step

    def shard(self) -> dict[str, torch.Tensor]:
        """This rank's keys: the replicated projection plus its own tower."""
        return {k: v for k, v in self.model.state_dict().items() if k.startswith(("proj.", f"towers.{self.rank}."))}

    def train(self, steps: int, save_every: int) -> list[int]:
        saved = []
        for _ in range(steps):
            self.step += 1
            loss = nn.functional.mse_loss(self.model.tower_output(self.x, self.rank), self.y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            if self.step % save_every == 0:
                self.client.save(
                    self.step,
                    self.shard(),
                    metrics={f"train/loss_rank{self.rank}": loss.item(), "train/loss": loss.item()},
                    trainer_state={"optimizer": self.opt.state_dict(), "step": self.step},
                    blocking=False,  # training goes on while the checkpointer writes
                )
                saved.append(self.step)
        self.client.wait()
        return saved


@ray.remote(num_cpus=0)
class DemoEvaluator:
    """Follows the run: waits for new checkpoints, leases, loads the model, reports a score."""

    def __init__(self, run_name: str, index: int, count: int) -> None:
        logging.basicConfig(level=logging.INFO)
        self.ev = ray_ckpt.EvalClient(run_name)
        self.index, self.count = index, count
        self.x, self.y = make_data(seed=10_000)

    def follow(self, final_step: int, save_every: int, timeout: float = 120.0) -> list[int]:
        seen, evaluated = None, []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.ev.wait_for_checkpoint(seen, timeout=5.0)
            if info is None:
                continue
            new = [i.step for i in self.ev.list() if seen is None or i.step > seen]
            seen = info.step
            for step in new:
                if (step // save_every) % self.count != self.index:
                    continue  # the other evaluator's share
                try:
                    with self.ev.lease(step):
                        model = self.ev.load_model(step)
                        with torch.no_grad():
                            mse = nn.functional.mse_loss(model(self.x), self.y).item()
                        self.ev.report_eval(step, {"eval/return": -mse})
                        evaluated.append(step)
                except ray_ckpt.CheckpointNotFoundError:
                    pass  # retention removed it before we leased it
            if seen >= final_step:
                break
        return evaluated


def run_demo(config: CheckpointConfig, steps: int = 40, workers: int = 2, evaluators: int = 2) -> list[CheckpointInfo]:
    """Train, checkpoint and evaluate a run on the current Ray cluster; returns the final top-k."""
    handle = ray_ckpt.start_checkpointer(config)
    # The class as every process imports it (run as __main__, this module's own DemoNet would be
    # recorded as "__main__.DemoNet"). A live class trusts its module: the checkpointer serves it to
    # the evaluators' allow-list, so they build the model with the default settings.
    from ray_ckpt.demo import DemoNet as importable

    handle.register(importable, {"dim": DIM, "hidden": HIDDEN, "towers": workers})
    start = handle.latest().step if handle.latest() else 0
    save_every = config.save_interval_steps
    final_step = start + steps - (steps % save_every)
    trainers = [DemoTrainer.remote(config.run_name, r, workers) for r in range(workers)]
    evals = [DemoEvaluator.remote(config.run_name, i, evaluators) for i in range(evaluators)]
    followed = [e.follow.remote(final_step, save_every) for e in evals]
    saved = ray.get([t.train.remote(steps, save_every) for t in trainers])
    evaluated = ray.get(followed)
    logger.info("saved steps %s; evaluated %s", saved[0], evaluated)
    return handle.top_k(config.keep_top_k or 3) or handle.list()[-3:]


def format_table(infos: list[CheckpointInfo], kept: list[CheckpointInfo]) -> str:
    """A Markdown table of checkpoints with train and eval metrics."""

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "-"

    lines = ["| rank | step | train/loss | eval/return | MB | world_size |", "|---|---|---|---|---|---|"]
    for i, info in enumerate(infos, 1):
        lines.append(
            f"| {i} | {info.step} | {fmt(info.metrics.get('train/loss'))} | {fmt(info.metrics.get('eval/return'))} "
            f"| {info.files_size / 1e6:.3f} | {info.world_size} |"
        )
    lines.append("")
    lines.append("kept on storage: " + ", ".join(str(i.step) for i in kept))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/example.yaml", help="run config YAML")
    parser.add_argument("--steps", type=int, default=40, help="training steps per worker")
    parser.add_argument("--storage", default=None, help="override storage_uri")
    parser.add_argument("--fresh", action="store_true", help="delete the run first instead of resuming it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = CheckpointConfig.from_yaml(args.config)
    if args.storage:
        config = config.replace(storage_uri=args.storage)
    if args.fresh:
        store = ray_ckpt.CheckpointStore(config=config)
        store.storage.rm("", recursive=True, missing_ok=True)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        top = run_demo(config, steps=args.steps)
        kept = ray_ckpt.CheckpointStore(config=config).list()
    finally:
        ray.shutdown()
    print(f"\nTop checkpoints of run {config.run_name!r} by {config.metric_name} ({config.mode}):\n")
    print(format_table(top, kept))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
