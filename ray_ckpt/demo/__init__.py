"""The end-to-end demo: 2 worker actors train a small transformer with FSDP2 and save their shards
through the run's checkpointer, 2 evaluation actors follow the run (wait, lease, load, report_eval),
retention runs, and a closing table shows the top-k checkpoints with train and eval metrics.

    python -m ray_ckpt.demo --config configs/example.yaml [--steps 40] [--fresh] [--address auto]

Each rank holds a shard of every parameter and of Adam's state (a gloo group over the ranks); it
hands the checkpointer only that shard, and every step commits full tensors that the evaluators
load as a plain model. Re-running resumes from the run's latest checkpoint, weights and optimizer
state, resharded into the ranks' layout.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import ray
import torch
from torch import nn

from ray_ckpt.core.config import CheckpointConfig
from ray_ckpt.core.errors import CheckpointNotFoundError
from ray_ckpt.core.index import CheckpointInfo
from ray_ckpt.core.store import CheckpointStore
from ray_ckpt.distributed.checkpointer import LOG_LEVEL_ENV
from ray_ckpt.distributed.eval import EvalClient
from ray_ckpt.distributed.handle import start_checkpointer
from ray_ckpt.distributed.worker import WorkerClient
from ray_ckpt.tiers.tiered import open_store

logger = logging.getLogger(__name__)

SEQ, DIM, D_MODEL, HEADS, LAYERS = 8, 16, 32, 2, 2
EVAL_METRIC = "eval/return"


class DemoTransformer(nn.Module):
    """A small transformer encoder that regresses a sequence to one number."""

    def __init__(self, dim: int = DIM, d_model: int = D_MODEL, heads: int = HEADS, layers: int = LAYERS) -> None:
        super().__init__()
        torch.manual_seed(1234)  # every rank starts from the same weights
        self.embed = nn.Linear(dim, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        # A new tensor, not a view (``squeeze`` would be one): FSDP2 warns when a wrapped module
        # returns a view, since an in-place op on it would skip the module's pre-backward hook.
        return self.head(h.mean(1)).sum(-1)


def make_data(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic sequence regression task (the same target function for every rank)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.linspace(-1, 1, DIM)
    x = torch.randn(n, SEQ, DIM, generator=g)
    y = torch.tanh(2.0 * (x.mean(1) @ w)) + 0.05 * torch.randn(n, generator=g)
    return x, y


# -- one rank's training: everything that knows how the model is trained and sharded -------------
class RankTraining:
    """One rank's model, optimizer and data, and the state it saves and restores.

    With several ranks the model is sharded with FSDP2 (``fully_shard`` per encoder layer and at
    the root, a gloo group over the ranks): each rank holds a shard of every parameter and of
    Adam's state, and hands ray-ckpt only that shard. With one rank it is a plain module (a
    resharding load of the same checkpoint). The only place that knows how a rank trains.
    """

    def __init__(self, rank: int, world_size: int, address: tuple[str, int] | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.model = DemoTransformer()
        if world_size > 1:
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            if not dist.is_initialized():
                assert address is not None, "several ranks need rank 0's (host, port)"
                os.environ.update(MASTER_ADDR=address[0], MASTER_PORT=str(address[1]))
                dist.init_process_group("gloo", rank=rank, world_size=world_size)
            mesh = init_device_mesh("cpu", (world_size,))
            for layer in self.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=3e-3)
        self.x, self.y = make_data(seed=rank)

    def train_step(self) -> float:
        """One optimizer step on this rank's data (FSDP2 averages the gradients); the loss."""
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def states(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model state, trainer state) as this rank holds them: DTensor shards under FSDP2."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return model_sd, {"optim": optim_sd, "step": step}

    def restore(self, store: CheckpointStore, step: int) -> bool:
        """Load weights and optimizer state from ``step`` into this rank's shards (any world size
        saved it); whether the optimizer state was there."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        store.load(step, into=model_sd)
        try:
            store.load_trainer_state(step, into={"optim": optim_sd})
            restored = True
        except (KeyError, ValueError):
            restored = False  # saved without (this layout of) optimizer state: a fresh optimizer
        set_state_dict(self.model, self.opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
        return restored


def rendezvous() -> tuple[str, int]:
    """This node's address and a free port: where rank 0 hosts the ranks' gloo group."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = int(s.getsockname()[1])
    return ray.util.get_node_ip_address(), port


