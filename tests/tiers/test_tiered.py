"""Tiered saves: local commit first, background upload to a remote prefix, retries, retention."""

from __future__ import annotations

import inspect
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import ray_ckpt.core.store as store_module
from ray_ckpt import CheckpointConfig, CheckpointStore, RunStore, open_store
from ray_ckpt.core.errors import CheckpointNotFoundError, CorruptCheckpointError
from ray_ckpt.core.layout import MARKER_FILE, parse_step_dir, step_dir
from ray_ckpt.core.runstore import RUN_STORE_METHODS
from ray_ckpt.tiers.tiered import UPLOADED_FILE, TieredCheckpointStore, UploadError, tiers_of


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 4), value), "b": torch.arange(3, dtype=torch.float32) + value}


def test_plain_and_tiered_stores_have_one_interface(tmp_path: Path) -> None:
    """Every RunStore method has the same signature on both classes, compatible with the protocol's."""
    assert len(RUN_STORE_METHODS) >= 27
    for name in RUN_STORE_METHODS:
        plain = inspect.signature(getattr(CheckpointStore, name))
        assert inspect.signature(getattr(TieredCheckpointStore, name)) == plain, name
        wanted = inspect.signature(getattr(RunStore, name)).parameters
        assert [p for p in plain.parameters if p in wanted] == list(wanted), name  # same names, same order
        for param in wanted.values():
            have = plain.parameters[param.name]
            assert have.kind == param.kind, (name, param.name)
            if param.default is not inspect.Parameter.empty:
                assert have.default == param.default, (name, param.name)
        for extra in (p for p in plain.parameters.values() if p.name not in wanted):  # options of one class
            assert extra.kind == inspect.Parameter.KEYWORD_ONLY and extra.default is not inspect.Parameter.empty
    local = CheckpointConfig(storage_uri=str(tmp_path / "l"), run_name="r", keep_last_n=1)
    tiered = local.replace(remote_uri=f"file://{tmp_path / 'remote'}")
    for store in (
        CheckpointStore(config=local),
        open_store(tiered.replace(run_name="r2")),
        TieredCheckpointStore(tiered.replace(run_name="r3")),
    ):
        assert isinstance(store, RunStore)
        store.save(1, state(1.0))
        assert store.apply_retention() == []  # a list of steps, tiered or not
        store.close()


