"""Training blocked time of a non-blocking save of CUDA state: ray-ckpt vs DCP ``async_save`` with pinned memory.

    python -m benchmarks.gpu [--size 1GiB] [--steps 6] [--out bench_out/gpu.json]
    python -m benchmarks.gpu --dry-run          # CPU tensors, small: checks the script without a GPU

One process on one GPU holds a stack of ``nn.Linear`` layers (``--size`` of fp32 weights) and its
Adam state (3x ``--size`` in all). Each step changes the weights in place (the loop's work),
then saves three ways, in an order that rotates from step to step:

* **ray-ckpt**: ``WorkerClient.save(step, model_sd, trainer_state={"optim": ...}, blocking=False)``:
  CUDA tensors are copied into pinned host buffers (allocated at the first save, reused after) on
  a side stream; the call returns once the device-to-host copies are done;
* **DCP, sync staging**: ``dcp.async_save(..., async_stager=DefaultStager(StagingOptions(
  use_pinned_memory=True, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=True)))``
  with one stager for the whole run (its pinned buffers are cached across steps); returns once staged;
* **DCP, async staging** (CUDA only): the same with ``use_async_staging=True``: ``async_save``
  returns at once and the loop must wait for ``staging_completion`` before it changes the
  weights again: the blocked time is until staging completed (both figures are recorded).

Every save is waited for (written to the local disk) before the next step, so no save's
background writing overlaps another's blocked time. Blocked seconds of step 1 (buffers
allocated) are reported apart; the headline is the median of the later steps. Goal: ray-ckpt's
blocked time <= the best DCP variant's. Writes ``bench_out/gpu.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

import torch

from benchmarks.measure import write_report

logger = logging.getLogger("benchmarks.gpu")

NAMESPACE = "ray_ckpt_bench_gpu"
LAYERS = 16
NO_CUDA = (
    "benchmarks.gpu: no CUDA device (torch.cuda.is_available() is False, torch {version}): this benchmark "
    "measures device-to-host staging and needs a GPU; run it on a GPU machine, or pass --dry-run to "
    "exercise it on CPU tensors"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--size", default=None, help="model fp32 bytes (default 1GiB; 16MiB with --dry-run)")
    p.add_argument("--steps", type=int, default=None, help="training steps, one save of each kind per step (6)")
    p.add_argument("--write-mode", choices=("direct", "gather"), default="direct", help="ray-ckpt write mode")
    p.add_argument("--dry-run", action="store_true", help="CPU tensors, small sizes: the logic without a GPU")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--out", default="bench_out/gpu.json", help="JSON output path")
    args = p.parse_args(argv)
    args.size = args.size or ("16MiB" if args.dry_run else "1GiB")
    args.steps = args.steps or (3 if args.dry_run else 6)
    return args


def build_state(size: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A Linear stack of ``size`` fp32 bytes on ``device`` with Adam state from one step (random values)."""
    hidden = max(64, int(math.sqrt(size / 4 / LAYERS)) // 64 * 64)
    model = torch.nn.Sequential(*(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(LAYERS))).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    optim.step()
    optim.zero_grad(set_to_none=True)
    return model, optim


def state_bytes(model: torch.nn.Module, optim: torch.optim.Optimizer) -> int:
    """Bytes of the model's parameters and of every optimizer state tensor."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for entry in optim.state.values():
        total += sum(v.numel() * v.element_size() for v in entry.values() if isinstance(v, torch.Tensor))
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Sides:
    """The three savers of one run; each ``save_*`` returns (blocked seconds, returned seconds, total seconds)."""

    def __init__(self, args: argparse.Namespace, workdir: str, device: torch.device) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        from ray_ckpt import CheckpointConfig, CheckpointStore, start_checkpointer
        from ray_ckpt.distributed.worker import WorkerClient

        self.dcp = dcp
        self.workdir = workdir
        cuda = device.type == "cuda"
        run = f"bench-gpu-{uuid.uuid4().hex[:8]}"
        config = CheckpointConfig(
            storage_uri=os.path.join(workdir, "ray_runs"), run_name=run, write_mode=args.write_mode, save_timeout_s=600
        )
        self.handle = start_checkpointer(config, namespace=NAMESPACE)
        self.store = CheckpointStore(config=config)
        self.client = WorkerClient(run, 0, 1, namespace=NAMESPACE)
        self.stagers = {
            "dcp_sync_staging": DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=cuda
                )
            )
        }
        if cuda:  # DCP's background staging needs CUDA
            self.stagers["dcp_async_staging"] = DefaultStager(
                StagingOptions(
                    use_pinned_memory=True, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=True
                )
            )

    @property
    def kinds(self) -> list[str]:
        return ["ray_ckpt", *self.stagers]

    def save(self, kind: str, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, float]:
        """One non-blocking save of ``kind``; waits for it to be written; old checkpoints removed untimed."""
        if kind == "ray_ckpt":
            figures = self._ours(step, model, optim)
            for info in self.store.list()[:-1]:
                self.store.delete(info.step)
            self.store.reload()
        else:
            figures = self._dcp(kind, step, model, optim)
            shutil.rmtree(os.path.join(self.workdir, kind, str(step - 1)), ignore_errors=True)
        return figures

    def _ours(self, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, float]:
        started = time.perf_counter()
        future = self.client.save(step, model.state_dict(), trainer_state={"optim": optim.state_dict()})
        returned = time.perf_counter() - started
        future.result(600)
        return {"blocked_s": returned, "returned_s": returned, "total_s": time.perf_counter() - started}

    def _dcp(self, kind: str, step: int, model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, float]:
        path = os.path.join(self.workdir, kind, str(step))
        state = {"model": model.state_dict(), "optim": optim.state_dict()}
        started = time.perf_counter()
        response = self.dcp.async_save(state, checkpoint_id=path, async_stager=self.stagers[kind], no_dist=True)
        returned = time.perf_counter() - started
        if hasattr(response, "staging_completion"):  # async staging: the loop waits before its next update
            response.staging_completion.result()
            upload = response.upload_completion
        else:
            upload = response
        blocked = time.perf_counter() - started
        upload.result()
        return {"blocked_s": blocked, "returned_s": returned, "total_s": time.perf_counter() - started}

    def close(self) -> None:
        for stager in self.stagers.values():
            stager.close()
        self.handle.shutdown()


def check_saved(sides: Sides, model: torch.nn.Module) -> bool:
    """The latest ray-ckpt step holds the model's current weights (untimed; a benchmark that saves garbage is none)."""
    sides.store.reload()
    loaded = sides.store.load(sides.store.list()[-1].step)
    return all(torch.equal(loaded[k], v.detach().cpu()) for k, v in model.state_dict().items())


def measure(args: argparse.Namespace, device: torch.device, workdir: str) -> dict[str, Any]:
    """The steps: train (in place), then each side's non-blocking save in a rotating order."""
    from ray_ckpt.core.config import parse_size

    size = int(parse_size(args.size, field_name="--size"))
    model, optim = build_state(size, device)
    nbytes = state_bytes(model, optim)
    sides = Sides(args, workdir, device)
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in sides.kinds}
    try:
        for step in range(1, args.steps + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.999)  # the loop's work: the weights change in place every step
            _sync(device)
            shift = (step - 1) % len(sides.kinds)
            for kind in sides.kinds[shift:] + sides.kinds[:shift]:
                figures = sides.save(kind, step, model, optim)
                runs[kind].append(figures)
                logger.info(
                    "step %d %s: blocked %.4f s, written %.2f s", step, kind, figures["blocked_s"], figures["total_s"]
                )
        correct = check_saved(sides, model)
    finally:
        sides.close()
    return {"runs": runs, "state_bytes": nbytes, "saved_correctly": correct}


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per side: first step's blocked seconds and the medians of the later steps."""
    out = {}
    for kind, steps in runs.items():
        later = steps[1:] or steps
        out[kind] = {
            "first_blocked_s": steps[0]["blocked_s"],
            "blocked_median_s": statistics.median(s["blocked_s"] for s in later),
            "returned_median_s": statistics.median(s["returned_s"] for s in later),
            "total_median_s": statistics.median(s["total_s"] for s in later),
        }
    return out