@ray.remote(num_cpus=0)
class DemoTrainer:
    """One rank: trains its FSDP2 shard of the model and saves it each interval.

    Created before the checkpointer is up (its process starts meanwhile); :meth:`connect` then
    joins the ranks' group and the run, and resumes from the run's latest checkpoint.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.training: RankTraining | None = None
        self.step = 0
        self.client: WorkerClient | None = None
        self._pending: list[Any] = []

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: the address of the ranks' group."""
        return rendezvous()

    def connect(self, run_name: str, address: tuple[str, int] | None = None) -> dict[str, Any]:
        """Join the ranks' group and the run; resume weights and optimizer state from its latest checkpoint."""
        self.training = RankTraining(self.rank, self.world_size, address)
        self.client = WorkerClient(run_name, self.rank, self.world_size)
        store = open_store(self.client.config)
        latest = store.latest()
        restored = False
        if latest is not None:
            restored = self.training.restore(store, latest.step)
            self.step = latest.step
        return {"rank": self.rank, "step": self.step, "optimizer_restored": restored}

    def optimizer_steps(self) -> int:
        """Adam's step count of this rank's parameters (it continues across a resume)."""
        assert self.training is not None, "connect() first"
        states = self.training.opt.state_dict()["state"].values()
        return max((int(s["step"]) for s in states), default=0)

    def train(self, steps: int, save_every: int) -> dict[str, Any]:
        """Train ``steps`` steps, saving every ``save_every``; the last loss and the commits seen since."""
        assert self.client is not None and self.training is not None, "connect() first"
        loss = math.nan
        for _ in range(steps):
            self.step += 1
            loss = self.training.train_step()
            if self.step % save_every == 0:
                model_state, trainer_state = self.training.states(self.step)
                future = self.client.save(
                    self.step,
                    model_state,  # this rank's shards only: no gather
                    metrics={f"train/loss_rank{self.rank}": loss, "train/loss": loss},
                    trainer_state=trainer_state,
                    blocking=False,  # training goes on while the checkpointer writes
                )
                self._pending.append(future)
        return {"rank": self.rank, "step": self.step, "loss": loss, "committed": self._settled(wait=False)}

    def finish(self) -> list[CheckpointInfo]:
        """Wait for this rank's pending saves; the commits not reported yet."""
        return self._settled(wait=True)

    def _settled(self, wait: bool) -> list[CheckpointInfo]:
        done = [f for f in self._pending if wait or f.done()]
        self._pending = [f for f in self._pending if f not in done]
        return [f.result() for f in done]


