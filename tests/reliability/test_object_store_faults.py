"""Object-store faults on a loopback S3 (moto): the endpoint stopped mid-upload, and 5xx /
throttling answers injected by a loopback proxy in front of it. Bounded retries with backoff,
then a clear StorageError naming the file; never a partial checkpoint visible; earlier ones intact.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ray_ckpt import CheckpointStore, StorageError
from tests.reliability.faults import (
    SHARD_LIMIT,
    FaultProxy,
    MotoServer,
    assert_state,
    s3_options,
    tensors_for,
)

RUN = "flaky"
RETRIES = 4
BACKOFF_S = 0.05


def _store(uri: str, options: dict[str, Any], **extra: Any) -> CheckpointStore:
    """A store whose only retries are ray-ckpt's own (s3fs and botocore fail at once)."""
    store = CheckpointStore(uri, run_name=RUN, storage_options=options, metric_name="loss",
                            max_shard_size=SHARD_LIMIT, **extra)
    store.storage.retries = RETRIES
    store.storage.backoff_s = BACKOFF_S
    store.storage.fs.retries = 1  # s3fs's own retry loop off: the attempts the proxy sees are ours
    return store


def _keys(server: MotoServer, bucket: str) -> list[str]:
    return [k.removeprefix(f"{RUN}/") for k in server.keys(bucket, f"{RUN}/")]


def _assert_intact(store: CheckpointStore, steps: list[int]) -> None:
    assert [i.step for i in store.list()] == steps
    for step in steps:
        store.verify(step)
        assert_state(step, store.load(step))


# ---------------------------------------------------------------------------------------------
# The endpoint goes away in the middle of a save.
# ---------------------------------------------------------------------------------------------
def test_endpoint_stopped_mid_upload(moto_server: MotoServer) -> None:
    bucket = moto_server.make_bucket()
    uri, options = f"s3://{bucket}", s3_options(moto_server.url)
    store = _store(uri, options)
    store.save(1, tensors_for(1), metrics={"loss": 1.0})

    uploaded: list[str] = []
    original = store.storage.write_stream

    def write_stream(path: str, writer: Any, **kwargs: Any) -> Any:
        result = original(path, writer, **kwargs)
        uploaded.append(path)
        if path.endswith("step_000000002/model-00001-of-00003.safetensors"):
            moto_server.stop()  # the first shard is up; the endpoint dies before the second
        return result

    store.storage.write_stream = write_stream  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(StorageError) as excinfo:
        store.save(2, tensors_for(2), metrics={"loss": 0.5})
    elapsed = time.monotonic() - started
    message = str(excinfo.value)
    # The error is the failed upload (not a later cleanup failure) and names the file.
    assert "write failed" in message and "step_000000002/model-00002-of-00003.safetensors" in message, message
    assert elapsed >= sum(BACKOFF_S * 2**k for k in range(RETRIES)) * 0.9, f"gave up after {elapsed:.2f}s: no backoff"
    assert elapsed < 60, f"retries not bounded: {elapsed:.1f}s"

    moto_server.start()
    keys = _keys(moto_server, bucket)
    assert "checkpoints/step_000000002/model-00001-of-00003.safetensors" in keys  # really mid-upload
    assert "checkpoints/step_000000002/checkpoint.json" not in keys
    reader = _store(uri, options)
    _assert_intact(reader, [1])
    # The writer's gc removes the partial step; the run goes on.
    reader.gc()
    assert not [k for k in _keys(moto_server, bucket) if "step_000000002" in k]
    store.storage.write_stream = original  # type: ignore[method-assign]
    store.save(2, tensors_for(2), metrics={"loss": 0.5})
    _assert_intact(reader, [1, 2])


# ---------------------------------------------------------------------------------------------
# Injected 5xx and throttling through a loopback proxy.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def proxied(moto_server: MotoServer) -> Iterator[tuple[FaultProxy, str, dict[str, Any]]]:
    """``(proxy, bucket uri, storage options through the proxy)``; the proxy starts fault-free."""
    bucket = moto_server.make_bucket()
    proxy = FaultProxy(moto_server.url)
    yield proxy, f"s3://{bucket}", s3_options(proxy.url)
    proxy.close()


def test_transient_throttling_is_retried_with_backoff(proxied: tuple[FaultProxy, str, dict[str, Any]]) -> None:
    proxy, uri, options = proxied
    store = _store(uri, options)
    store.save(1, tensors_for(1), metrics={"loss": 1.0})
    faults = [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable")]
    proxy.reset(lambda method, path, nth: faults[nth - 1] if method == "PUT" and nth <= len(faults) else None)
    store.save(2, tensors_for(2), metrics={"loss": 0.5})
    puts = proxy.requests("PUT", "step_000000002/model-00001-of-00003.safetensors")
    assert [(r.status, r.injected) for r in puts] == [(503, True), (500, True), (503, True), (200, False)]
    gaps = [b.at - a.at for a, b in zip(puts, puts[1:], strict=False)]
    for k, gap in enumerate(gaps):  # exponential backoff between attempts
        assert gap >= BACKOFF_S * 2**k * 0.8, f"attempt {k + 2} came {gap:.3f}s after the previous one"
    _assert_intact(_store(uri, options), [1, 2])


def test_persistent_5xx_gives_a_clear_error_after_bounded_retries(
    proxied: tuple[FaultProxy, str, dict[str, Any]],
) -> None:
    proxy, uri, options = proxied
    store = _store(uri, options)
    store.save(1, tensors_for(1), metrics={"loss": 1.0})
    target = "step_000000002/model-00002-of-00003.safetensors"
    proxy.reset(lambda method, path, nth: (500, "InternalError") if method == "PUT" and target in path else None)
    with pytest.raises(StorageError, match=target) as excinfo:
        store.save(2, tensors_for(2), metrics={"loss": 0.5})
    assert "write failed" in str(excinfo.value)
    assert len(proxy.requests("PUT", target)) == RETRIES + 1  # bounded: the first try and RETRIES more
    assert not proxy.requests("PUT", "step_000000002/checkpoint.json")  # never committed
    proxy.reset()
    reader = _store(uri, options)
    _assert_intact(reader, [1])
    assert reader.gc() == []  # the failed save removed its own partial files


def test_every_third_put_throttled_across_many_saves(proxied: tuple[FaultProxy, str, dict[str, Any]]) -> None:
    proxy, uri, options = proxied
    store = _store(uri, options, keep_last_n=2)
    rng = random.Random(6)

    def policy(method: str, path: str, nth: int) -> tuple[int, str] | None:
        if method == "PUT":
            return (503, "SlowDown") if nth % 3 == 0 else None  # every third upload is throttled
        return (503, "SlowDown") if rng.random() < 0.1 else None  # and one in ten other requests

    proxy.reset(policy)
    for step in range(1, 5):
        store.save(step, tensors_for(step), metrics={"loss": 1.0 / step})
    assert sum(r.injected for r in proxy.requests()) >= 10
    reader = _store(uri, options)
    _assert_intact(reader, [3, 4])  # reads, listings and deletes were throttled too and retried
    proxy.reset()
    assert reader.gc() == []
