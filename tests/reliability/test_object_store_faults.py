"""Object-store faults on a loopback S3 (moto): the endpoint stopped mid-upload (with the default
client settings too), and 5xx / throttling answers injected by a loopback proxy in front of it.
Bounded retries with backoff, then a clear StorageError naming the file; never a partial
checkpoint visible; earlier ones intact. Also: user storage_options override our S3 defaults.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

import ray_ckpt.core.storage.objectstore as storage_module
from ray_ckpt import CheckpointStore, StorageError
from ray_ckpt.core.storage.base import RETRY_TIMEOUT_S
from ray_ckpt.core.storage.objectstore import S3_CONFIG_DEFAULTS, S3FS_RETRIES
from ray_ckpt.core.storage.storage import Storage
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


def _store(uri: str, options: dict[str, Any], retries: int | None = RETRIES, **extra: Any) -> CheckpointStore:
    """A store whose only retries are ray-ckpt's own, ``retries`` of them (None: as many as fit in
    the deadline). botocore's are off through ``s3_options`` and s3fs's own loop is off by
    default, so the attempts the proxy sees are ours."""
    store = CheckpointStore(
        uri, run_name=RUN, storage_options=options, metric_name="loss", max_shard_size=SHARD_LIMIT, **extra
    )
    store.storage.retries = retries
    store.storage.backoff_s = BACKOFF_S
    assert store.storage.fs.retries == S3FS_RETRIES == 1
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
    reader.reload()  # a reader sees another process's commits once it reloads
    _assert_intact(reader, [1, 2])


# ---------------------------------------------------------------------------------------------
# Default client settings: one bounded deadline per operation, not three stacked retry loops.
# ---------------------------------------------------------------------------------------------
BIG = 8192  # tensors_for(step, BIG): three 1 MiB tensors, one per shard at BIG_SHARD
BIG_SHARD = (1 << 20) + 4096


def _plain_options(url: str) -> dict[str, Any]:
    """Only the endpoint and credentials: every retry and timeout setting is ray-ckpt's default."""
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}


def _stop_after_first_shard(store: CheckpointStore, server: MotoServer, step: int) -> None:
    """Make ``server`` stop once the first model shard of ``step`` is uploaded."""
    original = store.storage.write_stream

    def write_stream(path: str, writer: Any, **kwargs: Any) -> Any:
        result = original(path, writer, **kwargs)
        if f"step_{step:09d}/model-00001-of-" in path:
            server.stop()
        return result

    store.storage.write_stream = write_stream  # type: ignore[method-assign]


@pytest.mark.slow
def test_dead_endpoint_gives_storage_error_within_60s_with_default_settings(moto_server: MotoServer) -> None:
    """Measured before the deadline: 89 s for this save (s3fs x botocore x ray-ckpt retries, then
    the same again for the cleanup); with it about 32 s (two operations of ~16 s: the failed
    upload, then the removal of the partial step, which fails too)."""
    bucket = moto_server.make_bucket()
    uri, options = f"s3://{bucket}", _plain_options(moto_server.url)
    store = CheckpointStore(uri, run_name=RUN, storage_options=options, max_shard_size=BIG_SHARD)
    storage = store.storage
    assert (storage.retries, storage.retry_timeout_s, storage.fs.retries) == (None, RETRY_TIMEOUT_S, S3FS_RETRIES)
    config = storage.fs.s3.meta.config  # the botocore client s3fs built: our defaults are in it
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}, config.retries
    assert (config.connect_timeout, config.read_timeout) == (5, 15)
    store.save(1, tensors_for(1, BIG), metrics={"loss": 1.0})

    _stop_after_first_shard(store, moto_server, 2)
    started = time.monotonic()
    with pytest.raises(StorageError) as excinfo:
        store.save(2, tensors_for(2, BIG), metrics={"loss": 0.5})
    elapsed = time.monotonic() - started
    message = str(excinfo.value)
    assert "write failed" in message and "step_000000002/model-0000" in message, message
    assert "model-00001-of-" not in message  # the shard after the one that got through
    assert elapsed < 60, f"a dead endpoint took {elapsed:.1f}s to give a StorageError"

    moto_server.start()
    keys = _keys(moto_server, bucket)
    assert any("step_000000002/model-00001-of-" in k for k in keys)  # really mid-save
    assert "checkpoints/step_000000002/checkpoint.json" not in keys
    reader = CheckpointStore(uri, run_name=RUN, storage_options=options)
    assert [i.step for i in reader.list()] == [1]
    assert_state(1, reader.load(1), BIG)


