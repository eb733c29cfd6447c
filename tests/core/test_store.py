"""CheckpointStore on local disk: commit protocol, loading, verification, retention, run index,
architectures, the "pt" format and Hugging Face compatibility."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from ray_ckpt import (
    ArchitectureNotAllowedError,
    CheckpointConfig,
    CheckpointExistsError,
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointStore,
    ConfigError,
    CorruptCheckpointError,
)
from ray_ckpt.core.format.digests import BLOCK_SIZE, CHECKSUM_ALGORITHM, digest_hex
from ray_ckpt.core.storage.storage import Storage
from tests.core.test_format import assert_same
from tests.models import TiedLM, TinyMLP

MARKER = "checkpoint.json"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------
def sdir(store: CheckpointStore, step: int) -> Path:
    return Path(store.storage.local_path(f"checkpoints/step_{step:09d}"))


def state(seed: int = 0, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(8, 8, generator=g) for i in range(n)}


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def shard_files(store: CheckpointStore, step: int) -> list[Path]:
    return sorted(p for p in sdir(store, step).iterdir() if p.name.startswith("model") and p.suffix == ".safetensors")


def steps_of(records: list[CheckpointInfo]) -> list[int]:
    return [r.step for r in records]


def on_disk_steps(store: CheckpointStore) -> list[int]:
    root = Path(store.storage.local_path("checkpoints"))
    return sorted(int(p.name.removeprefix("step_")) for p in root.iterdir()) if root.exists() else []


@pytest.fixture
def store(tmp_run: Any) -> CheckpointStore:
    return tmp_run(metric_name="loss", mode="min", max_shard_size=600)


# ---------------------------------------------------------------------------------------------
# Save and load.
# ---------------------------------------------------------------------------------------------
def test_save_load_and_layout(store: CheckpointStore) -> None:
    sd = state()
    info = store.save(10, sd, metrics={"loss": 0.5, "acc": np.float32(0.25)}, metadata={"git": "abc", "n": [1, 2]})
    assert info.step == 10
    assert info.uri == f"file://{sdir(store, 10)}"
    assert info.metrics == {"loss": 0.5, "acc": 0.25}
    assert info.world_size == 1
    assert info.total_size == 4 * 8 * 8 * 4
    assert info.metadata == {"git": "abc", "n": [1, 2]}
    assert info.created > 0

    names = sorted(p.name for p in sdir(store, 10).iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # 2 x 256 B each
    assert INDEX in names and MARKER in names
    assert info.files_size == sum((sdir(store, 10) / n).stat().st_size for n in names if n != MARKER)

    marker = json.loads((sdir(store, 10) / MARKER).read_text())
    assert marker["step"] == 10 and marker["format_version"] == 2 and marker["world_size"] == 1
    assert marker["metrics"] == {"loss": 0.5, "acc": 0.25}
    assert set(marker["files"]) == set(names) - {MARKER}
    for name, entry in marker["files"].items():
        assert entry["size"] == (sdir(store, 10) / name).stat().st_size
        if name.endswith(".safetensors"):  # tensor files: block digests per tensor, made as they were written
            assert entry["blocks"]["block_size"] == BLOCK_SIZE and len(entry["blocks"]["header"]) == 16
            assert all(len(c[0]["blocks"]) == 16 for c in entry["blocks"]["tensors"].values())  # 1 block each
        else:
            assert entry["checksum"].startswith(CHECKSUM_ALGORITHM + ":")

    index = json.loads((sdir(store, 10) / INDEX).read_text())
    assert index["metadata"]["total_size"] == info.total_size
    assert set(index["weight_map"]) == set(sd)
    for key, fname in index["weight_map"].items():
        with safe_open(str(sdir(store, 10) / fname), "pt") as f:
            assert torch.equal(f.get_tensor(key), sd[key])

    loaded = store.load(10)
    assert list(loaded) == list(sd)
    assert_same(sd, loaded)
    assert_same(sd, store.load())
    assert_same(sd, store.load("latest"))


def test_shard_count_follows_max_shard_size(tmp_run: Any) -> None:
    sd = {f"t{i}": torch.zeros(100, dtype=torch.uint8) for i in range(10)}
    one = tmp_run("one", max_shard_size="1MB").save(1, sd)
    assert one.files_size > 0
    store = tmp_run("one", max_shard_size="1MB")
    assert sorted(p.name for p in sdir(store, 1).iterdir()) == [MARKER, "model.safetensors", INDEX]
    many = tmp_run("many", max_shard_size=250)
    many.save(1, sd)
    names = [p.name for p in shard_files(many, 1)]
    assert names == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    big = tmp_run("big", max_shard_size=50)
    big.save(1, sd)
    assert len(shard_files(big, 1)) == 10  # each tensor is bigger than the limit: one shard each
    assert_same(sd, big.load(1))


def test_nested_state_and_trainer_state_roundtrip(store: CheckpointStore) -> None:
    model = TinyMLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    trainer_state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "epoch": 3,
        "best": None,
        "history": [0.5, float("nan"), float("inf")],
        "tag": "run-α",
    }
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))
    # (an OrderedDict comes back as a plain dict: the same mapping for load_state_dict)
    nested_model_state = {
        "model": dict(model.state_dict()),
        "ema": {"decay": 0.99, "shadow": [p.detach() for p in model.parameters()]},
    }

    store.save(3, nested_model_state, metrics={"loss": 1.0}, trainer_state=trainer_state)
    loaded = store.load(3)
    assert_same(nested_model_state, loaded)
    ts = store.load_trainer_state(3)
    assert_same(trainer_state, ts)

    # the loaded states restore training exactly
    model2 = TinyMLP()
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)
    opt2.load_state_dict(ts["optimizer"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    sched2.load_state_dict(ts["scheduler"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert sched2.get_last_lr() == sched.get_last_lr()
    random.setstate(ts["rng"]["python"])
    np.random.set_state(ts["rng"]["numpy"])
    torch.set_rng_state(ts["rng"]["torch"])
    assert (random.random(), np.random.rand()) == expected_draws[:2]
    assert torch.equal(torch.rand(1), expected_draws[2])


def test_trainer_state_absent(store: CheckpointStore) -> None:
    store.save(1, state())
    assert store.load_trainer_state(1) is None
    assert not (sdir(store, 1) / "trainer_state").exists()


def test_tied_weights_stored_once_and_loaded_tied(store: CheckpointStore) -> None:
    model = TiedLM()
    sd = model.state_dict()
    store.save(1, sd)
    index = json.loads((sdir(store, 1) / INDEX).read_text())
    assert "head.weight" not in index["weight_map"] and "embed.weight" in index["weight_map"]
    loaded = store.load(1)
    assert set(loaded) == set(sd)
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert torch.equal(loaded["head.weight"], model.embed.weight)
    only = store.load(1, keys=["head.weight"])
    assert list(only) == ["head.weight"]
    assert torch.equal(only["head.weight"], model.embed.weight)


def test_load_selected_keys(store: CheckpointStore) -> None:
    sd = state(n=6)
    store.save(1, sd)
    part = store.load(1, keys=["layer4.weight", "layer0.weight"])
    assert list(part) == ["layer4.weight", "layer0.weight"]
    assert torch.equal(part["layer4.weight"], sd["layer4.weight"])
    gen = store.load(1, keys=(k for k in ["layer1.weight", "layer5.weight"]))  # any iterable, e.g. a generator
    assert list(gen) == ["layer1.weight", "layer5.weight"]
    assert torch.equal(gen["layer5.weight"], sd["layer5.weight"])
    with pytest.raises(KeyError, match="nope"):
        store.load(1, keys=["nope"])


def test_selectors(store: CheckpointStore) -> None:
    for step, loss in ((1, 0.5), (2, 0.1), (3, 0.3)):
        store.save(step, state(step), metrics={"loss": loss})
    assert_same(state(2), store.load("best"))
    assert_same(state(3), store.load("latest"))
    for selector in ("step_1", "v1", "1", 1, np.int64(1)):
        assert_same(state(1), store.load(selector))
    assert store.resolve("step_000000002") == 2
    with pytest.raises(ValueError, match="selector"):
        store.load("newest")
    with pytest.raises(CheckpointNotFoundError):
        store.load(99)
    with pytest.raises(CheckpointNotFoundError):
        store.info(99)
    with pytest.raises(ValueError):
        store.load(-1)


def test_list_latest_best_top_k_info(store: CheckpointStore) -> None:
    assert store.list() == [] and store.latest() is None and store.best() is None and store.top_k(3) == []
    with pytest.raises(CheckpointNotFoundError):
        store.load("latest")
    losses = {1: 0.9, 2: 0.2, 3: float("nan"), 4: 0.2, 5: 0.5}
    for step, loss in losses.items():
        store.save(step, state(step), metrics={"loss": loss, "acc": step / 10})
    assert steps_of(store.list()) == [1, 2, 3, 4, 5]
    assert store.latest().step == 5
    assert store.best().step == 4  # tie with step 2: the newer wins
    assert steps_of(store.top_k(3)) == [4, 2, 5]
    assert steps_of(store.top_k(10)) == [4, 2, 5, 1]  # NaN never ranked
    assert steps_of(store.top_k(2, metric="acc", mode="max")) == [5, 4]
    assert store.best("acc", "max").step == 5
    info = store.info(2)
    assert info.step == 2 and info.metrics == {"loss": 0.2, "acc": 0.2}
    assert math.isnan(store.info(3).metrics["loss"])
    assert store.info().step == 5
    # another store on the same run sees the same
    again = CheckpointStore(store.config.storage_uri, run_name=store.run_name, metric_name="loss")
    assert steps_of(again.top_k(3)) == [4, 2, 5]


def test_best_without_metric(tmp_run: Any) -> None:
    store = tmp_run()
    store.save(1, state())
    assert store.best() is None
    with pytest.raises(ConfigError, match="records no ranking metric"):  # a usage error: pass a metric
        store.load("best")
    assert store.resolve("best", fallback_to_latest=True) == 1
    ranked = CheckpointStore(store.config.storage_uri, run_name=store.run_name, metric_name="loss")
    with pytest.raises(CheckpointNotFoundError, match="best"):  # ranked, but no finite score yet
        ranked.load("best")
    with pytest.raises(ValueError, match="metric"):
        store.top_k(1)


def test_save_validation_writes_nothing(store: CheckpointStore) -> None:
    with pytest.raises(ValueError, match="empty"):
        store.save(1, {})
    with pytest.raises(ValueError, match="empty"):
        store.save(1, {"config": {"lr": 0.1}})  # no tensors at all
    with pytest.raises(TypeError, match="opt.extra"):
        store.save(1, {"w": torch.ones(1), "opt": {"extra": object()}})
    with pytest.raises(TypeError, match="sched.fn"):
        store.save(1, {"w": torch.ones(1)}, trainer_state={"sched": {"fn": lambda: 0}})
    with pytest.raises(TypeError, match="loss"):
        store.save(1, {"w": torch.ones(1)}, metrics={"loss": "low"})
    with pytest.raises(ValueError, match="step"):
        store.save(-1, {"w": torch.ones(1)})
    with pytest.raises(ValueError, match="step"):
        store.save(True, {"w": torch.ones(1)})  # type: ignore[arg-type]
    assert on_disk_steps(store) == []
    assert store.list() == []


def test_unserialisable_metadata_aborts_the_save(store: CheckpointStore) -> None:
    store.save(1, state())
    with pytest.raises(TypeError, match="metadata"):
        store.save(2, state(), metadata={"obj": object()})
    assert on_disk_steps(store) == [1]
    assert steps_of(store.list()) == [1]


def test_step_order_and_overwrite(store: CheckpointStore) -> None:
    store.save(5, state(5), metrics={"loss": 0.5})
    with pytest.raises(CheckpointExistsError, match="older than the latest"):
        store.save(3, state(3))
    with pytest.raises(CheckpointExistsError, match="already committed"):
        store.save(5, state(6))
    assert on_disk_steps(store) == [5]
    assert_same(state(5), store.load(5))
    store.save(5, state(6), metrics={"loss": 0.1}, overwrite=True)
    assert_same(state(6), store.load(5))
    assert store.info(5).metrics == {"loss": 0.1}
    store.save(3, state(3), overwrite=True)
    assert steps_of(store.list()) == [3, 5]
    assert store.latest().step == 5
    assert isinstance(CheckpointExistsError("x"), FileExistsError)


def test_delete(store: CheckpointStore) -> None:
    for step in (1, 2, 3):
        store.save(step, state(step), metrics={"loss": step})
    store.delete(2)
    assert steps_of(store.list()) == [1, 3]
    assert not sdir(store, 2).exists()
    with pytest.raises(CheckpointNotFoundError):
        store.load(2)
    store.delete(2)  # deleting again is harmless
    assert steps_of(CheckpointStore(store.config.storage_uri, run_name=store.run_name).list()) == [1, 3]


def test_async_save(store: CheckpointStore) -> None:
    sd = state()
    expected = {k: v.clone() for k, v in sd.items()}
    future = store.save_async(1, sd, metrics={"loss": 1.0})
    for v in sd.values():
        v.add_(100)  # training goes on: the snapshot must not see it
    info = future.result(timeout=30)
    assert info.step == 1
    store.wait()
    store.close()
    assert_same(expected, store.load(1))


# ---------------------------------------------------------------------------------------------
# The commit protocol.
# ---------------------------------------------------------------------------------------------
def test_marker_is_written_last_after_fsyncing_the_directory(store: CheckpointStore, monkeypatch: Any) -> None:
    events: list[tuple[str, str]] = []
    storage = store.storage
    for method in ("write_stream", "write_atomic", "fsync_dir"):
        original = getattr(storage, method)

        def spy(path: str = "", *args: Any, _original: Any = original, _method: str = method, **kwargs: Any) -> Any:
            events.append((_method, path))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(storage, method, spy)
    store.save(7, state(), trainer_state={"x": torch.ones(2)})
    marker_at = next(i for i, (_, p) in enumerate(events) if p.endswith(MARKER))
    step_files = [p for m, p in events[:marker_at] if m != "fsync_dir" and "step_000000007/" in p]
    assert {p.split("step_000000007/", 1)[1] for p in step_files} == set(
        json.loads((sdir(store, 7) / MARKER).read_text())["files"]
    )
    assert ("fsync_dir", "checkpoints/step_000000007") in events[:marker_at]
    after = [p for m, p in events[marker_at + 1 :] if m != "fsync_dir" and "step_000000007/" in p]
    assert all(MARKER in p for p in after), after  # only the marker's own temp file + rename


def test_a_failed_save_leaves_earlier_checkpoints_intact(store: CheckpointStore, monkeypatch: Any) -> None:
    store.save(1, state(1), metrics={"loss": 1.0})
    original = Storage.write_stream
    calls = {"n": 0}

    def failing(self: Storage, path: str, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(Storage, "write_stream", failing)
    with pytest.raises(OSError):
        store.save(2, state(2), metrics={"loss": 0.5})
    monkeypatch.undo()
    assert on_disk_steps(store) == [1]  # the partial step was removed
    assert steps_of(store.list()) == [1]
    store.verify(1)
    assert_same(state(1), store.load("latest"))
    store.save(2, state(2))
    assert steps_of(store.list()) == [1, 2]


def test_uncommitted_step_is_invisible_and_collected(store: CheckpointStore) -> None:
    store.save(1, state(1), metrics={"loss": 1.0})
    leftover = sdir(store, 2)
    shutil.copytree(sdir(store, 1), leftover)
    (leftover / MARKER).unlink()  # a crash before the commit marker
    junk = sdir(store, 3)
    junk.mkdir()
    (junk / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    tmp_file = sdir(store, 1) / ".checkpoint.json.tmp-abc123"
    tmp_file.write_bytes(b"{")
    fresh = CheckpointStore(store.config.storage_uri, run_name=store.run_name, metric_name="loss")
    for s in (store, fresh):
        assert steps_of(s.list()) == [1]
        assert s.latest().step == 1
        with pytest.raises(CheckpointNotFoundError):
            s.load(2)
        with pytest.raises(CheckpointNotFoundError):
            s.verify(2)
    assert sorted(store.gc(dry_run=True)) == sorted(
        [
            "checkpoints/step_000000001/.checkpoint.json.tmp-abc123",
            "checkpoints/step_000000002",
            "checkpoints/step_000000003",
        ]
    )
    assert leftover.exists()
    assert store.gc(older_than_s=3600) == ["checkpoints/step_000000001/.checkpoint.json.tmp-abc123"]
    assert leftover.exists()
    # a directory is as young as its newest file (a shard still being streamed keeps it young)
    for p in (*leftover.iterdir(), leftover, junk, *junk.iterdir()):
        os.utime(p, (1_000_000, 1_000_000))
    os.utime(next(leftover.iterdir()), None)
    assert store.gc(older_than_s=3600, dry_run=True) == ["checkpoints/step_000000003"]
    removed = store.gc()
    assert sorted(removed) == ["checkpoints/step_000000002", "checkpoints/step_000000003"]
    assert on_disk_steps(store) == [1]
    assert not tmp_file.exists()
    store.verify(1)
    assert store.gc() == []


# ---------------------------------------------------------------------------------------------
# Verification and corruption.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def saved(store: CheckpointStore) -> CheckpointStore:
    store.save(1, state(), metrics={"loss": 1.0}, trainer_state={"opt": {"m": torch.ones(3)}, "epoch": 1})
    assert len(shard_files(store, 1)) >= 2
    return store


def test_verify_ok(saved: CheckpointStore) -> None:
    info = saved.verify(1)
    assert info.step == 1
    assert saved.verify().step == 1


@pytest.mark.parametrize("offset", [-1, 9, 100])
def test_verify_catches_a_flipped_byte(saved: CheckpointStore, offset: int) -> None:
    shard = shard_files(saved, 1)[1]
    flip_byte(shard, offset)
    with pytest.raises(CorruptCheckpointError, match=shard.name) as excinfo:
        saved.verify(1)
    assert excinfo.value.path.endswith(shard.name)
    assert "checksum" in str(excinfo.value)


def test_verify_catches_a_truncated_shard(saved: CheckpointStore) -> None:
    shard = shard_files(saved, 1)[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        saved.verify(1)
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        saved.load(1)
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        saved.load(1, verify=False)


def test_verify_catches_a_missing_shard(saved: CheckpointStore) -> None:
    shard = shard_files(saved, 1)[-1]
    shard.unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{shard.name}: missing"):
        saved.verify(1)
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        saved.load(1)
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        saved.load(1, verify=False)


@pytest.mark.parametrize("name", ["trainer_state/trainer_state.safetensors", "trainer_state/trainer_state.json", INDEX])
def test_verify_catches_any_damaged_file(saved: CheckpointStore, name: str) -> None:
    flip_byte(sdir(saved, 1) / name, -2)
    with pytest.raises(CorruptCheckpointError, match=name):
        saved.verify(1)


def test_load_verifies_on_load(saved: CheckpointStore) -> None:
    shard = shard_files(saved, 1)[0]
    flip_byte(shard)
    with pytest.raises(CorruptCheckpointError, match=f"{shard.name}: checksum mismatch"):
        saved.load(1)
    assert saved.config.verify_on_load
    saved.load(1, verify=False)  # the header is intact: an unverified read goes through


def test_load_trainer_state_verifies(saved: CheckpointStore) -> None:
    assert saved.load_trainer_state(1)["epoch"] == 1
    flip_byte(sdir(saved, 1) / "trainer_state" / "trainer_state.safetensors")
    with pytest.raises(CorruptCheckpointError, match="trainer_state.safetensors"):
        saved.load_trainer_state(1)


def test_verify_on_load_off(tmp_run: Any) -> None:
    store = tmp_run(verify_on_load=False)
    store.save(1, {"w": torch.zeros(4)})
    flip_byte(sdir(store, 1) / "model.safetensors")
    assert store.load(1)["w"][-1] != 0  # not checked: the flipped value comes through
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        store.verify(1)


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b"{}",
        b'{"step": 1, "created": 0, "files": []}',
        b'{"step": "x", "created": 0, "files": {}}',
    ],
)
def test_malformed_marker(saved: CheckpointStore, content: bytes) -> None:
    (sdir(saved, 1) / MARKER).write_bytes(content)
    for call in (lambda: saved.load(1), lambda: saved.verify(1)):
        with pytest.raises(CorruptCheckpointError, match="step_000000001/checkpoint.json"):
            call()
    fresh = CheckpointStore(saved.config.storage_uri, run_name=saved.run_name)
    assert fresh.rebuild_index().list() == []  # a damaged marker is skipped (and logged), not fatal for the run


def test_marker_of_another_step(saved: CheckpointStore) -> None:
    marker = json.loads((sdir(saved, 1) / MARKER).read_text())
    shutil.copytree(sdir(saved, 1), sdir(saved, 2))
    marker_path = sdir(saved, 2) / MARKER
    marker_path.write_text(json.dumps({**marker, "step": 1}))
    with pytest.raises(CorruptCheckpointError, match="step_000000002/checkpoint.json"):
        saved.load(2)


def test_marker_from_the_future(saved: CheckpointStore) -> None:
    marker = json.loads((sdir(saved, 1) / MARKER).read_text())
    (sdir(saved, 1) / MARKER).write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(CorruptCheckpointError, match="newer"):
        saved.load(1)


@pytest.mark.parametrize("content", [b"garbage", b'{"weight_map": 3}', b'{"metadata": {}}'])
@pytest.mark.parametrize("verify", [True, False])
def test_malformed_model_index(saved: CheckpointStore, content: bytes, verify: bool) -> None:
    (sdir(saved, 1) / INDEX).write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=INDEX):
        saved.load(1, verify=verify)
    with pytest.raises(CorruptCheckpointError, match=INDEX):
        saved.verify(1)


def test_index_pointing_at_an_unknown_file(tmp_run: Any) -> None:
    store = tmp_run(verify_on_load=False)
    store.save(1, state())
    index_path = sdir(store, 1) / INDEX
    index = json.loads(index_path.read_text())
    index["weight_map"]["layer0.weight"] = "model-99999-of-99999.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="model-99999-of-99999.safetensors"):
        store.load(1)


# ---------------------------------------------------------------------------------------------
# Retention (table-driven).
# ---------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
UNRANKED = "keep_checkpoints_without_metrics"
RETENTION_CASES = [
    # id, config, per-step loss (None: no metric), leased steps, expected kept steps
    ("no-rules-keeps-all", {}, [0.5, 0.4, 0.3, 0.2], (), [1, 2, 3, 4]),
    ("keep_period-alone-keeps-all", {"keep_period": 2}, [0.5, 0.4, 0.3, 0.2], (), [1, 2, 3, 4]),
    ("last-2", {"keep_last_n": 2}, [0.1, 0.2, 0.3, 0.4, 0.5], (), [4, 5]),
    ("last-0-keeps-latest", {"keep_last_n": 0}, [0.1, 0.2, 0.3], (), [3]),
    ("top-2-min", {"keep_top_k": 2}, [0.5, 0.1, 0.4, 0.2, 0.9, 0.8], (), [2, 4, 6]),
    ("top-2-max", {"keep_top_k": 2, "mode": "max"}, [0.5, 0.1, 0.4, 0.2, 0.9, 0.8], (), [5, 6]),
    ("top-1-ties-newer", {"keep_top_k": 1}, [0.2, 0.2, 0.5, 0.2, 0.9], (), [4, 5]),
    ("top-0-keeps-latest", {"keep_top_k": 0}, [0.1, 0.2, 0.3], (), [3]),
    (
        "top-last-period",
        {"keep_top_k": 2, "keep_last_n": 1, "keep_period": 3},
        [0.5, 0.1, 0.4, 0.2, 0.9, 0.8, 0.7],
        (),
        [2, 3, 4, 6, 7],
    ),
    # steps without a finite metric: kept with keep_checkpoints_without_metrics (Orbax's default) ...
    (
        "top-2-nan-inf-kept",
        {"keep_top_k": 2, UNRANKED: True},
        [NAN, 0.3, INF, 0.1, -INF, 0.2, NAN],
        (),
        [1, 3, 4, 5, 6, 7],
    ),
    ("missing-metrics-kept", {"keep_top_k": 2, UNRANKED: True}, [None, 0.3, None, 0.1, None], (), [1, 2, 3, 4, 5]),
    # ... or, by default, left to the other rules
    ("top-2-nan-inf", {"keep_top_k": 2}, [NAN, 0.3, INF, 0.1, -INF, 0.2, NAN], (), [4, 6, 7]),
    ("nan-latest-kept", {"keep_top_k": 1}, [0.1, 0.2, 0.3, NAN], (), [1, 4]),
    ("missing-metrics", {"keep_top_k": 2}, [None, 0.3, None, 0.1, None], (), [2, 4, 5]),
    ("all-nan-keeps-latest", {"keep_top_k": 3}, [NAN, NAN, NAN], (), [3]),
    ("nan-with-last-n", {"keep_top_k": 1, "keep_last_n": 2}, [0.1, NAN, NAN, 0.5], (), [1, 3, 4]),
    ("lease-protects", {"keep_top_k": 1}, [0.9, 0.1, 0.8, 0.7], (1,), [1, 2, 4]),
    ("leases-and-last", {"keep_last_n": 1}, [0.1, 0.2, 0.3, 0.4, 0.5], (2, 3), [2, 3, 5]),
    ("top-period-max", {"keep_top_k": 1, "keep_period": 4, "mode": "max"}, [1, 5, 2, 3, 4, 0, 1, 2], (), [2, 4, 8]),
]


@pytest.mark.parametrize(
    ("options", "losses", "leased", "expected"),
    [case[1:] for case in RETENTION_CASES],
    ids=[case[0] for case in RETENTION_CASES],
)
def test_retention(tmp_run: Any, options: dict, losses: list, leased: tuple, expected: list) -> None:
    store = tmp_run(metric_name="loss", **options)
    for step, loss in enumerate(losses, start=1):
        store.save(step, {"w": torch.full((2,), float(step))}, metrics={} if loss is None else {"loss": loss})
        if step in leased:
            store.acquire_lease(step, ttl_s=600, holder="eval")
    assert steps_of(store.list()) == expected
    assert on_disk_steps(store) == expected
    assert store.apply_retention() == []  # idempotent
    fresh = CheckpointStore(store.config.storage_uri, run_name=store.run_name)
    assert steps_of(fresh.list()) == expected
    for step in expected:
        assert torch.equal(store.load(step)["w"], torch.full((2,), float(step)))


def test_retention_plan_and_apply_return_the_deleted(tmp_run: Any) -> None:
    store = tmp_run(metric_name="loss")
    for step, loss in enumerate([0.3, 0.1, 0.2, 0.4], start=1):
        store.save(step, {"w": torch.ones(1)}, metrics={"loss": loss})
    store.config = store.config.replace(keep_top_k=1)
    assert store.retention_plan() == ([2, 4], [1, 3])
    assert store.retention_plan(protected=[3]) == ([2, 3, 4], [1])
    assert store.apply_retention(protected=[3]) == [1]
    assert store.apply_retention() == [3]
    assert steps_of(store.list()) == [2, 4]


def test_expired_lease_no_longer_protects(tmp_run: Any) -> None:
    store = tmp_run(metric_name="loss", keep_last_n=1)
    store.save(1, {"w": torch.ones(1)})
    lease = store.acquire_lease(1, ttl_s=2.0)  # long enough for the save below on a loaded machine
    assert store.leased_steps() == {1}
    store.save(2, {"w": torch.ones(1)})
    assert steps_of(store.list()) == [1, 2]
    import time

    deadline = time.monotonic() + 30
    while store.leased_steps() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.leased_steps() == set()
    assert store.apply_retention() == [1]
    store.release_lease(1, lease)
    with pytest.raises(CheckpointNotFoundError):
        store.acquire_lease(1, ttl_s=10)


def test_retention_logs_unranked_steps(tmp_run: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_run(metric_name="loss", keep_top_k=1, keep_checkpoints_without_metrics=False)
    caplog.set_level("DEBUG", logger="ray_ckpt.core.retention")
    store.save(1, {"w": torch.ones(1)}, metrics={"loss": NAN})
    store.save(2, {"w": torch.ones(1)}, metrics={"loss": 0.5})
    assert any("never best" in r.getMessage() and "[1]" in r.getMessage() for r in caplog.records)


def test_keep_top_k_without_a_metric_is_a_config_error(tmp_run: Any) -> None:
    with pytest.raises(ConfigError, match=r"^keep_top_k: set without metric_name"):
        tmp_run(keep_top_k=2)  # nothing would ever be ranked
    store = tmp_run(metric_name="loss")
    with pytest.raises(ConfigError, match=r"^keep_top_k:"):
        store.config = store.config.replace(metric_name=None, keep_top_k=2)


def test_retention_follows_a_changed_config(tmp_run: Any) -> None:
    store = tmp_run(metric_name="loss", mode="min")
    for step, loss in enumerate([0.1, 0.9, 0.5, 0.3], start=1):
        store.save(step, {"w": torch.ones(1)}, metrics={"loss": loss})
    store.config = store.config.replace(keep_top_k=1, mode="max")
    assert store.retention_plan() == ([2, 4], [1, 3])


# ---------------------------------------------------------------------------------------------
# The run index snapshot.
# ---------------------------------------------------------------------------------------------
def _snapshot_steps(store: CheckpointStore) -> list[int]:
    return pq.read_table(store.storage.local_path("index.parquet")).column("step").to_pylist()


def _fresh(store: CheckpointStore) -> CheckpointStore:
    return CheckpointStore(store.config.storage_uri, run_name=store.run_name, metric_name="loss")


def _log_entries(store: CheckpointStore) -> list[str]:
    return store.storage.list_names("index_log")


def test_the_index_is_logged_per_change_then_compacted(store: CheckpointStore) -> None:
    from ray_ckpt.core.runindex import COMPACT_EVERY

    store.save(1, state(), metrics={"loss": 0.5})
    assert len(_log_entries(store)) == 1 and not store.storage.exists("index.parquet")
    assert steps_of(_fresh(store).list()) == [1]  # a fresh reader replays the log
    for step in range(2, COMPACT_EVERY + 1):
        store.save(step, state(), metrics={"loss": 1 / step})
    assert _log_entries(store) == []  # folded into the snapshot
    table = pq.read_table(store.storage.local_path("index.parquet")).to_pylist()
    assert [r["step"] for r in table] == list(range(1, COMPACT_EVERY + 1))
    assert dict(table[1]["metrics"]) == {"loss": 0.5}
    assert table[1]["uri"] == store.info(2).uri
    opened = _fresh(store)
    assert steps_of(opened.list()) == list(range(1, COMPACT_EVERY + 1))
    assert opened.run_index.markers_read == 0  # the snapshot was read, not rebuilt from the markers
    store.report_eval(3, {"acc": 0.9})
    store.delete(4)
    fresh = _fresh(store)
    assert fresh.info(3).metrics["acc"] == 0.9 and 4 not in fresh
    assert steps_of(fresh.list()) == steps_of(store.list())


def test_index_rebuilt_from_the_markers_when_snapshot_and_log_are_gone(store: CheckpointStore) -> None:
    for step in (1, 2, 3):
        store.save(step, state(), metrics={"loss": 1 / step})
    store.run_index.compact()
    os.remove(store.storage.local_path("index.parquet"))
    fresh = _fresh(store)
    assert steps_of(fresh.list()) == [1, 2, 3]
    assert fresh.best().step == 3
    fresh.save(4, state(), metrics={"loss": 0.5})  # a writer that read every marker writes a snapshot
    assert _snapshot_steps(store) == [1, 2, 3]  # at its start; step 4 is in the log
    assert steps_of(_fresh(store).list()) == [1, 2, 3, 4]


def test_a_stale_snapshot_and_steps_deleted_behind_its_back(store: CheckpointStore) -> None:
    for step in (1, 2):
        store.save(step, state(), metrics={"loss": 1 / step})
    store.run_index.compact()
    stale = Path(store.storage.local_path("index.parquet")).read_bytes()
    store.save(3, state(), metrics={"loss": 0.1})
    store.save(4, state(), metrics={"loss": 0.2})
    store.run_index.compact()
    Path(store.storage.local_path("index.parquet")).write_bytes(stale)  # commits behind the snapshot's back
    shutil.rmtree(sdir(store, 1))  # and a step deleted behind its back
    fresh = _fresh(store)
    assert steps_of(fresh.list()) == [2, 3, 4]  # markers of unknown steps read, gone steps dropped
    assert fresh.best().step == 3
    # the long-lived store answers from memory until it reloads
    assert steps_of(store.list()) == [1, 2, 3, 4]
    assert steps_of(store.reload().list()) == [2, 3, 4]


def test_index_parquet_garbage_is_rebuilt(store: CheckpointStore) -> None:
    store.save(1, state(), metrics={"loss": 0.5})
    store.run_index.compact()
    Path(store.storage.local_path("index.parquet")).write_bytes(b"PAR1 garbage")
    fresh = _fresh(store)
    assert steps_of(fresh.list()) == [1]
    assert steps_of(store.rebuild_index().list()) == [1]
    assert _snapshot_steps(store) == [1]


def test_readers_see_other_processes_commits_after_reload_or_staleness(store: CheckpointStore) -> None:
    store.save(1, state(), metrics={"loss": 0.5})
    reader = _fresh(store)
    following = CheckpointStore(
        store.config.storage_uri, run_name=store.run_name, metric_name="loss", max_staleness_s=0.0
    )
    assert steps_of(reader.list()) == [1] == steps_of(following.list())
    store.save(2, state(), metrics={"loss": 0.25})
    assert steps_of(reader.list()) == [1]  # from memory
    assert steps_of(following.list()) == [1, 2]  # reloads once older than max_staleness_s
    assert steps_of(reader.reload().list()) == [1, 2]


# ---------------------------------------------------------------------------------------------
# Architectures.
# ---------------------------------------------------------------------------------------------
def test_architecture_roundtrip_and_instantiate(tmp_run: Any) -> None:
    store = tmp_run(allowed_architecture_prefixes=["tests.models."])
    with pytest.raises(FileNotFoundError):
        store.read_architecture()
    model = TinyMLP(d_in=3, hidden=5, d_out=2)
    arch = store.write_architecture(model, {"d_in": 3, "hidden": 5, "d_out": 2})
    assert arch.class_path == "tests.models.TinyMLP"
    on_disk = json.loads(Path(store.storage.local_path("model_architecture.json")).read_text())
    assert on_disk["class_path"] == "tests.models.TinyMLP"
    assert on_disk["config"] == {"d_in": 3, "hidden": 5, "d_out": 2}
    assert store.read_architecture() == arch
    with torch.no_grad():
        model.steps.fill_(7)
    store.save(1, model.state_dict())
    built = store.instantiate()  # "best" falls back to the latest when nothing is ranked
    assert isinstance(built, TinyMLP)
    x = torch.randn(4, 3)
    assert torch.equal(built(x), model(x))
    assert int(built.steps) == 7
    # a second write of the same class keeps the first; another class is refused
    assert store.write_architecture(TinyMLP, {"d_in": 9}).config == {"d_in": 3, "hidden": 5, "d_out": 2}
    with pytest.raises(ValueError, match="TiedLM"):
        store.write_architecture(TiedLM())


def test_instantiate_by_class_path_and_step(tmp_run: Any) -> None:
    # a class path given as a string trusts nothing: its module is opted in explicitly
    store = tmp_run(metric_name="loss", allowed_architecture_prefixes=["tests.models"])
    store.write_architecture("tests.models.TinyMLP", {"d_in": 2, "hidden": 3, "d_out": 1})
    models = {}
    for step, loss in ((1, 0.1), (2, 0.9)):
        torch.manual_seed(step)
        models[step] = TinyMLP(2, 3, 1)
        store.save(step, models[step].state_dict(), metrics={"loss": loss})
    x = torch.randn(3, 2)
    assert torch.equal(store.instantiate()(x), models[1](x))  # best
    assert torch.equal(store.instantiate(step=2)(x), models[2](x))
    assert torch.equal(store.instantiate(step="latest")(x), models[2](x))


def test_instantiate_tied_model(tmp_run: Any) -> None:
    store = tmp_run()
    model = TiedLM(vocab=7, dim=3)
    store.write_architecture(model, {"vocab": 7, "dim": 3})
    store.save(1, model.state_dict())
    built = store.instantiate(strict=True)
    assert built.head.weight is built.embed.weight
    assert torch.equal(built.embed.weight, model.embed.weight)


def test_allowed_prefixes_refuse_before_import(tmp_run: Any) -> None:
    writer = tmp_run()
    writer.write_architecture("tests.forbidden_model.Evil", {})
    writer.save(1, {"w": torch.ones(1)})
    store = tmp_run(allowed_architecture_prefixes=["tests.models.", "transformers."])
    assert "tests.forbidden_model" not in sys.modules
    with pytest.raises(ArchitectureNotAllowedError, match="tests.forbidden_model.Evil"):
        store.instantiate()
    with pytest.raises(ArchitectureNotAllowedError):
        store.read_architecture().build(["tests.models."])
    assert "tests.forbidden_model" not in sys.modules
    # an empty allow-list refuses everything
    with pytest.raises(ArchitectureNotAllowedError):
        store.read_architecture().build([])


def test_allowed_prefixes_also_cover_the_config_class(tmp_run: Any) -> None:
    store = tmp_run(run_name="cfg", allowed_architecture_prefixes=["tests.models."])
    Path(store.storage.local_path()).mkdir(parents=True, exist_ok=True)
    Path(store.storage.local_path("model_architecture.json")).write_text(
        json.dumps({"class_path": "tests.models.TinyMLP", "config_class": "tests.forbidden_model.Cfg", "config": {}})
    )
    store.save(1, TinyMLP().state_dict())
    with pytest.raises(ArchitectureNotAllowedError, match="tests.forbidden_model.Cfg"):
        store.instantiate()
    assert "tests.forbidden_model" not in sys.modules


@pytest.mark.parametrize(
    "content",
    [
        b"nope",
        b"{}",
        b"[]",
        b'{"class_path": 3}',
        b'{"class_path": "a.B", "config": []}',
        b'{"class_path": "a.B", "config_class": 3}',
    ],
)
def test_malformed_architecture_file(tmp_run: Any, content: bytes) -> None:
    store = tmp_run()
    store.save(1, {"w": torch.ones(1)})
    Path(store.storage.local_path("model_architecture.json")).write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match="model_architecture.json"):
        store.read_architecture()


# ---------------------------------------------------------------------------------------------
# checkpoint_format="pt".
# ---------------------------------------------------------------------------------------------
def test_pt_format_roundtrip(tmp_run: Any) -> None:
    store = tmp_run(checkpoint_format="pt", max_shard_size=600, metric_name="loss")
    model = TiedLM(vocab=20, dim=8)
    sd = {**model.state_dict(), "extra.bf16": torch.randn(3, 3).to(torch.bfloat16)}
    store.save(1, sd, metrics={"loss": 0.5}, trainer_state={"step": 1, "m": torch.ones(2)})
    names = sorted(p.name for p in sdir(store, 1).iterdir())
    shards = [n for n in names if n.startswith("pytorch_model-") and n.endswith(".bin")]
    assert len(shards) >= 2
    assert "pytorch_model.bin.index.json" in names
    index = json.loads((sdir(store, 1) / "pytorch_model.bin.index.json").read_text())
    for shard in shards:
        data = torch.load(sdir(store, 1) / shard, weights_only=True)
        for key, value in data.items():
            assert index["weight_map"][key] == shard
            assert torch.equal(value, sd[key])
    loaded = store.load(1)
    assert_same(dict(sorted(sd.items())), dict(sorted(loaded.items())))  # tied keys come back after the others
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert torch.equal(store.load(1, keys=["extra.bf16"])["extra.bf16"], sd["extra.bf16"])
    assert store.load_trainer_state(1)["step"] == 1
    store.verify(1)
    flip_byte(sdir(store, 1) / shards[0], -5)
    with pytest.raises(CorruptCheckpointError, match=shards[0]):
        store.verify(1)
    with pytest.raises(CorruptCheckpointError, match=shards[0]):
        store.load(1)


# ---------------------------------------------------------------------------------------------
# Hugging Face compatibility.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2() -> Any:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # not the default init: loading must really happen
    return model


def test_hugging_face_load_sharded_checkpoint(tmp_run: Any, gpt2: Any) -> None:
    """transformers' own loader reads our step directory.

    We store tied tensors once (like save_pretrained), so the index has no ``lm_head.weight``:
    load_sharded_checkpoint(strict=True) would report it missing before loading anything.
    We load with strict=False, check that it is the only missing key, and that the tied
    weight comes out right.
    """
    import transformers
    from transformers.trainer_utils import load_sharded_checkpoint

    store = tmp_run(max_shard_size=20_000)
    sd = gpt2.state_dict()
    store.save(1, sd)
    step_path = sdir(store, 1)
    shards = shard_files(store, 1)
    assert len(shards) >= 4
    index = json.loads((step_path / INDEX).read_text())
    assert set(index["weight_map"]) == set(sd) - {"lm_head.weight"}
    stored = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in stored.values())
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), sd[key])

    torch.manual_seed(1)
    model2 = transformers.GPT2LMHeadModel(gpt2.config).eval()
    result = load_sharded_checkpoint(model2, str(step_path), strict=False)
    assert list(result.missing_keys) == ["lm_head.weight"]
    assert list(result.unexpected_keys) == []
    for key, value in model2.state_dict().items():
        assert torch.equal(value, sd[key]), key
    assert model2.lm_head.weight.data_ptr() == model2.transformer.wte.weight.data_ptr()
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(model2(ids).logits, gpt2(ids).logits)


def test_instantiate_hugging_face_model(tmp_run: Any, gpt2: Any) -> None:
    import transformers

    store = tmp_run(max_shard_size=20_000, allowed_architecture_prefixes=["transformers."])
    arch = store.write_architecture(gpt2)
    assert arch.class_path == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
    assert arch.config_class == "transformers.models.gpt2.configuration_gpt2.GPT2Config"
    assert arch.config["n_embd"] == 32
    store.save(1, gpt2.state_dict())
    built = store.instantiate(strict=True).eval()
    assert isinstance(built, transformers.GPT2LMHeadModel)
    assert built.lm_head.weight.data_ptr() == built.transformer.wte.weight.data_ptr()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, gpt2(ids).logits)
    refused = tmp_run(allowed_architecture_prefixes=["tests.models."])
    with pytest.raises(ArchitectureNotAllowedError, match="transformers"):
        refused.instantiate()


# ---------------------------------------------------------------------------------------------
# Other storages through the same class.
# ---------------------------------------------------------------------------------------------
def test_memory_storage_roundtrip(memory_uri: str) -> None:
    store = CheckpointStore(memory_uri, run_name="mem", metric_name="loss", keep_top_k=1, max_shard_size=600)
    for step, loss in ((1, 0.5), (2, 0.1), (3, 0.7)):
        store.save(step, state(step), metrics={"loss": loss}, trainer_state={"epoch": step})
    assert steps_of(store.list()) == [2, 3]
    assert_same(state(2), store.load("best"))
    assert store.load_trainer_state(3) == {"epoch": 3}
    store.verify(2)
    assert store.info(2).durability == ["remote"]


def test_config_object_and_overrides(tmp_path: Path) -> None:
    cfg = CheckpointConfig(storage_uri=str(tmp_path), run_name="cfgrun", metric_name="loss", keep_last_n=1)
    store = CheckpointStore(config=cfg, keep_last_n=2)
    assert store.config.keep_last_n == 2 and cfg.keep_last_n == 1
    assert store.uri == f"file://{tmp_path}/cfgrun"
    for step in (1, 2, 3):
        store.save(step, {"w": torch.ones(1)})
    assert steps_of(store.list()) == [2, 3]
    file_store = CheckpointStore(f"file://{tmp_path}", run_name="cfgrun")
    assert steps_of(file_store.list()) == [2, 3]


def test_hugging_face_loads_the_pt_format(tmp_run: Any, gpt2: Any) -> None:
    import transformers
    from transformers.trainer_utils import load_sharded_checkpoint

    store = tmp_run(max_shard_size=20_000, checkpoint_format="pt")
    sd = gpt2.state_dict()
    store.save(1, sd)
    assert len([p for p in sdir(store, 1).iterdir() if p.name.startswith("pytorch_model-")]) >= 4
    model2 = transformers.GPT2LMHeadModel(gpt2.config).eval()
    result = load_sharded_checkpoint(model2, str(sdir(store, 1)), strict=False, prefer_safe=False)
    assert list(result.missing_keys) == ["lm_head.weight"]  # tied: stored once, as in the safetensors case
    for key, value in model2.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_non_finite_metrics_are_written_as_strict_json(tmp_path: Path) -> None:
    """checkpoint.json and eval_metrics.json are read by other tools: no bare NaN/Infinity."""
    store = CheckpointStore(str(tmp_path), run_name="strict", metric_name="loss")
    store.save(1, {"w": torch.ones(1)}, metrics={"loss": float("nan"), "up": float("inf"), "ok": 0.5})
    store.report_eval(1, {"eval/down": float("-inf")})
    step = tmp_path / "strict" / "checkpoints" / "step_000000001"

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    for name in ("checkpoint.json", "eval_metrics.json"):
        json.loads((step / name).read_text(), parse_constant=refuse)
    metrics = CheckpointStore(str(tmp_path), run_name="strict").info(1).metrics
    assert math.isnan(metrics["loss"]) and metrics["up"] == math.inf and metrics["eval/down"] == -math.inf
    assert metrics["ok"] == 0.5
    assert store.best() is None  # never ranked


def test_steps_in_the_formats_of_released_versions_still_load(tmp_path: Path) -> None:
    """A step as versions before 1703474 wrote it: the trainer state as trainer_state.safetensors and
    trainer_state.json beside the model, whole-file checksums (format_version 1, before 20e4da1), and
    bare NaN/Infinity metrics in checkpoint.json and eval_metrics.json (before 7d0db75)."""
    store = CheckpointStore(str(tmp_path), run_name="new", metric_name="loss")
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    store.save(1, weights, metrics={"loss": float("nan"), "ok": 0.5}, trainer_state={"epoch": 3, "m": torch.ones(4)})
    new, old = sdir(store, 1), tmp_path / "old" / "checkpoints" / "step_000000001"
    old.mkdir(parents=True)
    for name in ("model.safetensors", "model.safetensors.index.json"):
        shutil.copy(new / name, old / name)
    shutil.copy(new / "trainer_state" / "trainer_state.safetensors", old / "trainer_state.safetensors")
    trainer_json = json.loads((new / "trainer_state" / "trainer_state.json").read_text())
    del trainer_json["weight_map"]
    (old / "trainer_state.json").write_text(json.dumps({**trainer_json, "format_version": 1}))
    marker = json.loads((new / "checkpoint.json").read_text())
    marker["format_version"] = 1
    marker["files"] = {
        p.name: {"size": p.stat().st_size, "checksum": f"{CHECKSUM_ALGORITHM}:{digest_hex(p.read_bytes())}"}
        for p in sorted(old.iterdir())
    }
    text = json.dumps(marker).replace('"loss": "NaN"', '"loss": NaN')
    assert '"loss": NaN' in text
    (old / "eval_metrics.json").write_text('{"eval/down": -Infinity}')
    (old / "checkpoint.json").write_text(text)

    reader = CheckpointStore(str(tmp_path), run_name="old", metric_name="loss")
    metrics = reader.info(1).metrics
    assert math.isnan(metrics["loss"]) and metrics["ok"] == 0.5 and metrics["eval/down"] == -math.inf
    assert reader.verify(1).step == 1
    assert_same(reader.load(1), weights)
    assert_same(reader.load(1, ["w"]), weights)
    trainer_state = reader.load_trainer_state(1)
    assert trainer_state["epoch"] == 3 and torch.equal(trainer_state["m"], torch.ones(4))
    # the whole-file checksums still guard every read
    (old / "trainer_state.safetensors").write_bytes(b"x" * (old / "trainer_state.safetensors").stat().st_size)
    with pytest.raises(CorruptCheckpointError, match="trainer_state.safetensors"):
        reader.load_trainer_state(1)
    model = bytearray((old / "model.safetensors").read_bytes())
    model[-1] ^= 0xFF
    (old / "model.safetensors").write_bytes(bytes(model))
    for read in (lambda: reader.load(1, ["w"]), lambda: reader.load(1), lambda: reader.verify(1)):
        with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
            read()


# ---------------------------------------------------------------------------------------------
# load(mmap=True): tensors map the committed files (copy-on-write), nothing copied.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_mmap_load_matches_a_read_and_writes_stay_private(tmp_run: Any, fmt: str) -> None:
    store = tmp_run(checkpoint_format=fmt, max_shard_size=600)
    saved = {**state(3), "empty": torch.zeros(0), "half": torch.arange(5, dtype=torch.float16)}
    store.save(1, saved)
    files = {p: p.read_bytes() for p in sdir(store, 1).iterdir()}
    mapped = store.load(1, mmap=True)
    assert_same(mapped, store.load(1))
    assert_same(store.load(1, ["layer2.weight", "half"], mmap=True), {k: saved[k] for k in ("layer2.weight", "half")})
    mapped["layer0.weight"].add_(100.0)  # copy-on-write: the file and other loads keep the saved bytes
    assert_same(store.load(1), saved)
    assert {p: p.read_bytes() for p in sdir(store, 1).iterdir()} == files
    assert torch.equal(mapped["layer0.weight"], saved["layer0.weight"] + 100.0)


def test_mmap_load_checks_the_checksum_and_needs_local_storage(tmp_run: Any) -> None:
    store = tmp_run(max_shard_size=600)
    store.save(1, state(4))
    victim = shard_files(store, 1)[-1]
    flip_byte(victim)
    with pytest.raises(CorruptCheckpointError, match=victim.name):
        store.load(1, mmap=True)
    assert store.load(1, mmap=True, verify=False).keys() == state(4).keys()  # unverified: mapped as is
    remote = CheckpointStore("memory://mmap-test", run_name="r")
    remote.save(1, state(0))
    with pytest.raises(ValueError, match="mmap=True needs local storage"):
        remote.load(1, mmap=True)


def test_add_files_checks_other_writers_files_by_name_and_size(store: CheckpointStore) -> None:
    from ray_ckpt.core.format.digests import FileDigest

    writer = store.begin_step(7)
    store.storage.write_bytes(f"{writer.dir}/model-a.safetensors", b"x" * 10)
    store.storage.write_bytes(f"{writer.dir}/extra/notes.txt", b"hi")
    writer.add_files(
        {"model-a.safetensors": FileDigest(10, "xxh3_64:0"), "extra/notes.txt": FileDigest(2, "xxh3_64:1")}
    )
    assert set(writer.files) == {"model-a.safetensors", "extra/notes.txt"}
    with pytest.raises(CorruptCheckpointError, match="model-b.safetensors: reported written but missing"):
        writer.add_files({"model-b.safetensors": FileDigest(3, "xxh3_64:2")})
    with pytest.raises(CorruptCheckpointError, match="model-a.safetensors: size 10 differs from the reported 11"):
        writer.add_file("model-a.safetensors", FileDigest(11, "xxh3_64:0"))
    writer.abort()
    assert store.list() == []


def test_direct_io_and_page_cache_writes_give_identical_files(tmp_run: Any) -> None:
    """A shard above DIRECT_IO_MIN is written with O_DIRECT (an odd size: padded, then truncated)."""
    from ray_ckpt.core.storage.local import DIRECT_IO_MIN

    g = torch.Generator().manual_seed(5)
    sd = {"big": torch.randn(DIRECT_IO_MIN // 4 + 1001, generator=g), "small": torch.arange(3.0)}
    direct, buffered = tmp_run("direct"), tmp_run("buffered", direct_io=False)
    for store in (direct, buffered):
        store.save(1, sd)
        assert_same(store.load(1), sd)
        store.verify(1)
    assert (sdir(direct, 1) / "model.safetensors").read_bytes() == (
        sdir(buffered, 1) / "model.safetensors"
    ).read_bytes()
