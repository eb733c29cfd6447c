"""Hugging Face model folders both ways, with the real writers and readers.

Read: ``save_pretrained`` (sharded or not), ``huggingface_hub.save_torch_state_dict`` and DCP's
``HuggingFaceStorageWriter`` folders load as ONE checkpoint, local and on loopback S3; one shard
is refused naming the index. Write: a committed step exported by the CLI is a folder that
``AutoModelForCausalLM.from_pretrained`` reads with identical weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import ray_ckpt
from ray_ckpt import CheckpointStore
from ray_ckpt.cli.main import main
from ray_ckpt.core.architecture import Architecture, hf_config_files
from ray_ckpt.core.errors import CorruptCheckpointError
from ray_ckpt.interop.legacy import PartialCheckpointError, find_legacy_files
from ray_ckpt.interop.migrate import MIGRATED, import_checkpoint, migrate
from tests.models import TiedLM, TinyMLP

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

SHARD = "20KB"  # a tiny GPT-2 is ~250 KB: about ten shards


@pytest.fixture(scope="module")
def gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).eval()


def _reference(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _write(kind: str, model: Any, folder: Path) -> Path:
    """One model folder as each real writer writes it."""
    folder.mkdir(parents=True)
    if kind == "save_pretrained_sharded":
        model.save_pretrained(folder, max_shard_size=SHARD)
    elif kind == "save_pretrained":
        model.save_pretrained(folder)
    elif kind == "hub_sharded":
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict(model.state_dict(), folder, max_shard_size=SHARD)
    elif kind == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(path=str(folder)))  # no process group
    else:  # pragma: no cover
        raise AssertionError(kind)
    return folder


WRITERS = ["save_pretrained_sharded", "save_pretrained", "hub_sharded", "dcp"]


def _same_weights(loaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Every tensor loaded is the reference's; only the tied lm_head may be left out."""
    assert set(loaded) <= set(reference) and set(reference) - set(loaded) <= {"lm_head.weight"}
    for key, value in loaded.items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize("kind", WRITERS)
def test_load_from_uri_reads_each_writer_as_one_checkpoint(kind: str, gpt2: Any, tmp_path: Path) -> None:
    folder = _write(kind, gpt2, tmp_path / "model")
    reference = _reference(gpt2)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 if "sharded" in kind else len(shards) == 1
    artifact = ray_ckpt.load_from_uri(str(folder))
    assert artifact.source_format == "hf"
    _same_weights(artifact.state_dict, reference)
    if kind.startswith("save_pretrained"):  # config.json beside the weights: the model builds
        assert artifact.architecture is not None and artifact.architecture.class_path == "transformers.GPT2LMHeadModel"
        built = artifact.instantiate()
        for key, value in reference.items():
            assert torch.equal(built.state_dict()[key], value), key
    if (folder / "model.safetensors.index.json").exists():  # the index names the same checkpoint
        again = ray_ckpt.load_from_uri(str(folder / "model.safetensors.index.json"))
        assert set(again.state_dict) == set(artifact.state_dict)
    if len(shards) > 1:
        with pytest.raises(PartialCheckpointError, match=r"model\.safetensors\.index\.json"):
            ray_ckpt.load_from_uri(str(folder / shards[1]))


def test_a_shard_named_as_such_without_its_index_is_refused(gpt2: Any, tmp_path: Path) -> None:
    folder = _write("save_pretrained_sharded", gpt2, tmp_path / "model")
    (folder / "model.safetensors.index.json").unlink()
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    with pytest.raises(PartialCheckpointError, match=r"no index beside it.*model\.safetensors\.index\.json"):
        ray_ckpt.load_from_uri(str(shard))


