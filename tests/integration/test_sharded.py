"""Sharded training state end to end: FSDP2 / TP / FSDP x TP ranks (real gloo groups in Ray actors).

Each rank hands over only its local shards (DTensors as ``model.state_dict()`` and
``get_state_dict`` give them); the committed step holds full tensors in Hugging Face layout, which
``CheckpointStore.load``, ``from_pretrained`` and DCP's HF reader read; loads reshard into any
world size and placement, bit-exact. One set of four processes serves every world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

import ray_ckpt
from ray_ckpt import CheckpointConfig, CheckpointStore
from tests.integration.sharded_ranks import ShardedRank, free_port, tiny_llama_config

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


@pytest.fixture(scope="module")
def ranks(ray_session: str) -> Any:
    actors = [ShardedRank.remote() for _ in range(4)]
    yield actors
    for actor in actors:
        ray.kill(actor)


def group(ranks: list[Any], world: int, layout: str, seed: int = 0) -> list[Any]:
    port = free_port()
    members = ranks[:world]
    ray.get([r.join.remote(i, world, port, layout, seed) for i, r in enumerate(members)], timeout=180)
    return members


def full_of(members: list[Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return ray.get([r.full.remote() for r in members], timeout=120)[0]


def assert_same(got: dict[str, Any], want: dict[str, np.ndarray], what: str) -> None:
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:5])
    for key, value in want.items():
        have = got[key].numpy() if isinstance(got[key], torch.Tensor) else got[key]
        assert have.dtype == value.dtype and have.shape == value.shape, (what, key)
        assert have.tobytes() == value.tobytes(), (what, key)


def flat_trainer(state: Any) -> dict[str, np.ndarray]:
    return {f"{fqn}.{n}": v.numpy() for fqn, e in state["optim"]["state"].items() for n, v in e.items()}


@pytest.mark.parametrize("write_mode", ["direct", "gather"])
def test_fsdp2_save_is_hf_layout_and_reshards_to_any_world_size(
    tmp_path: Path, run_name: str, ranks: list[Any], write_mode: str
) -> None:
    config = CheckpointConfig(
        storage_uri=str(tmp_path), run_name=run_name, write_mode=write_mode, max_shard_size="20KB", save_timeout_s=120
    )
    handle = ray_ckpt.start_checkpointer(config)
    from transformers import LlamaForCausalLM

    handle.register(LlamaForCausalLM(tiny_llama_config()))
    # 4 ranks train with FSDP2 and save their shards (no gather, no collective on the save path)
    four = group(ranks, 4, "fsdp")
    ray.get([r.train_step.remote() for r in four], timeout=120)  # Adam state exists (sharded like the model)
    model_full, optim_full = full_of(four)
    assert ray.get([r.save.remote(run_name, 1) for r in four], timeout=180) == [1] * 4
    store = CheckpointStore(config=config)
    manifest = store.read_manifest(1)
    assert len([n for n in manifest.files if n.startswith("model-")]) > 1  # really several HF shards
    assert all(not n.endswith(".safetensors") or n.startswith(("model", "trainer_state/")) for n in manifest.files)
    assert manifest.model["sharded"]  # the marker records each sharded tensor's chunks
    assert_same(store.load(1), model_full, "store.load")
    assert_same(flat_trainer(store.load_trainer_state(1)), optim_full, "trainer state")
    store.verify(1)
    # a self-contained HF folder: from_pretrained reads the step directory as it is
    step_dir = str(tmp_path / run_name / "checkpoints" / "step_000000001")
    hf = LlamaForCausalLM.from_pretrained(step_dir)
    assert_same({k: v.detach() for k, v in hf.state_dict().items()}, model_full, "from_pretrained")
    # DCP's own HF reader loads the step into DTensors of another layout (TP on 4 ranks)
    tp = group(ranks, 4, "tp", seed=1)
    via_dcp = ray.get([r.load_with_dcp_hf_reader.remote(step_dir) for r in tp], timeout=120)[0]
    assert_same(via_dcp, model_full, "DCP HuggingFaceStorageReader")
    # 4 -> 2 (FSDP2), optimizer state alike, then 2 saves and 2 -> 3 (uneven shards) and 2 -> 1
    two = group(ranks, 2, "fsdp", seed=2)
    assert ray.get([r.load.remote(run_name, 1) for r in two], timeout=120) == [1, 1]
    assert _same_pair(full_of(two), (model_full, optim_full))
    ray.get([r.train_step.remote() for r in two], timeout=120)
    model2, optim2 = full_of(two)
    assert ray.get([r.save.remote(run_name, 2) for r in two], timeout=180) == [2, 2]
    three = group(ranks, 3, "fsdp", seed=3)
    ray.get([r.load.remote(run_name, 2) for r in three], timeout=120)
    assert _same_pair(full_of(three), (model2, optim2))
    one = LlamaForCausalLM(tiny_llama_config())
    store.reload()
    target = one.state_dict()
    store.load(2, into=target)  # 2 -> 1: plain tensors filled in place
    assert_same({k: v.detach() for k, v in one.state_dict().items()}, model2, "2 -> 1")
    # FSDP -> FSDP x TP (a 2-D mesh: FSDP over dp, TP over tp), optimizer state alike
    mesh2d = group(ranks, 4, "fsdp_tp", seed=4)
    ray.get([r.load.remote(run_name, 2) for r in mesh2d], timeout=120)
    assert _same_pair(full_of(mesh2d), (model2, optim2))
    # ... and FSDP x TP saves too (its _StridedShard placements are plain boxes of the tensor)
    assert ray.get([r.save.remote(run_name, 3) for r in mesh2d], timeout=180) == [3] * 4
    store.reload()
    assert_same(store.load(3), model2, "FSDP x TP save")
    assert_same(flat_trainer(store.load_trainer_state(3)), optim2, "FSDP x TP trainer state")
    handle.shutdown()


def _same_pair(got: tuple[dict, dict], want: tuple[dict, dict]) -> bool:
    assert_same(got[0], want[0], "model")
    assert_same(got[1], want[1], "optimizer")
    return True


def test_non_blocking_sharded_save_and_wrong_targets(tmp_path: Path, run_name: str, ranks: list[Any]) -> None:
    config = CheckpointConfig(storage_uri=str(tmp_path), run_name=run_name, save_timeout_s=120)
    handle = ray_ckpt.start_checkpointer(config)
    two = group(ranks, 2, "fsdp")
    ray.get([r.train_step.remote() for r in two], timeout=120)
    model_full, _ = full_of(two)
    assert ray.get([r.save.remote(run_name, 5, False) for r in two], timeout=180) == [5, 5]  # snapshot, then write
    store = CheckpointStore(config=config)
    assert_same(store.load(5), model_full, "non-blocking")
    key = "model.layers.0.mlp.up_proj.weight"
    shape = tuple(model_full[key].shape)
    with pytest.raises(ValueError, match=rf"{key}: the checkpoint holds F32\[40, 32\], the target is F16"):
        store.load(5, into={key: torch.zeros(shape, dtype=torch.float16)})
    with pytest.raises(ValueError, match=rf"{key}: the checkpoint holds F32\[40, 32\], the target is F32\[40, 16\]"):
        store.load(5, into={key: torch.zeros(40, 16)})
    with pytest.raises(KeyError, match="nope"):
        store.load(5, into={"nope": torch.zeros(1)})
    # One flipped byte: a rank's resharding WorkerClient.load and EvalClient.load name file and tensor.
    name = max(n for n in store.read_manifest(5).files if n.startswith("model") and n.endswith(".safetensors"))
    path = tmp_path / run_name / "checkpoints" / "step_000000005" / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ray.exceptions.RayTaskError, match=f"{name}: checksum mismatch in tensor"):
        ray.get([r.load.remote(run_name, 5) for r in two], timeout=120)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=f"{name}: checksum mismatch in tensor"):
        ray_ckpt.EvalClient(run_name).load(5)
    handle.shutdown()
