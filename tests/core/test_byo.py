"""Bring-your-own-files checkpoints: two-phase commit of trainer-written files, local disk and S3."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointStore
from ray_ckpt.core.byo import (
    LEGACY_RUN_CONFIG_FILE,
    RUN_CONFIG_FILE,
    PendingCheckpoint,
    checkpoint_files,
    digest_file,
    read_run_config,
    read_training_info,
)
from ray_ckpt.core.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError
from ray_ckpt.core.layout import MARKER_FILE, step_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def tiny_gpt2(seed: int) -> Any:
    """A locally configured GPT-2 (nothing downloaded)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(params=["local", "s3"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A factory of stores of one run, on local disk or on the loopback S3 endpoint."""
    if request.param == "local":
        root, options = str(tmp_path / "runs"), {}
    else:
        root, options = request.getfixturevalue("s3_bucket")

    def make(**kwargs: Any) -> CheckpointStore:
        return CheckpointStore(root, run_name="byo", storage_options=options, **kwargs)

    make.remote = request.param == "s3"  # type: ignore[attr-defined]
    return make


def committed_names(store: CheckpointStore, step: int) -> list[str]:
    return sorted(store.read_manifest(step).files)


def test_save_pretrained_committed_ranked_and_loaded(make_store: Any, tmp_path: Path) -> None:
    store = make_store(metric_name="val_reward", mode="max", keep_top_k=2)
    rewards = {10: 0.5, 20: 0.9, 30: 0.7}
    models = {}
    for step, reward in rewards.items():
        model = tiny_gpt2(step)
        models[step] = model
        pending = store.begin(step, training_info={"step": step, "loss": 1.0 / step}, run_config={"lr": 1e-3})
        assert isinstance(pending, PendingCheckpoint)
        assert pending.path.is_dir()
        if make_store.remote:
            assert "byo" in str(pending.path) and not str(pending.path).startswith(str(tmp_path / "runs"))
        else:
            assert pending.path == Path(store.storage.local_path(step_dir(step)))
        model.save_pretrained(pending.path / "policy")
        info = pending.commit(metrics={"val_reward": reward})
        assert info.step == step and info.metrics["val_reward"] == reward
        assert info.metrics["loss"] == pytest.approx(1.0 / step)  # numeric training_info entries rank too
        assert pending.state == "committed"
        if make_store.remote:
            assert not pending.path.exists()  # staging removed after upload

    # keep_top_k=2 by val_reward: step 10 (worst, not latest) went to retention.
    reader = make_store(metric_name="val_reward", mode="max")
    assert [i.step for i in reader.list()] == [20, 30]
    assert [i.step for i in reader.top_k(2)] == [20, 30]
    assert reader.best().step == 20
    names = committed_names(reader, 20)
    assert {"policy/config.json", "policy/model.safetensors", "training_info.json", RUN_CONFIG_FILE} <= set(names)
    assert reader.verify(20).step == 20
    assert read_training_info(reader, 20) == {"step": 20, "loss": 1.0 / 20}
    assert reader.info(20).metadata["training_info"]["step"] == 20
    with pytest.raises(ValueError, match="trainer-written"):
        reader.load(20)

    directory = checkpoint_files(reader, "best", dest=tmp_path / "download")
    assert json.loads((directory / RUN_CONFIG_FILE).read_text()) == {"lr": 1e-3}
    assert read_run_config(reader, "best") == {"lr": 1e-3}
    loaded = transformers.GPT2LMHeadModel.from_pretrained(directory / "policy")
    expected = models[20].state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_aborted_checkpoint_is_invisible(make_store: Any) -> None:
    store = make_store()
    pending = store.begin(5, training_info={"step": 5})
    (pending.path / "weights.bin").write_bytes(b"x" * 100)
    # Before commit a fresh reader sees nothing (no checkpoint.json yet).
    assert make_store().list() == []
    pending.abort()
    assert pending.state == "aborted"
    assert store.list() == [] and make_store().list() == []
    assert not store.storage.exists(step_dir(5))
    assert not pending.path.exists()
    with pytest.raises(RuntimeError, match="aborted"):
        pending.commit()

    # An exception inside the block aborts; so does leaving it without commit().
    with pytest.raises(RuntimeError, match="boom"):
        with store.begin(6) as pending:
            (pending.path / "a.txt").write_text("a")
            raise RuntimeError("boom")
    assert pending.state == "aborted"
    with store.begin(7) as pending:
        (pending.path / "a.txt").write_text("a")
    assert pending.state == "aborted"
    assert store.list() == [] and not store.storage.exists(step_dir(7))

    with store.begin(8) as pending:
        (pending.path / "nested" / "deeper").mkdir(parents=True)
        (pending.path / "nested" / "deeper" / "b.txt").write_text("b")
        pending.commit()
    assert [i.step for i in make_store().list()] == [8]
    assert committed_names(store, 8) == ["nested/deeper/b.txt"]
    assert store.storage.read_bytes(f"{step_dir(8)}/nested/deeper/b.txt") == b"b"


def test_verify_names_a_tampered_nested_file(make_store: Any) -> None:
    store = make_store()
    pending = store.begin(1)
    (pending.path / "policy").mkdir()
    (pending.path / "policy" / "weights.bin").write_bytes(bytes(range(256)) * 4)
    pending.commit()
    store.verify(1)
    path = f"{step_dir(1)}/policy/weights.bin"
    store.storage.write_bytes(path, bytes(reversed(range(256))) * 4)  # same size, other bytes
    with pytest.raises(CorruptCheckpointError, match="policy/weights.bin: checksum mismatch"):
        make_store().verify(1)
    store.storage.rm(path)
    with pytest.raises(CorruptCheckpointError, match="policy/weights.bin: missing"):
        make_store().verify(1)


def test_collisions_and_bad_input_keep_the_step_pending(make_store: Any) -> None:
    store = make_store()
    pending = store.begin(3, training_info={"step": 3}, run_config={"a": 1})
    (pending.path / RUN_CONFIG_FILE).write_text("{}")  # ray-ckpt's own name: the trainer may not use it
    with pytest.raises(ValueError, match=RUN_CONFIG_FILE):
        pending.commit()
    assert pending.state == "open" and store.list() == []
    os.remove(pending.path / RUN_CONFIG_FILE)
    (pending.path / MARKER_FILE).write_text("{}")
    with pytest.raises(ValueError, match="reserved"):
        pending.commit()
    os.remove(pending.path / MARKER_FILE)
    with pytest.raises(TypeError, match="val"):
        pending.commit(metrics={"val": "high"})
    assert store.list() == []
    info = pending.commit(metrics={"val": 1.0})  # a retry after fixing the input commits
    assert info.step == 3 and committed_names(store, 3) == [RUN_CONFIG_FILE, "training_info.json"]

    with pytest.raises(CheckpointExistsError):
        store.begin(3)
    with pytest.raises(CheckpointExistsError):
        store.begin(2)
    with pytest.raises(TypeError, match="training_info"):
        store.begin(4, training_info={"obj": object()})
    with pytest.raises(CheckpointNotFoundError):
        checkpoint_files(store, 99)


def test_numpy_and_tensor_scalars_in_training_info(make_store: Any) -> None:
    import numpy as np

    store = make_store(metric_name="reward", mode="max")
    pending = store.begin(1, training_info={"reward": torch.tensor(0.25), "steps": np.int64(7)})
    (pending.path / "f").write_bytes(b"1")
    info = pending.commit()
    assert info.metrics == {"reward": 0.25, "steps": 7.0}
    assert read_training_info(store, 1) == {"reward": 0.25, "steps": 7}
    assert store.best().step == 1


def test_hf_save_pretrained_at_the_top_of_pending_path(make_store: Any, tmp_path: Path) -> None:
    """HF's layout as it is: save_pretrained writes config.json beside ray-ckpt's own files."""
    store = make_store(metric_name="eval/loss", mode="min", keep_top_k=1)
    losses = {100: 2.5, 200: 1.5, 300: 2.0}
    models = {}
    for step, loss in losses.items():
        models[step] = model = tiny_gpt2(step)
        pending = store.begin(step, training_info={"step": step}, run_config={"lr": 3e-4, "step": step})
        model.save_pretrained(pending.path)  # config.json, generation_config.json, model.safetensors
        info = pending.commit(metrics={"eval/loss": loss})
        assert info.metrics["eval/loss"] == loss
        names = committed_names(store, step)
        assert {"config.json", "model.safetensors", "training_info.json", RUN_CONFIG_FILE} <= set(names)
    # top-1 by eval/loss (step 200) plus the latest (300); 100 went to retention
    assert [i.step for i in store.list()] == [200, 300] and store.best().step == 200
    reader = make_store(metric_name="eval/loss", mode="min")
    directory = checkpoint_files(reader, "best", dest=tmp_path / "best")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
    expected = models[200].state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "gpt2"  # HF's, untouched
    assert read_run_config(reader, "best") == {"lr": 3e-4, "step": 200}
    assert read_training_info(reader, "best") == {"step": 200}
    assert reader.verify(200).step == 200


def test_run_config_of_a_checkpoint_from_before_the_rename(make_store: Any, tmp_path: Path) -> None:
    """A trainer-written step committed when ray-ckpt's run config was config.json still reads."""
    store = make_store()
    with store.begin_step(1) as writer:
        source = tmp_path / LEGACY_RUN_CONFIG_FILE
        source.write_text(json.dumps({"lr": 0.1}))
        store.storage.put_file(str(source), f"{writer.dir}/{LEGACY_RUN_CONFIG_FILE}")
        writer.add_file(LEGACY_RUN_CONFIG_FILE, digest_file(str(source)))
        writer.commit(kind="files")  # the marker names no run-config file, as older markers did
    assert "run_config" not in store.read_manifest(1).extra
    assert read_run_config(make_store(), 1) == {"lr": 0.1}
    # a step committed now without run_config: a top-level config.json is the trainer's, not ours
    pending = store.begin(2)
    (pending.path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    pending.commit()
    assert store.read_manifest(2).extra["run_config"] is None
    assert read_run_config(make_store(), 2) is None
