"""Legacy checkpoint files: detection, the four formats, the trust_pickle gate and the LRU cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ray_ckpt
from ray_ckpt import CorruptCheckpointError
from ray_ckpt.interop import legacy
from ray_ckpt.interop.legacy import LRUCache, UntrustedPickleError, detect_format, legacy_cache, read_legacy
from ray_ckpt.interop.mock import TinyPolicy


@pytest.fixture(autouse=True)
def _clean_cache() -> None:
    legacy_cache().clear()


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in TinyPolicy().state_dict().items()}


def test_metta_file_run_and_epoch_from_name(tmp_path: Path) -> None:
    sd = _weights(1)
    torch.save(sd, tmp_path / "my_run:v12.pt")
    artifact = ray_ckpt.load_from_uri(str(tmp_path / "my_run:v12.pt"))
    assert (artifact.run_name, artifact.step, artifact.source_format) == ("my_run", 12, "metta")
    assert artifact.metrics["epoch"] == 12
    for key, value in sd.items():
        torch.testing.assert_close(artifact.state_dict[key], value)
    assert ray_ckpt.key_and_version(f"file://{tmp_path}/my_run:v12.pt") == ("my_run", 12)


def test_metta_directory_resolves_latest_and_version(tmp_path: Path) -> None:
    ckpts = tmp_path / "train_dir" / "run7" / "checkpoints"
    ckpts.mkdir(parents=True)
    for epoch in (1, 5, 3):
        torch.save(_weights(epoch), ckpts / f"run7:v{epoch}.pt")
    torch.save(_weights(9), ckpts / "other:v9.pt")
    assert ray_ckpt.load_from_uri(f"{tmp_path}/train_dir/run7:latest").step == 5
    assert ray_ckpt.load_from_uri(f"{tmp_path}/train_dir/run7").step == 5
    three = ray_ckpt.load_from_uri(f"{tmp_path}/train_dir/run7:v3")
    torch.testing.assert_close(three.state_dict["body.bias"], _weights(3)["body.bias"])


def test_lru_cache_serves_repeated_loads_and_notices_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r:v1.pt"
    torch.save(_weights(1), path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    first = ray_ckpt.load_from_uri(str(path))
    second = ray_ckpt.load_from_uri(str(path))
    assert len(calls) == 1 and legacy_cache().hits == 1
    second.state_dict.pop("body.bias")  # a caller's changes do not reach the cache
    assert "body.bias" in ray_ckpt.load_from_uri(str(path)).state_dict
    assert "body.bias" in first.state_dict
    torch.save(_weights(2), path)
    os.utime(path, ns=(1, 10**18))  # a new mtime: the cached entry no longer matches
    changed = ray_ckpt.load_from_uri(str(path))
    assert len(calls) == 2
    torch.testing.assert_close(changed.state_dict["body.bias"], _weights(2)["body.bias"])


def test_lru_cache_evicts_least_recently_used() -> None:
    cache = LRUCache(maxsize=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2


def test_pt_json_pair(tmp_path: Path) -> None:
    torch.save(_weights(3), tmp_path / "model_0100.pt")
    meta = {
        "run_name": "nav_run",
        "epoch": 100,
        "agent_step": 123456,
        "score": 0.75,
        "model_info": {"type": "lstm", "hidden": 128},
        "evals": {"navigation": {"maze": 0.5}, "combat": 0.25},
    }
    (tmp_path / "model_0100.json").write_text(json.dumps(meta))
    assert detect_format(str(tmp_path / "model_0100.pt")) == "pt+json"
    artifact = ray_ckpt.load_from_uri(str(tmp_path / "model_0100.pt"))
    assert (artifact.run_name, artifact.step) == ("nav_run", 100)
    assert artifact.metrics == {
        "epoch": 100.0,
        "agent_step": 123456.0,
        "score": 0.75,
        "evals/navigation/maze": 0.5,
        "evals/combat": 0.25,
    }
    assert artifact.metadata["legacy_metadata"]["model_info"] == {"type": "lstm", "hidden": 128}


def test_pt_without_metadata_run_and_step_from_name(tmp_path: Path) -> None:
    (tmp_path / "exp3").mkdir()
    torch.save(_weights(), tmp_path / "exp3" / "policy_step_40.pt")
    torch.save(_weights(), tmp_path / "exp3" / "ckpt-7.pt")
    a = read_legacy(str(tmp_path / "exp3" / "policy_step_40.pt"))
    b = read_legacy(str(tmp_path / "exp3" / "ckpt-7.pt"))
    assert (a.run_name, a.step, a.format) == ("policy", 40, "pt")
    assert (b.run_name, b.step) == ("exp3", 7)  # nothing before the number: the directory names the run


def test_safetensors_with_metrics_json(tmp_path: Path) -> None:
    sd = _weights(4)
    save_file(sd, str(tmp_path / "agent_200.safetensors"), metadata={"framework": "x"})
    (tmp_path / "agent_200.metrics.json").write_text(json.dumps({"step": 200, "loss": 0.1, "eval": {"return": 5}}))
    artifact = ray_ckpt.load_from_uri(str(tmp_path / "agent_200.safetensors"))
    assert (artifact.run_name, artifact.step, artifact.source_format) == ("agent", 200, "safetensors")
    assert artifact.metrics == {"loss": 0.1, "eval/return": 5.0}
    assert artifact.metadata["safetensors_metadata"] == {"framework": "x"}
    for key, value in sd.items():
        torch.testing.assert_close(artifact.state_dict[key], value)


def test_training_dict_splits_weights_optimizer_and_counters(tmp_path: Path) -> None:
    model = TinyPolicy()
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    torch.save(
        {"model_state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 9, "tag": "a"},
        tmp_path / "train.pt",
    )
    ckpt = read_legacy(str(tmp_path / "train.pt"))
    assert set(ckpt.state_dict) == set(model.state_dict())
    assert set(ckpt.trainer_state) == {"optimizer"} and ckpt.trainer_state["optimizer"]["state"]
    assert ckpt.metrics == {"epoch": 9.0} and ckpt.metadata["tag"] == "a"
    assert ckpt.step == 9


def test_whole_model_pickle_refused_without_trust(tmp_path: Path) -> None:
    model = TinyPolicy(obs_dim=3)
    torch.save(model, tmp_path / "whole:v2.pt")
    with pytest.raises(UntrustedPickleError) as excinfo:
        ray_ckpt.load_from_uri(str(tmp_path / "whole:v2.pt"))
    message = str(excinfo.value)
    assert "whole:v2.pt" in message and "trust_pickle=True" in message
    assert isinstance(excinfo.value, PermissionError)


def test_whole_model_pickle_with_trust(tmp_path: Path) -> None:
    model = TinyPolicy(obs_dim=3)
    torch.save(model, tmp_path / "whole.pt")
    artifact = ray_ckpt.load_from_uri(str(tmp_path / "whole.pt"), trust_pickle=True)
    assert artifact.source_format == "pickle"
    assert artifact.architecture is not None
    assert artifact.architecture.class_path == "ray_ckpt.interop.mock.TinyPolicy"
    torch.testing.assert_close(artifact.state_dict["body.weight"], model.body.weight.detach())
    built = artifact.instantiate()
    assert isinstance(built, TinyPolicy) and built.obs_dim == 3


def test_pickle_refusal_is_not_cached_as_success(tmp_path: Path) -> None:
    torch.save(TinyPolicy(), tmp_path / "m.pt")
    with pytest.raises(UntrustedPickleError):
        read_legacy(str(tmp_path / "m.pt"))
    assert read_legacy(str(tmp_path / "m.pt"), trust_pickle=True).model is not None
    with pytest.raises(UntrustedPickleError):  # a trusted load in the cache does not open the gate
        read_legacy(str(tmp_path / "m.pt"))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("junk.pt", b"not a checkpoint at all"),
        ("cut.pt", None),
        ("bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
    ],
)
def test_corrupt_files_raise_naming_the_file(tmp_path: Path, name: str, data: bytes | None) -> None:
    path = tmp_path / name
    if data is None:
        torch.save(_weights(), path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError, match=name):
        ray_ckpt.load_from_uri(str(path))


def test_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(legacy.LegacyFormatError, match="list.pt"):
        read_legacy(str(tmp_path / "list.pt"))
    with pytest.raises(FileNotFoundError):
        read_legacy(str(tmp_path / "missing.pt"))


def test_find_legacy_files_skips_companions_and_ray_ckpt_runs(tmp_path: Path) -> None:
    torch.save(_weights(), tmp_path / "a:v1.pt")
    (tmp_path / "a:v1.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    save_file(_weights(), str(tmp_path / "sub" / "b.safetensors"))
    (tmp_path / "sub" / "b.metrics.json").write_text("{}")
    ray_ckpt.CheckpointStore(str(tmp_path / "runs"), "r").save(1, {"w": torch.ones(1)})
    found = legacy.find_legacy_files(str(tmp_path))
    assert [f.rsplit("/", 1)[1] for f in found] == ["a:v1.pt", "b.safetensors"]
