"""Storage requests per save and per query at 10 / 100 / 1,000 committed steps, local and loopback S3.

A run of N steps is built locally (and, for S3, uploaded as is to a loopback moto server); then a
writer that has opened the run saves one step, reports an eval score and answers each query. Local
figures count storage operations (each one goes through ``Storage._call``); S3 figures count the
HTTP requests a loopback proxy sees. The same counts at every N is the goal: on real S3 each request
is tens of milliseconds.

    .venv/bin/python -m benchmarks.requests             # 10, 100, 1000 steps
    .venv/bin/python -m benchmarks.requests --quick     # 10, 100
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from ray_ckpt import CheckpointStore
from ray_ckpt.core.storage.storage import Storage
from tests.reliability.faults import FaultProxy  # the suite's loopback proxy: it records every request

RUN = "requests"
QUERIES = ("latest", "best", "top_k(3)", "list", "info")


def _state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64,), float(step)), "b": torch.arange(8.0)}


def _fill(root: str, steps: int) -> None:
    store = CheckpointStore(root, run_name=RUN, metric_name="loss", mode="min")
    for step in range(1, steps + 1):
        store.save(step, _state(step), metrics={"loss": 1.0 + 1.0 / step})


def _measure(store: CheckpointStore, count: Callable[[], int], steps: int) -> dict[str, int]:
    store.save(steps + 1, _state(steps + 1), metrics={"loss": 0.5})  # opens the run: not counted
    actions: dict[str, Callable[[], Any]] = {
        "save": lambda: store.save(steps + 2, _state(steps + 2), metrics={"loss": 0.25}),
        "report_eval": lambda: store.report_eval(steps + 2, {"eval/return": 1.0}),
        "latest": store.latest,
        "best": store.best,
        "top_k(3)": lambda: store.top_k(3),
        "list": store.list,
        "info": lambda: store.info(steps),
    }
    costs = {}
    for name, action in actions.items():
        before = count()
        action()
        costs[name] = count() - before
    return costs


def _s3_options(url: str) -> dict[str, Any]:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}


def run(sizes: list[int]) -> dict[str, Any]:
    """Measure every size on both storages; returns ``{"local": {N: costs}, "s3": {N: costs}}``."""
    results: dict[str, Any] = {"local": {}, "s3": {}}
    calls = [0]
    original = Storage._call

    def counting(self: Storage, what: str, path: str, fn: Callable[[], Any]) -> Any:
        calls[0] += 1
        return original(self, what, path, fn)

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1",
    }.items():
        os.environ.setdefault(key, value)
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    moto_url = f"http://127.0.0.1:{server._server.server_address[1]}"
    proxy = FaultProxy(moto_url)
    try:
        with tempfile.TemporaryDirectory(prefix="ray-ckpt-requests-") as tmp:
            for steps in sizes:
                local = os.path.join(tmp, f"n{steps}")
                started = time.perf_counter()
                _fill(local, steps)
                bucket = f"bench-{steps}-{int(time.time())}"
                upload = Storage(f"s3://{bucket}", {**_s3_options(moto_url), "config_kwargs": {"connect_timeout": 30}})
                import boto3  # s3fs.mkdir sends a LocationConstraint that us-east-1 refuses

                boto3.client(
                    "s3",
                    endpoint_url=moto_url,
                    region_name="us-east-1",
                    aws_access_key_id="testing",
                    aws_secret_access_key="testing",
                ).create_bucket(Bucket=bucket)
                upload.fs.put(os.path.join(local, RUN), upload.full_path(RUN), recursive=True, batch_size=8)
                store = CheckpointStore(
                    f"s3://{bucket}",
                    run_name=RUN,
                    storage_options=_s3_options(proxy.url),
                    metric_name="loss",
                    mode="min",
                )
                results["s3"][steps] = _measure(store, lambda: len(proxy.requests()), steps)
                Storage._call = counting  # type: ignore[method-assign]
                try:
                    store = CheckpointStore(local, run_name=RUN, metric_name="loss", mode="min")
                    results["local"][steps] = _measure(store, lambda: calls[0], steps)
                finally:
                    Storage._call = original  # type: ignore[method-assign]
                print(f"  {steps} steps measured in {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        proxy.close()
        server.stop()
    return results


def report(results: dict[str, Any], sizes: list[int]) -> str:
    """Markdown tables: one row per operation, one column per size."""
    lines = []
    for storage, unit in (("local", "storage operations"), ("s3", "HTTP requests")):
        lines += [
            f"**{storage}: {unit}**",
            "",
            "| operation | " + " | ".join(f"{n} steps" for n in sizes) + " |",
            "|---|" + "---:|" * len(sizes),
        ]
        for op in ("save", "report_eval", *QUERIES):
            lines.append(f"| {op} | " + " | ".join(str(results[storage][n][op]) for n in sizes) + " |")
        same = all(results[storage][n] == results[storage][sizes[0]] for n in sizes)
        lines += ["", f"constant in the number of steps: {'yes' if same else 'NO'}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.requests", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--quick", action="store_true", help="10 and 100 steps")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    sizes = [10, 100] if args.quick else args.sizes
    results = run(sizes)
    print(report(results, sizes))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
