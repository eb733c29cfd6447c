"""Storage requests are a cost: a save and each query cost the same at 10 and at 400 committed steps.

Locally every storage operation is counted (each goes through ``Storage._call``); on S3 every
HTTP request is counted by a loopback proxy in front of moto's server. A writer that has already
opened the run (its first save reads the index once, and collects leftovers) saves one step,
reports a score and answers queries; the counts must not depend on how many steps the run holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointStore
from ray_ckpt.core.storage.storage import Storage
from tests.reliability.faults import FaultProxy, MotoServer, s3_options

RUN = "counted"
SIZES = (10, 400)


def _state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((8,), float(step)), "b": torch.arange(3.0)}


def _fill(uri: str, options: dict[str, Any], steps: int) -> None:
    store = CheckpointStore(uri, run_name=RUN, storage_options=options, metric_name="loss", mode="min")
    for step in range(1, steps + 1):
        store.save(step, _state(step), metrics={"loss": 1.0 / step})


def _measure(make: Callable[[], CheckpointStore], count: Callable[[], int], steps: int) -> dict[str, int]:
    """Storage requests of one save, one eval score and each query, by a writer that opened the run."""
    store = make()
    store.save(steps + 1, _state(steps + 1), metrics={"loss": 0.5})  # opens the run: not counted
    costs: dict[str, int] = {}
    actions: dict[str, Callable[[], Any]] = {
        "save": lambda: store.save(steps + 2, _state(steps + 2), metrics={"loss": 1e-6}),
        "report_eval": lambda: store.report_eval(steps + 2, {"eval/return": 3.0}),
        "latest": store.latest,
        "best": store.best,
        "top_k(3)": lambda: store.top_k(3),
        "list": store.list,
        "info": lambda: store.info(steps),
    }
    for name, action in actions.items():
        before = count()
        action()
        costs[name] = count() - before

    assert store.latest().step == steps + 2 and store.best().step == steps + 2
    return costs


def _distinct(proxy: FaultProxy) -> int:
    """Requests so far, a retry of the same request (a loaded loopback server's timeout) counted once."""
    records = proxy.requests()
    return sum(
        1 for i, r in enumerate(records) if i == 0 or (r.method, r.path) != (records[i - 1].method, records[i - 1].path)
    )


@pytest.fixture
def counted_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []
    original = Storage._call

    def counting(self: Storage, what: str, path: str, fn: Callable[[], Any]) -> Any:
        calls.append(f"{what} {path}")
        return original(self, what, path, fn)

    monkeypatch.setattr(Storage, "_call", counting)
    yield calls


def test_local_storage_operations_do_not_grow_with_the_run(tmp_path: Path, counted_calls: list[str]) -> None:
    costs = {}
    for steps in SIZES:
        root = str(tmp_path / f"n{steps}")
        _fill(root, {}, steps)
        costs[steps] = _measure(
            lambda root=root: CheckpointStore(root, run_name=RUN, metric_name="loss", mode="min"),
            lambda: len(counted_calls),
            steps,
        )
    print("local storage operations", costs)
    assert costs[SIZES[0]] == costs[SIZES[1]], costs
    assert all(costs[SIZES[0]][q] == 0 for q in ("latest", "best", "top_k(3)", "list", "info")), costs


@pytest.mark.slow
def test_s3_requests_do_not_grow_with_the_run(moto_server: MotoServer, tmp_path: Path) -> None:
    proxy = FaultProxy(moto_server.url)
    try:
        costs = {}
        for steps in SIZES:
            bucket = moto_server.make_bucket()
            uri = f"s3://{bucket}"
            local = tmp_path / f"n{steps}"
            _fill(str(local), {}, steps)  # built locally, uploaded as is: not counted
            upload = Storage(uri, {**s3_options(moto_server.url), "config_kwargs": {"connect_timeout": 30}})
            upload.fs.put(str(local / RUN), upload.full_path(RUN), recursive=True, batch_size=8)
            options = s3_options(proxy.url)
            costs[steps] = _measure(
                lambda uri=uri, options=options: CheckpointStore(
                    uri, run_name=RUN, storage_options=options, metric_name="loss", mode="min"
                ),
                lambda: _distinct(proxy),
                steps,
            )
        assert costs[SIZES[0]] == costs[SIZES[1]], costs
        assert all(costs[SIZES[0]][q] == 0 for q in ("latest", "best", "top_k(3)", "list", "info")), costs
    finally:
        proxy.close()