def test_both_stores_answer_the_upload_questions(tmp_path: Path) -> None:
    """durable_uri / wait_for_uploads / not_uploaded_steps: trivially on a plain store, by the uploader
    on a tiered one, so a caller (Metta's manager) needs not ask which kind it holds."""
    cfg = CheckpointConfig(storage_uri=str(tmp_path / "l"), run_name="r")
    plain = open_store(cfg)
    info = plain.save(1, state(1.0))
    assert plain.durable_uri(1) == plain.durable_uri(1, wait=True) == info.uri == plain.step_uri(1)
    assert plain.wait_for_uploads() == {} and plain.not_uploaded_steps() == set()
    with pytest.raises(CheckpointNotFoundError):
        plain.durable_uri(2)
    assert tiers_of(plain) == [plain]
    plain.close()

    tiered = open_store(cfg.replace(run_name="t", remote_uri=f"file://{tmp_path / 'remote'}"))
    assert isinstance(tiered, TieredCheckpointStore) and tiers_of(tiered) == [tiered.local, tiered.remote]
    assert tiered.remote is not None
    gate = threading.Event()
    copy_step = tiered.remote.copy_step

    def held_copy(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(30)
        return copy_step(*args, **kwargs)

    tiered.remote.copy_step = held_copy  # type: ignore[method-assign]
    local_uri = tiered.save(1, state(1.0)).uri
    assert tiered.not_uploaded_steps() == {1}
    assert tiered.durable_uri(1) == local_uri == tiered.step_uri(1)  # not uploaded yet: the local copy
    gate.set()
    assert tiered.durable_uri(1, wait=True) == tiered.remote.step_uri(1)
    assert tiered.durable_uri(1) == tiered.remote.step_uri(1)
    assert tiered.wait_for_uploads(30) == {1: tiered.remote.step_uri(1)} and tiered.not_uploaded_steps() == set()
    tiered.close()


def test_a_plain_store_with_remote_uri_uploads_retains_both_tiers_and_resumes(tmp_path: Path) -> None:
    cfg = CheckpointConfig(
        storage_uri=str(tmp_path / "local"), remote_uri=f"file://{tmp_path / 'remote'}", run_name="one", keep_last_n=1
    )
    store = open_store(cfg)
    assert store.uploader is not None
    store.save(1, state(1.0))
    store.save(2, state(2.0))
    assert sorted(store.uploader.wait_for_uploads(30)) == [1, 2]
    assert [(i.step, i.durability) for i in store.list()] == [(2, ["local", "remote"])]
    remote = CheckpointStore(f"file://{tmp_path / 'remote'}", run_name="one")
    assert [i.step for i in remote.list()] == [2]
    store.close()

    # A step committed by a writer without the remote tier (as if it died before uploading it)
    CheckpointStore(config=cfg.replace(remote_uri=None)).save(3, state(3.0))
    reopened = open_store(cfg)
    assert reopened.uploader.not_uploaded_steps() == {3}
    assert reopened.retention_plan() == ([3], [])
    reopened.save(5, state(5.0))  # the writer start queues step 3 again, then step 5
    assert sorted(reopened.uploader.wait_for_uploads(30)) == [3, 5]
    assert [(i.step, i.durability) for i in reopened.list()] == [(5, ["local", "remote"])]
    remote.reload()
    assert [i.step for i in remote.list()] == [5]
    torch.testing.assert_close(remote.load(5)["w"], state(5.0)["w"])
    reopened.close()


def test_a_damaged_local_copy_is_never_uploaded(tmp_path: Path) -> None:
    cfg = CheckpointConfig(
        storage_uri=str(tmp_path / "local"), remote_uri=f"file://{tmp_path / 'remote'}", run_name="bad"
    )
    CheckpointStore(config=cfg.replace(remote_uri=None)).save(1, state(1.0))
    shard = tmp_path / "local" / "bad" / step_dir(1) / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = TieredCheckpointStore(cfg, upload_retries=1, upload_backoff_s=0.01)  # resumes the upload of step 1
    with pytest.raises(UploadError, match="failed after 2 attempts") as failed:
        store.upload_future(1).result(timeout=30)
    assert isinstance(failed.value.__cause__, CorruptCheckpointError)
    assert store.not_uploaded_steps() == {1} and store.uploader.failed_uploads() == [1]
    assert [i.step for i in CheckpointStore(f"file://{tmp_path / 'remote'}", run_name="bad").list()] == []
    store.close()


def test_config_says_whether_a_remote_tier_is_configured(tmp_path: Path) -> None:
    assert not CheckpointConfig(storage_uri=str(tmp_path)).remote_checkpoints_enabled
    cfg = CheckpointConfig(storage_uri=str(tmp_path), remote_uri="s3://bucket/prefix")
    assert cfg.remote_checkpoints_enabled
    store = TieredCheckpointStore(CheckpointConfig(storage_uri=str(tmp_path), run_name="solo"))
    assert not store.remote_checkpoints_enabled
    store.save(1, state(1.0))
    assert [(i.step, i.durability) for i in store.list()] == [(1, ["local"])]
    with pytest.raises(RuntimeError, match="no remote tier"):
        store.upload_future(1)
    store.close()


def test_tiered_save_upload_durability_and_readers(remote: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    remote_uri, options = remote
    cfg = CheckpointConfig(
        storage_uri=str(tmp_path / "local"),
        remote_uri=remote_uri,
        run_name="tiered",
        storage_options=options,
        metric_name="loss",
        mode="min",
        keep_last_n=2,
    )
    store = TieredCheckpointStore(cfg, upload_backoff_s=0.05)
    info = store.save(1, state(1.0), metrics={"loss": 0.5}, trainer_state={"epoch": 1})
    assert info.durability == ["local"]
    uri = store.upload_future(1).result(timeout=30)
    assert uri == store.remote.step_uri(1) and uri.startswith(remote_uri.rstrip("/"))
    assert uri.endswith("/tiered/checkpoints/step_000000001")
    assert [(i.step, i.durability) for i in store.list()] == [(1, ["local", "remote"])]

    for step in (2, 3, 4):
        store.save_and_upload(step, state(float(step)), metrics={"loss": 1.0 / step})
    uploaded = store.wait_for_uploads(timeout=60)
    assert sorted(uploaded) == [1, 2, 3, 4]
    # Same retention on both tiers: the last two are kept.
    assert [(i.step, i.durability) for i in store.list()] == [(3, ["local", "remote"]), (4, ["local", "remote"])]

    # A plain reader of the remote prefix sees committed checkpoints in the same layout.
    reader = CheckpointStore(remote_uri, run_name="tiered", storage_options=options)
    assert [i.step for i in reader.list()] == [3, 4]
    assert reader.info(4).durability == (["local"] if reader.storage.is_local else ["remote"])  # its own tier
    reader.verify(4)
    torch.testing.assert_close(reader.load(4)["w"], state(4.0)["w"])

    # Drop the local copy: readers fall back to the remote one.
    store.local.delete(4)
    assert [(i.step, i.durability) for i in store.list()] == [(3, ["local", "remote"]), (4, ["remote"])]
    assert store.latest().step == 4 and store.best().step == 4
    torch.testing.assert_close(store.load("latest")["b"], state(4.0)["b"])
    assert store.store_for(4) is store.remote and store.store_for(3) is store.local
    store.verify(3)
    assert store.load_trainer_state(3) is None
    # A score for a step only the remote tier holds joins the remote copy.
    assert store.report_eval(4, {"eval/score": 2.0}).metrics["eval/score"] == 2.0
    assert CheckpointStore(remote_uri, run_name="tiered", storage_options=options).info(4).metrics["eval/score"] == 2.0
    store.delete(4)
    with pytest.raises(CheckpointNotFoundError):
        store.load(4)
    store.close()


def test_tiered_byo_checkpoint_is_uploaded(remote: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    remote_uri, options = remote
    cfg = CheckpointConfig(
        storage_uri=str(tmp_path / "local"), remote_uri=remote_uri, run_name="byo-tiered", storage_options=options
    )
    with TieredCheckpointStore(cfg) as store:
        pending = store.begin(7, training_info={"step": 7})
        (pending.path / "policy").mkdir()
        (pending.path / "policy" / "weights.bin").write_bytes(os.urandom(1000))
        pending.commit(metrics={"reward": 1.0})
        uri = store.upload_future(7).result(timeout=30)
        assert uri.endswith("/byo-tiered/checkpoints/step_000000007")
        reader = CheckpointStore(remote_uri, run_name="byo-tiered", storage_options=options)
        assert sorted(reader.read_manifest(7).files) == ["policy/weights.bin", "training_info.json"]
        assert reader.read_manifest(7).kind == "files"
        reader.verify(7)


# -- a remote endpoint that goes away mid-upload and comes back ----------------------------------
class StoppableS3:
    """moto's S3 server on a fixed loopback port that can be stopped and restarted (state kept)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Any = None
        self.start()

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.server._server.server_close()  # stop() leaves the socket listening: close it (refused, not hung)

    @property
    def options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5},
        }


@pytest.fixture
def stoppable_s3(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("moto.server")
    import s3fs

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    s3fs.S3FileSystem.clear_instance_cache()
    endpoint = StoppableS3()
    endpoint.bucket = f"tier-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True, **endpoint.options).call_s3("create_bucket", Bucket=endpoint.bucket)
    yield endpoint
    try:
        endpoint.stop()
    except Exception:
        pass
    s3fs.S3FileSystem.clear_instance_cache()


def fail_fast(store: TieredCheckpointStore) -> None:
    """No per-call retries (ray-ckpt's or s3fs's): the uploader's own retries are under test."""
    store.remote.storage.retries = 0
    store.remote.storage.fs.retries = 1


@pytest.fixture
def closing() -> Any:
    """Stores to close at teardown without waiting (no upload thread outlives a failed test)."""
    stores: list[Any] = []
    yield stores
    for store in stores:
        for event in getattr(store, "_test_events", ()):
            event.set()
        store.close(wait=False)


def _raw_listing(endpoint: StoppableS3, prefix: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **endpoint.options)
    return sorted(p.split("/checkpoints/", 1)[1] for p in fs.find(f"{endpoint.bucket}/{prefix}"))


def test_endpoint_stopped_mid_upload_retries_and_never_shows_a_partial_checkpoint(
    stoppable_s3: StoppableS3, tmp_path: Path, closing: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = stoppable_s3
    cfg = CheckpointConfig(
        storage_uri=str(tmp_path / "local"),
        remote_uri=f"s3://{s3.bucket}/prefix",
        run_name="flaky",
        storage_options=s3.options,
        keep_last_n=2,
    )
    store = TieredCheckpointStore(cfg, upload_retries=6, upload_backoff_s=0.1, max_backoff_s=0.5)
    closing.append(store)
    fail_fast(store)
    assert store.save_and_upload(1, state(1.0)).result(timeout=30).endswith("step_000000001")

    # Attempt 1 of step 2: the endpoint goes away after the first data file reached it.
    copied: list[tuple[int, str]] = []
    tier = store.uploader  # the tiered store's uploader copies steps with the store's step copy
    original_copy = store_module.copy_checked

    def copy_then_fail(src: Any, src_path: str, dst: Any, dst_path: str, *args: Any, **kwargs: Any) -> Any:
        if dst is not store.remote.storage:
            return original_copy(src, src_path, dst, dst_path, *args, **kwargs)
        directory, name = src_path.split("/", 2)[1:]
        step = parse_step_dir(directory)
        if step == 2 and len([c for c in copied if c[0] == 2]) == 1 and not getattr(s3, "stopped", False):
            s3.stop()
            s3.stopped = True
        got = original_copy(src, src_path, dst, dst_path, *args, **kwargs)
        copied.append((step, name))
        return got

    # Attempt 2 of step 2 waits until the test has looked at the remote and lets it go.
    attempts: list[int] = []
    retry_waiting, go = threading.Event(), threading.Event()
    store._test_events = [go]  # type: ignore[attr-defined]
    original_once = tier._upload_once

    def gated_once(step: int) -> str:
        attempts.append(step)
        if step == 2 and attempts.count(2) == 2:
            retry_waiting.set()
            assert go.wait(60)
        return original_once(step)

    monkeypatch.setattr(store_module, "copy_checked", copy_then_fail)
    tier._upload_once = gated_once  # type: ignore[method-assign]
    future2 = store.save_and_upload(2, state(2.0))
    assert retry_waiting.wait(60), "the failed upload was not retried"
    assert not future2.done()
    assert [c for c in copied if c[0] == 2] == [(2, "model.safetensors")]  # stopped mid-upload

    # While the remote is down training goes on locally; retention keeps every local copy whose
    # remote copy is not committed (step 2), though keep_last_n=2 alone would drop it.
    store.save(3, state(3.0))
    store.save(4, state(4.0))
    local_steps = [i.step for i in store.local.list()]
    assert local_steps == [2, 3, 4]  # step 1 was uploaded, so its local copy could go
    assert not store.local.storage.exists(f"{step_dir(2)}/{UPLOADED_FILE}")
    # step 1's committed remote copy is still listed (the store committed it itself)
    assert [(i.step, i.durability) for i in store.list()] == [
        (1, ["remote"]),
        (2, ["local"]),
        (3, ["local"]),
        (4, ["local"]),
    ]

    # Back on the same port: a partial step-2 directory is there, but no reader can see it.
    s3.start()
    raw = _raw_listing(s3, "prefix/flaky/checkpoints")
    assert "step_000000002/model.safetensors" in raw
    assert f"step_000000002/{MARKER_FILE}" not in raw
    reader = CheckpointStore(f"s3://{s3.bucket}/prefix", run_name="flaky", storage_options=s3.options)
    assert [i.step for i in reader.list()] == [1]

    go.set()
    assert future2.result(timeout=60).endswith("step_000000002")
    assert sorted(store.wait_for_uploads(timeout=60)) == [1, 2, 3, 4]
    assert attempts.count(2) == 2
    # Same retention on the remote; local copies of uploaded steps may now go.
    reader.reload()  # a reader of another process's run reads its index again
    assert [i.step for i in reader.list()] == [3, 4]
    assert [(i.step, i.durability) for i in store.list()] == [(3, ["local", "remote"]), (4, ["local", "remote"])]
    reader.verify(3)
    torch.testing.assert_close(reader.load(3)["w"], state(3.0)["w"])
    raw = _raw_listing(s3, "prefix/flaky/checkpoints")
    assert {r.split("/")[0] for r in raw} == {"step_000000003", "step_000000004"}  # no partial leftovers
    store.close()


def test_upload_that_keeps_failing_removes_nothing_local_and_resumes_later(
    stoppable_s3: StoppableS3, tmp_path: Path, closing: list[Any]
) -> None:
    s3 = stoppable_s3
    cfg = CheckpointConfig(
        storage_uri=str(tmp_path / "local"),
        remote_uri=f"s3://{s3.bucket}/p",
        run_name="down",
        storage_options=s3.options,
        keep_last_n=1,
    )
    store = TieredCheckpointStore(cfg, upload_retries=1, upload_backoff_s=0.05)
    closing.append(store)
    fail_fast(store)
    s3.stop()
    store.save(1, state(1.0))
    store.save(2, state(2.0))
    with pytest.raises(UploadError, match="upload"):
        store.upload_future(1).result(timeout=60)
    with pytest.raises(UploadError, match=r"steps \[1, 2\]"):
        store.wait_for_uploads(timeout=60)
    assert [i.step for i in store.local.list()] == [1, 2]  # keep_last_n=1, yet nothing un-uploaded is dropped
    assert store.not_uploaded_steps() == {1, 2}
    store.close()

    s3.start()
    raw = _raw_listing(s3, "p")
    assert not [r for r in raw if r.endswith(MARKER_FILE)]
    # A new process resumes the uploads of every local step without a committed remote copy.
    resumed = TieredCheckpointStore(cfg, upload_backoff_s=0.05)
    closing.append(resumed)
    assert sorted(resumed.wait_for_uploads(timeout=60)) == [1, 2]
    assert [(i.step, i.durability) for i in resumed.list()] == [(2, ["local", "remote"])]
    assert resumed.not_uploaded_steps() == set()
    resumed.close()