def test_damaged_index_and_config_name_the_file(gpt2: Any, tmp_path: Path) -> None:
    folder = _write("save_pretrained_sharded", gpt2, tmp_path / "model")
    index = folder / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text(good[: len(good) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        ray_ckpt.load_from_uri(str(folder))
    data = json.loads(good)
    data["weight_map"]["transformer.wte.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match="not a file name beside the index"):
        ray_ckpt.load_from_uri(str(folder))
    index.write_text(good)
    (folder / "config.json").write_text('{"model_type": ')
    with pytest.raises(CorruptCheckpointError, match=r"config\.json"):
        ray_ckpt.load_from_uri(str(folder))
    (folder / "config.json").write_text("{}")
    first = sorted(folder.glob("model-*.safetensors"))[0]
    first.write_bytes(first.read_bytes()[:100])  # truncated shard
    with pytest.raises(CorruptCheckpointError, match=first.name):
        ray_ckpt.load_from_uri(str(folder))


@pytest.mark.parametrize("kind", ["save_pretrained_sharded", "hub_sharded", "dcp"])
def test_folders_on_s3(
    kind: str, gpt2: Any, tmp_path: Path, s3_bucket: tuple[str, dict[str, Any]], s3fs_client: Any
) -> None:
    bucket, options = s3_bucket
    folder = _write(kind, gpt2, tmp_path / "model")
    s3fs_client.put(str(folder), f"{bucket.removeprefix('s3://')}/models/{kind}", recursive=True)
    uri = f"{bucket}/models/{kind}"
    artifact = ray_ckpt.load_from_uri(uri, storage_options=options)
    _same_weights(artifact.state_dict, _reference(gpt2))
    shard = sorted(p.name for p in folder.glob("*.safetensors"))[-1]
    if kind != "dcp":  # DCP wrote one shard: a whole checkpoint in one file
        with pytest.raises(PartialCheckpointError, match="index"):
            ray_ckpt.load_from_uri(f"{uri}/{shard}", storage_options=options)
    indexed = ray_ckpt.load_from_uri(f"{uri}/model.safetensors.index.json", storage_options=options)
    assert set(indexed.state_dict) == set(artifact.state_dict)


def test_migrate_keeps_each_folder_whole(gpt2: Any, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write("save_pretrained_sharded", gpt2, src / "gpt-tiny")
    _write("hub_sharded", gpt2, src / "nested" / "hub-7")
    torch.save(TinyMLP().state_dict(), src / "mlp_3.pt")
    found = find_legacy_files(str(src))
    assert sorted(f.rsplit("/", 1)[1] for f in found) == ["gpt-tiny", "hub-7", "mlp_3.pt"]
    dst = tmp_path / "runs"
    report = migrate(str(src), str(dst))
    assert report.ok and [i.action for i in report.items] == [MIGRATED] * 3, report.items
    runs = sorted(p.name for p in dst.iterdir())
    assert runs == ["gpt-tiny", "hub", "mlp"]  # one run per folder, never one per shard
    assert [i.step for i in CheckpointStore(str(dst), "gpt-tiny").list()] == [0]
    assert [i.step for i in CheckpointStore(str(dst), "hub").list()] == [7]
    model = ray_ckpt.load_from_uri(f"{dst}/gpt-tiny").instantiate()
    for key, value in _reference(gpt2).items():
        assert torch.equal(model.state_dict()[key], value), key
    assert CheckpointStore(str(dst), "gpt-tiny").read_architecture().config_class == "transformers.GPT2Config"
    again = migrate(str(src), str(dst))
    assert again.ok and {i.action for i in again.items} == {"skipped"}


def test_import_then_export_round_trips_through_from_pretrained(
    gpt2: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _write("save_pretrained_sharded", gpt2, tmp_path / "hf")
    run = tmp_path / "runs" / "imported"
    assert main(["import", str(folder), str(run), "--step", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["action"] == MIGRATED and result["step"] == 5 and result["nbytes"] > 0
    assert [i.step for i in CheckpointStore(str(run.parent), "imported").list()] == [5]
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    assert main(["import", str(shard), str(run), "--json"]) == 1
    error = json.loads(capsys.readouterr().out)
    assert error["type"] == "PartialCheckpointError" and "model.safetensors.index.json" in error["error"]

    out = tmp_path / "exported"
    assert main(["export", f"{run}:v5", str(out)]) == 0
    assert "exported step 5" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for key, value in _reference(gpt2).items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert main(["export", f"{run}:v5", str(out)]) == 2  # not empty: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_a_saved_step_exports_from_s3(
    gpt2: Any, tmp_path: Path, s3_bucket: tuple[str, dict[str, Any]], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, options = s3_bucket
    store = CheckpointStore(f"{bucket}/runs", "gpt", options, max_shard_size=40_000)
    store.write_architecture(gpt2, gpt2.config.to_dict())  # a config dict: the config class is kept
    store.save(3, gpt2.state_dict(), {"loss": 1.5})
    out = tmp_path / "from-s3"
    monkeypatch.setenv("RAY_CKPT_STORAGE_OPTIONS", json.dumps(options))
    code = main(["export", f"{bucket}/runs/gpt:latest", str(out), "--json"])
    assert code == 0, capsys.readouterr()
    payload = json.loads(capsys.readouterr().out)
    assert payload["step"] == 3 and "config.json" in payload["files"]
    assert len([n for n in payload["files"] if n.endswith(".safetensors")]) > 1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, gpt2(ids).logits)


def test_write_architecture_keeps_the_config_class(gpt2: Any, tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), "hf")
    arch = store.write_architecture(gpt2, gpt2.config.to_dict())
    assert arch.config_class == "transformers.models.gpt2.configuration_gpt2.GPT2Config"
    store.save(1, gpt2.state_dict())
    built = ray_ckpt.load_from_uri(f"{tmp_path}/hf").instantiate()
    assert isinstance(built, transformers.GPT2LMHeadModel)
    # a class path given as a string, with the config's model_type: the config class is looked up
    by_name = Architecture.describe("transformers.GPT2LMHeadModel", gpt2.config.to_dict())
    assert by_name.config_class == "transformers.models.gpt2.configuration_gpt2.GPT2Config"
    assert isinstance(by_name.build(), transformers.GPT2LMHeadModel)


def test_hf_config_files(gpt2: Any, tmp_path: Path) -> None:
    files = hf_config_files(Architecture.describe(gpt2))
    assert sorted(files) == ["config.json", "generation_config.json"]
    gpt2.save_pretrained(tmp_path / "ref")
    ours, theirs = json.loads(files["config.json"]), json.loads((tmp_path / "ref" / "config.json").read_text())
    differ = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    assert differ <= {"dtype"}, differ  # save_pretrained records the dtype of the weights it writes
    ref_generation = json.loads((tmp_path / "ref" / "generation_config.json").read_text())
    assert json.loads(files["generation_config.json"]) == ref_generation
    assert hf_config_files(Architecture.describe(TinyMLP())) == {}
    assert hf_config_files(Architecture.describe(torch.nn.Linear(8, 2))) == {}


def test_register_without_config_records_constructor_arguments() -> None:
    assert Architecture.describe(torch.nn.Linear(8, 2)).config == {"in_features": 8, "out_features": 2}
    built = Architecture.describe(torch.nn.Linear(8, 2)).build()
    assert built.weight.shape == (2, 8)
    with pytest.raises(TypeError, match=r"\['in_features', 'out_features'\]"):
        Architecture.describe(torch.nn.Linear)  # a class: nothing to read them from
    with pytest.raises(TypeError, match="builds other tensors"):
        Architecture.describe(TinyMLP(3, 5, 2))  # no attributes hold d_in/hidden/d_out
    with pytest.raises(TypeError, match="builds other tensors"):
        Architecture.describe(TiedLM(vocab=5, dim=2))
    assert Architecture.describe(TinyMLP()).config == {}  # the defaults build the same model


def test_import_checkpoint_api(gpt2: Any, tmp_path: Path) -> None:
    folder = _write("dcp", gpt2, tmp_path / "dcp_out")
    item = import_checkpoint(str(folder), str(tmp_path / "runs" / "d"), step=11)
    assert item.ok and item.step == 11 and item.run_name == "d"
    loaded = CheckpointStore(str(tmp_path / "runs"), "d").load(11)
    _same_weights(loaded, _reference(gpt2))
    assert import_checkpoint(str(folder), str(tmp_path / "runs" / "d"), step=11).action == "skipped"


def test_inspect_and_verify_a_folder(gpt2: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _write("save_pretrained_sharded", gpt2, tmp_path / "model")
    assert main(["inspect", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "Hugging Face folder" and len(data["tensors"]) == len(gpt2.state_dict()) - 1
    assert data["architecture"]["class_path"] == "transformers.GPT2LMHeadModel"
    assert main(["verify", str(folder / "model.safetensors.index.json")]) == 0
    capsys.readouterr()
    shard = sorted(folder.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-4])  # truncated
    assert main(["verify", str(folder), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert not result["ok"] and shard.name in result["results"][0]["error"]