def evaluate(summary: dict[str, dict[str, float]]) -> dict[str, Any]:
    """ray-ckpt's blocked time against the best DCP variant's (goal: <= 1.0x)."""
    dcp = {k: v["blocked_median_s"] for k, v in summary.items() if k != "ray_ckpt"}
    best = min(dcp, key=dcp.__getitem__)
    ratio = summary["ray_ckpt"]["blocked_median_s"] / dcp[best]
    return {"best_dcp": best, "ratio": ratio, "goal": "<= 1.0x", "status": "pass" if ratio <= 1.0 else "short"}


def markdown(doc: dict[str, Any]) -> str:
    """One table: each side's blocked time (first step, later steps) and the write time."""
    meta, summary, verdict = doc["meta"], doc["summary"], doc["verdict"]
    lines = [
        f"**{meta['device_name']}: {meta['state_bytes'] / 2**30:.2f} GiB of model + Adam state, {meta['steps']} steps"
        f"{' (DRY RUN on CPU tensors: not a GPU measurement)' if meta['dry_run'] else ''}; torch {meta['torch']}**",
        "",
        "| saver | blocked, step 1 (allocates) | blocked, later steps (median) | returned (median) "
        "| written (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, s in summary.items():
        lines.append(
            f"| {kind} | {s['first_blocked_s'] * 1e3:.1f} ms | {s['blocked_median_s'] * 1e3:.1f} ms | "
            f"{s['returned_median_s'] * 1e3:.1f} ms | {s['total_median_s']:.2f} s |"
        )
    lines += [
        "",
        f"ray-ckpt blocked / best DCP ({verdict['best_dcp']}): {verdict['ratio']:.2f}x (goal {verdict['goal']}): "
        f"{verdict['status']}; latest ray-ckpt step equals the weights: {doc['saved_correctly']}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark in a private local Ray; the result document."""
    import ray

    from ray_ckpt.core.config import parse_size

    device = torch.device("cpu" if args.dry_run else "cuda")
    workdir = args.workdir or tempfile.mkdtemp(prefix="ray-ckpt-gpu-bench-")
    os.makedirs(workdir, exist_ok=True)
    size = int(parse_size(args.size, field_name="--size"))
    started = time.time()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            namespace=NAMESPACE,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
            object_store_memory=max(512 << 20, int(2.2 * 3 * size)),
            runtime_env={"env_vars": {"PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}},
        )
    try:
        result = measure(args, device, workdir)
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(result["runs"])
    return {
        "meta": {
            "argv": sys.argv[1:],
            "dry_run": args.dry_run,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "size_human": args.size,
            "state_bytes": result["state_bytes"],
            "steps": args.steps,
            "write_mode": args.write_mode,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "seconds": time.time() - started,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "runs": result["runs"],
        "summary": summary,
        "verdict": evaluate(summary),
        "saved_correctly": result["saved_correctly"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA.format(version=torch.__version__), file=sys.stderr)
        return 2
    doc = run(args)
    write_report(doc, args.out, markdown)
    return 0 if doc["saved_correctly"] else 1


if __name__ == "__main__":
    sys.exit(main())