@ray.remote(num_cpus=0)
class DemoEvaluator:
    """Follows the run: waits for new checkpoints, leases, loads the model, reports a score."""

    def __init__(self, index: int, count: int) -> None:
        self.index, self.count = index, count
        self.x, self.y = make_data(seed=10_000)
        self.ev: EvalClient | None = None

    def connect(self, run_name: str) -> int:
        self.ev = EvalClient(run_name)
        return self.index

    def evaluate(self, model: nn.Module) -> float:
        """The score of a model: minus its mean squared error on held-out data."""
        with torch.no_grad():
            return -nn.functional.mse_loss(model(self.x), self.y).item()

    def follow(self, final_step: int, save_every: int, timeout: float = 120.0) -> list[tuple[int, float]]:
        """Evaluate this evaluator's share of the checkpoints up to ``final_step``; (step, score) pairs."""
        assert self.ev is not None, "connect() first"
        seen, evaluated = None, []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.ev.wait_for_checkpoint(seen, timeout=5.0)
            if info is None:
                continue
            # steps not seen yet and not scored yet (a resumed run's old steps have their scores)
            new = [i.step for i in self.ev.list() if (seen is None or i.step > seen) and EVAL_METRIC not in i.metrics]
            seen = info.step
            for step in new:
                if (step // save_every) % self.count != self.index:
                    continue  # the other evaluator's share
                try:
                    with self.ev.lease(step):
                        score = self.evaluate(self.ev.load_model(step))
                        self.ev.report_eval(step, {EVAL_METRIC: score})
                        evaluated.append((step, score))
                except CheckpointNotFoundError:
                    pass  # retention removed it before we leased it
            if seen >= final_step:
                break
        self.ev.close()
        return evaluated


class Progress:
    """Prints one line per commit and per score as the driver learns of them."""

    def __init__(self, out: Any = None) -> None:
        self.out = out or sys.stdout
        self.alive: set[int] = set()
        self.scored: set[int] = set()

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def update(self, commits: Iterable[CheckpointInfo], records: list[CheckpointInfo]) -> None:
        """``commits`` just learned of; ``records`` the run's index now (for deletions and scores)."""
        now = {r.step for r in records}
        for info in sorted(commits, key=lambda i: i.step):
            gone = sorted(self.alive - now)
            self.alive = (self.alive - set(gone)) | ({info.step} & now)
            loss = info.metrics.get("train/loss")
            self.line(
                f"commit  step {info.step:>4}  train/loss {_fmt(loss)}  {info.files_size / 1e3:.1f} kB"
                f"  ranks {info.world_size}  retention deleted {_steps(gone)}  kept {_steps(sorted(now))}"
            )
        for record in records:
            score = record.metrics.get(EVAL_METRIC)
            if score is not None and record.step not in self.scored:
                self.scored.add(record.step)
                self.line(f"eval    step {record.step:>4}  {EVAL_METRIC} {_fmt(score)}")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "-"


def _steps(steps: list[int]) -> str:
    return ",".join(map(str, steps)) if steps else "-"


def run_demo(
    config: CheckpointConfig, steps: int = 40, workers: int = 2, evaluators: int = 2, *, out: Any = None
) -> list[CheckpointInfo]:
    """Train, checkpoint and evaluate a run on the current Ray cluster; returns the final top-k.

    The actors' processes start while the checkpointer does (nothing waits for one before
    starting the next); progress lines go to ``out`` (default stdout).
    """
    progress = Progress(out)
    started = time.monotonic()
    trainers = [DemoTrainer.remote(r, workers) for r in range(workers)]
    evals = [DemoEvaluator.remote(i, evaluators) for i in range(evaluators)]
    handle = start_checkpointer(config)
    # The class as every process imports it (run as __main__, this module's own DemoTransformer would
    # be recorded as "__main__.DemoTransformer"). A live class trusts its module: the checkpointer serves it to
    # the evaluators' allow-list, so they build the model with the default settings.
    from ray_ckpt.demo import DemoTransformer as importable

    handle.register(importable, {"dim": DIM, "d_model": D_MODEL, "heads": HEADS, "layers": LAYERS})
    address = ray.get(trainers[0].rendezvous.remote()) if workers > 1 else None
    joined = ray.get([t.connect.remote(config.run_name, address) for t in trainers])
    ray.get([e.connect.remote(config.run_name) for e in evals])
    start = joined[0]["step"]
    records = handle.list()
    progress.alive = {i.step for i in records}
    progress.scored = {i.step for i in records if EVAL_METRIC in i.metrics}
    resumed = (
        f"resumed from step {start} (optimizer state restored on ranks "
        f"{[j['rank'] for j in joined if j['optimizer_restored']] or 'none'})"
        if start
        else "a new run"
    )
    progress.line(
        f"ready in {time.monotonic() - started:.1f}s: checkpointer for run {config.run_name!r} on "
        f"{config.storage_uri}, {workers} trainers, {evaluators} evaluators; {resumed}"
    )

    save_every = config.save_interval_steps or 1
    final_step = start + steps - (steps % save_every)
    followed = [e.follow.remote(final_step, save_every) for e in evals]
    done = 0
    while done < steps:
        chunk = min(save_every, steps - done)
        results = ray.get([t.train.remote(chunk, save_every) for t in trainers])
        done += chunk
        progress.update(results[0]["committed"], handle.list())
    progress.update(ray.get(trainers[0].finish.remote()), handle.list())
    ray.get([t.finish.remote() for t in trainers[1:]])
    pending = list(followed)
    while pending:  # the evaluators' last scores, as they come
        _, pending = ray.wait(pending, timeout=0.5)
        progress.update([], handle.list())
    scores = sum((len(s) for s in ray.get(followed)), 0)
    progress.line(
        f"done in {time.monotonic() - started:.1f}s: trained steps {start + 1}-{start + steps}, "
        f"{scores} checkpoints evaluated"
    )
    return handle.top_k(config.keep_top_k or 3) or handle.list()[-3:]


def format_table(infos: list[CheckpointInfo], kept: list[CheckpointInfo]) -> str:
    """A Markdown table of checkpoints with train and eval metrics."""
    lines = ["| rank | step | train/loss | eval/return | MB | world_size |", "|---|---|---|---|---|---|"]
    for i, info in enumerate(infos, 1):
        lines.append(
            f"| {i} | {info.step} | {_fmt(info.metrics.get('train/loss'))} | {_fmt(info.metrics.get(EVAL_METRIC))} "
            f"| {info.files_size / 1e6:.3f} | {info.world_size} |"
        )
    lines.append("")
    lines.append("kept on storage: " + ", ".join(str(i.step) for i in kept))
    return "\n".join(lines)


def _absolute(uri: str) -> str:
    """A local storage path made absolute: actors on a cluster do not share the driver's cwd."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m ray_ckpt.demo",
        description=(
            "Train a small model on Ray worker actors that checkpoint through ray-ckpt, with evaluation "
            "actors scoring each checkpoint, then print the top-k checkpoints. Re-running resumes the run."
        ),
    )
    parser.add_argument("--config", default="configs/example.yaml", help="run config YAML (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per worker (default: %(default)s)")
    parser.add_argument("--storage", default=None, help="storage URI or directory, instead of the config's")
    parser.add_argument("--run-name", default=None, help="run name, instead of the config's")
    parser.add_argument("--fresh", action="store_true", help="delete the run first instead of resuming it")
    parser.add_argument("--workers", type=int, default=2, help="training worker actors (default: %(default)s)")
    parser.add_argument(
        "--evaluators", type=int, default=2, help="evaluation actors following the run (default: %(default)s)"
    )
    parser.add_argument(
        "--address",
        default=None,
        help="attach to this Ray cluster ('auto': the one running on this machine; default: RAY_ADDRESS, "
        "else start a local Ray)",
    )
    parser.add_argument(
        "--num-cpus", type=int, default=2, help="logical CPUs of a local Ray (ignored with --address; default: 2)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit status 0 once it has printed the top-k table."""
    args = parse_args(argv)
    # The demo prints one line per commit and per score itself: library logs only from warnings up,
    # here and in its actors (the checkpointer logs each commit at INFO), and Ray's prefixes of
    # actor output without colour codes unless stdout is a terminal.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    runtime_env = {"env_vars": {LOG_LEVEL_ENV: os.environ.get(LOG_LEVEL_ENV, "WARNING")}}
    config = CheckpointConfig.from_yaml(args.config)
    changes = {"storage_uri": _absolute(args.storage or config.storage_uri)}
    if args.run_name:
        changes["run_name"] = args.run_name
    config = config.replace(**changes)
    if args.fresh:
        store = open_store(config)
        store.storage.rm("", recursive=True, missing_ok=True)
    address = args.address or os.environ.get("RAY_ADDRESS")
    started = time.monotonic()
    if address:  # an existing cluster has its own resources: never pass num_cpus to it
        ray.init(address=address, logging_level="WARNING", runtime_env=runtime_env)
    else:  # "local": a Ray of its own, even where `ray start` left another one for ray.init() to join
        ray.init(
            address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING",
            runtime_env=runtime_env,
        )  # fmt: skip
    print(f"Ray up in {time.monotonic() - started:.1f}s ({address or 'local'})", flush=True)
    try:
        top = run_demo(config, steps=args.steps, workers=args.workers, evaluators=args.evaluators)
        kept = open_store(config).list()
    finally:
        ray.shutdown()
    print(f"\nTop checkpoints of run {config.run_name!r} by {config.metric_name} ({config.mode}):\n")
    print(format_table(top, kept))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