def test_user_storage_options_override_the_defaults(moto_server: MotoServer) -> None:
    """The user's config_kwargs keys win (the rest of ours stay), their botocore ``retries`` is
    used as given, client_kwargs are untouched, and ``retry_timeout_s`` sets ray-ckpt's deadline:
    here one attempt everywhere, so a dead endpoint fails in about a second."""
    bucket = moto_server.make_bucket()
    client_kwargs = {"endpoint_url": moto_server.url, "region_name": "us-east-1"}
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": dict(client_kwargs),
        "config_kwargs": {"retries": {"total_max_attempts": 1}, "read_timeout": 7},
        "retry_timeout_s": 0,
    }
    store = CheckpointStore(f"s3://{bucket}", run_name=RUN, storage_options=options, max_shard_size=SHARD_LIMIT)
    fs = store.storage.fs
    assert fs.config_kwargs == {
        "retries": {"total_max_attempts": 1},
        "connect_timeout": S3_CONFIG_DEFAULTS["connect_timeout"],
        "read_timeout": 7,
    }
    assert fs.client_kwargs == client_kwargs and "retry_timeout_s" not in fs.kwargs
    config = fs.s3.meta.config
    assert config.retries["total_max_attempts"] == 1, config.retries  # theirs, not merged with our mode
    assert (config.connect_timeout, config.read_timeout) == (S3_CONFIG_DEFAULTS["connect_timeout"], 7)
    assert store.storage.retry_timeout_s == 0
    assert options["config_kwargs"] == {"retries": {"total_max_attempts": 1}, "read_timeout": 7}  # not mutated
    store.save(1, tensors_for(1), metrics={"loss": 1.0})

    _stop_after_first_shard(store, moto_server, 2)
    started = time.monotonic()
    with pytest.raises(StorageError, match="write failed") as excinfo:
        store.save(2, tensors_for(2), metrics={"loss": 0.5})
    elapsed = time.monotonic() - started
    assert "gave up after" not in str(excinfo.value)  # a single attempt
    assert elapsed < 10, f"one attempt per operation took {elapsed:.1f}s"


@pytest.mark.timeout(60)
def test_an_endpoint_that_accepts_and_never_answers_fails_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen server: the kernel accepts the connection, nothing ever answers. A read times out
    in botocore; a PUT would wait forever for botocore's "100 Continue" (aiohttp has no timeout
    there) but for ray-ckpt's bound on every request that sends a body. The bounds are shrunk
    here (a 2 s body bound, a 1 s read timeout, a 1 s retry window) to keep the test short."""
    import s3fs

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.setattr(storage_module, "S3_BODY_TIMEOUT_S", 2.0)
    s3fs.S3FileSystem.clear_instance_cache()
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(64)  # connections complete in the kernel; nobody reads them
        options = {
            **_plain_options(f"http://127.0.0.1:{frozen.getsockname()[1]}"),
            "config_kwargs": {"connect_timeout": 1, "read_timeout": 1},
            "retry_timeout_s": 1,
        }
        storage = Storage("s3://frozen/run", options)
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"write failed for s3://frozen/run/a\.bin: .*no answer within 2s"):
            storage.write_bytes("a.bin", b"x" * 10_000)
        assert time.monotonic() - started < 20
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"read failed for s3://frozen/run/a\.bin: .*[Tt]imeout"):
            storage.read_bytes("a.bin")
        assert time.monotonic() - started < 20
    s3fs.S3FileSystem.clear_instance_cache()


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
    # Production's rule, the deadline, rather than a count: one listing or glob is several
    # requests, each throttled one time in ten, and 5 failed attempts in a row are not rare.
    store = _store(uri, options, retries=None, keep_last_n=2)
    rng = random.Random(6)

    def policy(method: str, path: str, nth: int) -> tuple[int, str] | None:
        if method == "PUT":
            return (503, "SlowDown") if nth % 3 == 0 else None  # every third upload is throttled
        return (503, "SlowDown") if rng.random() < 0.1 else None  # and one in ten other requests

    proxy.reset(policy)
    for step in range(1, 5):
        store.save(step, tensors_for(step), metrics={"loss": 1.0 / step})
    assert sum(r.injected for r in proxy.requests()) >= 10
    reader = _store(uri, options, retries=None)
    _assert_intact(reader, [3, 4])  # reads, listings and deletes were throttled too and retried
    proxy.reset()
    assert reader.gc() == []
