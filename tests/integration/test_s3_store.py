"""The store on S3: moto's real HTTP server on loopback (no mocks), reached through s3fs."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from ray_ckpt import CheckpointNotFoundError, CheckpointStore, CorruptCheckpointError
from ray_ckpt.core.storage.storage import Storage
from tests.core.test_format import assert_same

MARKER = "checkpoint.json"


def state(seed: int, n: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(8, 8, generator=g) for i in range(n)}


def make_store(bucket: tuple[str, dict[str, Any]], run_name: str = "run", **options: Any) -> CheckpointStore:
    uri, storage_options = bucket
    options.setdefault("max_shard_size", 600)
    storage_options = {**storage_options, **options.pop("extra_storage_options", {})}
    return CheckpointStore(f"{uri}/prefix", run_name=run_name, storage_options=storage_options, **options)


def key(bucket: tuple[str, dict[str, Any]], path: str, run_name: str = "run") -> str:
    return f"{bucket[0].removeprefix('s3://')}/prefix/{run_name}/{path}"


def steps_of(records: list) -> list[int]:
    return [r.step for r in records]


def step_objects(fs: Any, bucket: tuple[str, dict[str, Any]], step: int) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(key(bucket, f"checkpoints/step_{step:09d}")))
    except FileNotFoundError:
        return []


def test_storage_basics_on_s3(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    storage = Storage(f"{s3_bucket[0]}/basics", s3_bucket[1], backoff_s=0.01)
    assert not storage.is_local and storage.local_path() is None
    storage.write_bytes("a/x.bin", b"123")
    storage.write_atomic("a/y.json", b"{}")
    storage.write_stream("b/z.bin", lambda f: f.write(b"stream"))
    assert storage.list_names("a") == ["x.bin", "y.json"]
    assert storage.list_names("") == ["a", "b"]
    assert storage.list_names("missing") == []
    assert storage.glob("*/*.bin") == ["a/x.bin", "b/z.bin"]
    assert storage.read_bytes("b/z.bin") == b"stream" and storage.size("a/x.bin") == 3
    with storage.open_read("b/z.bin") as f:
        f.seek(2)
        assert f.read(2) == b"re"
    storage.move("a/x.bin", "c/x.bin")
    assert storage.read_bytes("c/x.bin") == b"123" and not storage.exists("a/x.bin")
    storage.rm("b", recursive=True)
    assert storage.list_names("b") == [] and not storage.exists("b/z.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("nope")
    assert storage.url("c/x.bin") == f"{s3_bucket[0]}/basics/c/x.bin"


def test_save_list_load_on_s3(s3_bucket: tuple[str, dict[str, Any]], s3fs_client: Any) -> None:
    store = make_store(s3_bucket, metric_name="loss")
    trainer_state = {"opt": {"m": torch.ones(3), "lr": 0.1}, "epoch": 2, "rng": torch.get_rng_state()}
    for step, loss in ((1, 0.5), (2, 0.2), (3, 0.9)):
        info = store.save(step, state(step), metrics={"loss": loss}, trainer_state=trainer_state)
        assert info.uri == f"{s3_bucket[0]}/prefix/run/checkpoints/step_{step:09d}"
        assert info.durability == ["remote"]
    objects = step_objects(s3fs_client, s3_bucket, 2)
    shards = [o for o in objects if o.startswith("model-")]
    assert len(shards) == 3  # 5 x 256-byte tensors, 600-byte shards
    assert {MARKER, "model.safetensors.index.json", "trainer_state"} <= set(objects)  # trainer files in trainer_state/

    fresh = make_store(s3_bucket, metric_name="loss")
    assert steps_of(fresh.list()) == [1, 2, 3]
    assert fresh.latest().step == 3
    assert fresh.best().step == 2
    assert steps_of(fresh.top_k(2)) == [2, 1]
    assert_same(state(2), fresh.load("best"))
    assert_same(state(3), fresh.load())
    part = fresh.load(1, keys=["layer3.weight"])
    assert torch.equal(part["layer3.weight"], state(1)["layer3.weight"])
    assert_same(trainer_state, fresh.load_trainer_state(2))
    assert fresh.verify(2).step == 2
    assert fresh.info(2).metrics == {"loss": 0.2}


def test_index_parquet_on_s3(s3_bucket: tuple[str, dict[str, Any]], s3fs_client: Any) -> None:
    store = make_store(s3_bucket, metric_name="loss")
    for step in (1, 2):
        store.save(step, state(step), metrics={"loss": 1.0 / step})
    assert steps_of(make_store(s3_bucket, metric_name="loss").list()) == [1, 2]  # from the change log
    store.run_index.compact()
    path = key(s3_bucket, "index.parquet")
    with s3fs_client.open(path, "rb") as f:
        assert pq.read_table(f).column("step").to_pylist() == [1, 2]
    s3fs_client.rm(path)
    fresh = make_store(s3_bucket, metric_name="loss")
    assert steps_of(fresh.list()) == [1, 2]  # from the markers
    fresh.rebuild_index()
    s3fs_client.invalidate_cache()
    with s3fs_client.open(path, "rb") as f:
        assert pq.read_table(f).column("step").to_pylist() == [1, 2]


def test_retention_on_s3(s3_bucket: tuple[str, dict[str, Any]], s3fs_client: Any) -> None:
    store = make_store(
        s3_bucket,
        metric_name="loss",
        keep_top_k=1,
        keep_last_n=1,
        keep_period=4,
        keep_checkpoints_without_metrics=False,
    )
    losses = [0.5, 0.1, 0.4, 0.6, float("nan"), 0.3]
    for step, loss in enumerate(losses, start=1):
        store.save(step, state(step, n=2), metrics={"loss": loss})
    expected = [2, 4, 6]
    assert steps_of(store.list()) == expected
    s3fs_client.invalidate_cache()
    on_s3 = sorted(p.rsplit("/", 1)[-1] for p in s3fs_client.ls(key(s3_bucket, "checkpoints")))
    assert on_s3 == [f"step_{s:09d}" for s in expected]
    lease = store.acquire_lease(2, ttl_s=600)
    store.config = store.config.replace(keep_top_k=0, keep_period=None)
    assert store.apply_retention() == [4]
    store.release_lease(2, lease)
    assert store.apply_retention() == [2]
    assert steps_of(make_store(s3_bucket).list()) == [6]


def _flip(fs: Any, path: str, offset: int = -1) -> None:
    data = bytearray(fs.cat_file(path))
    data[offset] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def test_verify_catches_corruption_on_s3(s3_bucket: tuple[str, dict[str, Any]], s3fs_client: Any) -> None:
    store = make_store(s3_bucket)
    store.save(1, state(1))
    store.save(2, state(2))
    shard = "model-00002-of-00003.safetensors"
    _flip(s3fs_client, key(s3_bucket, f"checkpoints/step_000000001/{shard}"))
    with pytest.raises(CorruptCheckpointError, match=f"step_000000001/{shard}") as excinfo:
        store.verify(1)
    assert excinfo.value.path.endswith(shard)
    with pytest.raises(CorruptCheckpointError, match=f"{shard}: checksum mismatch"):
        store.load(1)
    store.verify(2)  # the other checkpoint is untouched

    truncated = key(s3_bucket, "checkpoints/step_000000002/model-00001-of-00003.safetensors")
    s3fs_client.pipe_file(truncated, s3fs_client.cat_file(truncated)[:-7])
    with pytest.raises(CorruptCheckpointError, match="model-00001-of-00003.safetensors"):
        store.verify(2)
    with pytest.raises(CorruptCheckpointError, match="model-00001-of-00003.safetensors"):
        store.load(2, verify=False)


def test_missing_shard_on_s3(s3_bucket: tuple[str, dict[str, Any]], s3fs_client: Any) -> None:
    store = make_store(s3_bucket)
    store.save(1, state(1))
    s3fs_client.rm(key(s3_bucket, "checkpoints/step_000000001/model-00003-of-00003.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="model-00003-of-00003.safetensors: missing"):
        store.verify(1)
    with pytest.raises(CorruptCheckpointError, match="model-00003-of-00003.safetensors"):
        store.load(1)


def test_uncommitted_step_invisible_on_s3(s3_bucket: tuple[str, dict[str, Any]], s3fs_client: Any) -> None:
    store = make_store(s3_bucket)
    store.save(1, state(1))
    src = key(s3_bucket, "checkpoints/step_000000001")
    dst = key(s3_bucket, "checkpoints/step_000000002")
    for name in step_objects(s3fs_client, s3_bucket, 1):
        if name != MARKER:
            s3fs_client.copy(f"{src}/{name}", f"{dst}/{name}")
    fresh = make_store(s3_bucket)
    assert steps_of(fresh.list()) == [1]
    assert fresh.latest().step == 1
    with pytest.raises(CheckpointNotFoundError):
        fresh.load(2)
    assert fresh.gc(older_than_s=3600) == []  # it may be a save in progress: too young to collect
    assert step_objects(s3fs_client, s3_bucket, 2) != []
    assert fresh.gc() == ["checkpoints/step_000000002"]
    assert step_objects(s3fs_client, s3_bucket, 2) == []
    assert steps_of(fresh.list()) == [1]
    fresh.verify(1)


def test_architecture_on_s3(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    from tests.models import TinyMLP

    store = make_store(s3_bucket, allowed_architecture_prefixes=["tests.models."])
    model = TinyMLP(3, 4, 2)
    store.write_architecture(model, {"d_in": 3, "hidden": 4, "d_out": 2})
    store.save(1, model.state_dict())
    built = make_store(s3_bucket, allowed_architecture_prefixes=["tests.models."]).instantiate()
    x = torch.randn(2, 3)
    assert torch.equal(built(x), model(x))


def test_other_writers_changes_are_seen_on_s3(s3_bucket: tuple[str, dict[str, Any]], s3fs_client: Any) -> None:
    """A long-lived reader must not trust cached listings: another process commits, overwrites
    and deletes checkpoints behind its back."""
    writer = make_store(s3_bucket, metric_name="loss")
    # its own s3fs instance, as in another process (s3fs shares instances with equal options)
    reader = make_store(
        s3_bucket, metric_name="loss", extra_storage_options={"skip_instance_cache": True}, max_staleness_s=0.0
    )  # a reader that follows the run: every query reloads (one snapshot read, the log, one listing)
    assert reader.storage.fs is not writer.storage.fs
    writer.save(1, state(1), metrics={"loss": 0.5})
    # the reader looks while step 2 is still being written (shards there, no marker yet)
    src, dst = key(s3_bucket, "checkpoints/step_000000001"), key(s3_bucket, "checkpoints/step_000000002")
    for name in step_objects(s3fs_client, s3_bucket, 1):
        if name != MARKER:
            s3fs_client.copy(f"{src}/{name}", f"{dst}/{name}")
    assert steps_of(reader.list()) == [1]
    reader.verify(1)
    s3fs_client.rm(dst, recursive=True)
    writer.save(2, state(2), metrics={"loss": 0.1})  # the commit lands
    assert steps_of(reader.list()) == [1, 2]
    assert reader.best().step == 2
    assert_same(state(2), reader.load(2))
    # another process overwrites step 2 with different (and differently sized) shards
    writer.save(2, state(3, n=7), metrics={"loss": 0.2}, overwrite=True)
    reader.verify(2)
    assert_same(state(3, n=7), reader.load(2))
    writer.delete(1)
    assert steps_of(reader.list()) == [2]
    with pytest.raises(CheckpointNotFoundError):
        reader.load(1)
