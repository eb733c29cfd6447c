"""model_architecture.json is data, never a code path: payloads are refused before anything runs.

Every payload goes through each entry point that builds a model (``CheckpointStore.instantiate``,
``load_from_uri(...).instantiate()``, legacy artifacts, ``migrate`` and the ``ray-ckpt migrate``
command), with the default allow-list and with ``allowed_architecture_prefixes=["torch.nn"]``;
a payload that ran would create a flag file. The positive tests show what is allowed, and when.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ray_ckpt
from ray_ckpt import ArchitectureNotAllowedError, CheckpointStore, CorruptCheckpointError
from ray_ckpt.cli.main import main
from ray_ckpt.core.architecture import (
    ARCHITECTURE_FILE,
    DEFAULT_ARCHITECTURE_PREFIXES,
    Architecture,
    forget_trusted_modules,
    served_prefixes,
    trust_module,
    trusted_modules,
)
from ray_ckpt.interop import artifact, legacy
from ray_ckpt.interop import migrate as migrate_module
from ray_ckpt.interop.legacy import LegacyCheckpoint
from ray_ckpt.interop.migrate import MIGRATED, migrate
from ray_ckpt.interop.mock import TinyPolicy
from tests.models import TiedLM, TinyMLP

REFUSED = (ArchitectureNotAllowedError, CorruptCheckpointError)
ALLOWED_SETTINGS = [pytest.param(None, id="default"), pytest.param(["torch.nn"], id="torch.nn")]


@pytest.fixture(autouse=True)
def nothing_trusted() -> Iterator[None]:
    """Each test starts in a process that trusts no module (and the others' trust comes back after)."""
    before = trusted_modules()
    forget_trusted_modules()
    yield
    forget_trusted_modules()
    for module in before:
        trust_module(module)


class _TouchOnUnpickle:
    """Unpickling this runs ``touch <flag>`` (what a hostile pickle does)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.flag}",))


def _payload(name: str, tmp_path: Path) -> dict[str, Any]:
    """One hostile model_architecture.json (as a JSON object) whose execution creates ``flag``."""
    flag = tmp_path / "flag"
    touch = f"touch {flag}"
    if name == "walk-to-os.system":
        return {"class_path": "torch.nn.functional.torch.os.system", "config": {"command": touch}}
    if name == "os.system":
        return {"class_path": "os.system", "config": {"command": touch}}
    if name == "subprocess.Popen":
        return {"class_path": "subprocess.Popen", "config": {"args": ["touch", str(flag)]}}
    if name == "builtins.eval":
        return {"class_path": "builtins.eval", "config": {"source": f"open({str(flag)!r}, 'w')"}}
    if name == "builtins.exec":
        return {"class_path": "builtins.exec", "config": {"source": f"open({str(flag)!r}, 'w')"}}
    if name == "walk-to-torch.load":
        payload = tmp_path / "payload.pkl"
        payload.write_bytes(pickle.dumps(_TouchOnUnpickle(flag)))
        return {
            "class_path": "torch.nn.functional.torch.load",
            "config": {"f": str(payload), "weights_only": False},
        }
    if name == "config_class-os.system":
        return {"class_path": "torch.nn.Linear", "config_class": "os.system", "config": {"command": touch}}
    if name == "function-under-torch.nn":
        return {"class_path": "torch.nn.functional.relu", "config": {"input": 1}}
    if name == "non-module-class-under-torch.nn":
        return {"class_path": "torch.nn.Parameter", "config": {}}
    if name == "empty-component":
        return {"class_path": "torch.nn..Linear", "config": {"in_features": 1, "out_features": 1}}
    if name == "empty":
        return {"class_path": "", "config": {}}
    if name == "trailing-dot":
        return {"class_path": "torch.nn.", "config": {}}
    if name == "not-a-string":
        return {"class_path": 3, "config": {}}
    if name == "list":
        return {"class_path": ["torch.nn", "Linear"], "config": {}}
    raise AssertionError(name)


PAYLOADS = [
    "walk-to-os.system",
    "os.system",
    "subprocess.Popen",
    "builtins.eval",
    "builtins.exec",
    "walk-to-torch.load",
    "config_class-os.system",
    "function-under-torch.nn",
    "non-module-class-under-torch.nn",
    "empty-component",
    "empty",
    "trailing-dot",
    "not-a-string",
    "list",
]


def _run_with_file(root: Path, content: dict[str, Any] | bytes, run: str = "run") -> CheckpointStore:
    """A run with one checkpoint and the given model_architecture.json, written as raw bytes."""
    store = CheckpointStore(str(root), run)
    store.save(1, {"weight": torch.ones(1, 1), "bias": torch.zeros(1)})
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    Path(store.storage.local_path(ARCHITECTURE_FILE)).write_bytes(data)
    return store


def _assert_not_run(tmp_path: Path) -> None:
    assert not (tmp_path / "flag").exists(), "the payload ran"


# ---------------------------------------------------------------------------------------------
# Payloads, through every entry point that builds a model.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("allowed", ALLOWED_SETTINGS)
@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_refused_by_store_instantiate(tmp_path: Path, name: str, allowed: list[str] | None) -> None:
    _run_with_file(tmp_path / "runs", _payload(name, tmp_path))
    reader = CheckpointStore(str(tmp_path / "runs"), "run", allowed_architecture_prefixes=allowed)
    with pytest.raises(REFUSED, match="model_architecture.json"):
        reader.instantiate(1)
    _assert_not_run(tmp_path)


@pytest.mark.parametrize("allowed", ALLOWED_SETTINGS)
@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_refused_by_load_from_uri(tmp_path: Path, name: str, allowed: list[str] | None) -> None:
    _run_with_file(tmp_path / "runs", _payload(name, tmp_path))
    with pytest.raises(REFUSED, match="model_architecture.json"):
        ray_ckpt.load_from_uri(f"{tmp_path}/runs/run:v1", allowed_architecture_prefixes=allowed).instantiate()
    _assert_not_run(tmp_path)


@pytest.mark.parametrize("allowed", ALLOWED_SETTINGS)
@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_refused_by_build(tmp_path: Path, name: str, allowed: list[str] | None) -> None:
    raw = _payload(name, tmp_path)
    arch = Architecture(raw["class_path"], raw["config"], raw.get("config_class"))
    with pytest.raises(REFUSED):
        arch.build(allowed)
    with pytest.raises(REFUSED):
        arch.resolve(allowed)
    _assert_not_run(tmp_path)


def _hostile_legacy(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A legacy file whose reader returns a checkpoint carrying a hostile architecture.

    Legacy architectures come from pickled modules; a spoofed class name is simulated by
    handing the payload's architecture straight out of ``read_legacy``.
    """
    raw = _payload(name, tmp_path)
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    path = src / "hostile:v1.pt"
    torch.save({"weight": torch.ones(1, 1)}, path)
    real = legacy.read_legacy

    def fake_read_legacy(location: str, **kwargs: Any) -> LegacyCheckpoint:
        ckpt = real(location, **kwargs)
        ckpt.architecture = Architecture(raw["class_path"], raw["config"], raw.get("config_class"))
        return ckpt

    monkeypatch.setattr(legacy, "read_legacy", fake_read_legacy)
    monkeypatch.setattr(migrate_module, "read_legacy", fake_read_legacy)
    return path


@pytest.mark.parametrize("allowed", ALLOWED_SETTINGS)
@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_refused_by_legacy_artifact(
    tmp_path: Path, name: str, allowed: list[str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _hostile_legacy(tmp_path, name, monkeypatch)
    with pytest.raises(REFUSED):
        artifact.load_legacy(str(path), allowed_architecture_prefixes=allowed).instantiate()
    _assert_not_run(tmp_path)


@pytest.mark.parametrize("allowed", ALLOWED_SETTINGS)
@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_not_recorded_by_migrate(
    tmp_path: Path, name: str, allowed: list[str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hostile_legacy(tmp_path, name, monkeypatch)
    report = migrate(str(tmp_path / "src"), str(tmp_path / "dst"), allowed_architecture_prefixes=allowed)
    assert [item.action for item in report.items] == [MIGRATED]
    assert "model_architecture.json not written" in report.items[0].detail
    assert not (tmp_path / "dst" / "hostile" / ARCHITECTURE_FILE).exists()
    _assert_not_run(tmp_path)


@pytest.mark.parametrize("extra", [pytest.param([], id="default"), pytest.param(["torch.nn"], id="torch.nn")])
@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_not_recorded_by_cli_migrate(
    tmp_path: Path, name: str, extra: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _hostile_legacy(tmp_path, name, monkeypatch)
    argv = ["migrate", str(tmp_path / "src"), str(tmp_path / "dst"), "--json"]
    argv += [arg for prefix in extra for arg in ("--allow-architecture", prefix)]
    assert main(argv) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert [i["action"] for i in items] == [MIGRATED]
    assert not (tmp_path / "dst" / "hostile" / ARCHITECTURE_FILE).exists()
    _assert_not_run(tmp_path)


@pytest.mark.parametrize("config", [[1, 2], "x", {1: 2}])
def test_config_must_be_an_object_with_string_keys(config: Any) -> None:
    with pytest.raises(CorruptCheckpointError, match="config"):
        Architecture("torch.nn.Linear", config).build()


@pytest.mark.parametrize(
    "content",
    [
        b'{"class_path": "torch.nn.Linear", "config": {"in_features": 1}, "format_version": 99}',
        b'{"class_path": "torch.nn.Linear", "config_class": "torch..X"}',
        b'{"class_path": "torch.nn.Linear", "config_class": ""}',
        b'{"class_path": "torch.nn.Linear", "config": "in_features=1"}',
        b'{"class_path": "torch.nn.Linear.", "config": {}}',
        b'{"class_path": "torch nn.Linear", "config": {}}',
    ],
)
def test_malformed_files_are_corrupt_at_read(tmp_path: Path, content: bytes) -> None:
    store = _run_with_file(tmp_path / "runs", content)
    with pytest.raises(CorruptCheckpointError, match="model_architecture.json"):
        store.read_architecture()


# ---------------------------------------------------------------------------------------------
# What is allowed, and when.
# ---------------------------------------------------------------------------------------------
def _linear_run(root: Path) -> tuple[CheckpointStore, torch.nn.Linear]:
    model = torch.nn.Linear(3, 2)
    store = CheckpointStore(str(root), "lin")
    store.save(1, model.state_dict())
    Path(store.storage.local_path(ARCHITECTURE_FILE)).write_text(
        json.dumps({"class_path": "torch.nn.Linear", "config": {"in_features": 3, "out_features": 2}})
    )
    return store, model


def test_torch_nn_class_builds_by_default(tmp_path: Path) -> None:
    store, model = _linear_run(tmp_path / "runs")
    x = torch.randn(4, 3)
    assert torch.equal(store.instantiate(1)(x), model(x))
    assert torch.equal(ray_ckpt.load_from_uri(f"{tmp_path}/runs/lin:v1").instantiate()(x), model(x))
    assert trusted_modules() == frozenset()  # nothing needed trusting
    # a configured list is exactly that list: [] refuses even torch.nn
    with pytest.raises(ArchitectureNotAllowedError, match=r"\[\]"):
        CheckpointStore(str(tmp_path / "runs"), "lin", allowed_architecture_prefixes=[]).instantiate(1)


def test_own_class_needs_an_explicit_prefix_or_a_live_write(tmp_path: Path) -> None:
    writer = CheckpointStore(str(tmp_path / "runs"), "own")
    writer.write_architecture("tests.models.TinyMLP", {"d_in": 2, "hidden": 3, "d_out": 1})  # a string: no trust
    writer.save(1, TinyMLP(2, 3, 1).state_dict())
    assert trusted_modules() == frozenset()
    with pytest.raises(ArchitectureNotAllowedError, match=r"tests\.models\.TinyMLP.*--allow-architecture"):
        writer.instantiate(1)
    with pytest.raises(ArchitectureNotAllowedError):
        ray_ckpt.load_from_uri(f"{tmp_path}/runs/own:v1").instantiate()
    with pytest.raises(ArchitectureNotAllowedError):  # torch.nn alone does not cover it
        CheckpointStore(str(tmp_path / "runs"), "own", allowed_architecture_prefixes=["torch.nn"]).instantiate(1)
    for allowed in (["tests.models"], ["tests.models."], ["tests"], ["tests.models.TinyMLP"]):
        reader = CheckpointStore(str(tmp_path / "runs"), "own", allowed_architecture_prefixes=allowed)
        assert isinstance(reader.instantiate(1), TinyMLP)
    # a live class written in this process trusts its module (exactly that module)
    other = CheckpointStore(str(tmp_path / "runs"), "live")
    other.write_architecture(TiedLM(vocab=5, dim=2), {"vocab": 5, "dim": 2})
    assert trusted_modules() == frozenset({"tests.models"})
    assert isinstance(writer.instantiate(1), TinyMLP)
    assert isinstance(ray_ckpt.load_from_uri(f"{tmp_path}/runs/own:v1").instantiate(), TinyMLP)
    # an explicit list still means exactly that list
    with pytest.raises(ArchitectureNotAllowedError):
        CheckpointStore(str(tmp_path / "runs"), "own", allowed_architecture_prefixes=["torch.nn"]).instantiate(1)


def test_exact_class_prefix_allows_only_that_class(tmp_path: Path) -> None:
    writer = CheckpointStore(str(tmp_path / "runs"), "tied")
    writer.write_architecture("tests.models.TiedLM", {"vocab": 5, "dim": 2})
    writer.save(1, TiedLM(5, 2).state_dict())
    reader = CheckpointStore(str(tmp_path / "runs"), "tied", allowed_architecture_prefixes=["tests.models.TinyMLP"])
    with pytest.raises(ArchitectureNotAllowedError, match="TiedLM"):
        reader.instantiate(1)


def test_transformers_model_builds_by_default(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    store = CheckpointStore(str(tmp_path / "runs"), "hf")
    arch = store.write_architecture(model)
    assert arch.config_class == "transformers.models.gpt2.configuration_gpt2.GPT2Config"
    store.save(1, model.state_dict())
    forget_trusted_modules()  # the defaults alone allow transformers
    built = store.instantiate(1).eval()
    assert isinstance(built, transformers.GPT2LMHeadModel)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, model(ids).logits)
    # the config class must be a PretrainedConfig, not any class under an allowed prefix
    bad = Architecture(arch.class_path, {"in_features": 1, "out_features": 1}, "torch.nn.Linear")
    with pytest.raises(ArchitectureNotAllowedError, match="PretrainedConfig"):
        bad.build()


def test_mock_artifact_builds_by_default() -> None:
    model = ray_ckpt.load_from_uri("mock://tiny").instantiate()
    assert isinstance(model, TinyPolicy)


REEXPORT = "from tests.models import TinyMLP  # re-exported: defined elsewhere\n"


def test_class_defined_outside_the_allowed_module_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rckpt_reexport.py").write_text(REEXPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rckpt_reexport", raising=False)
    arch = Architecture("rckpt_reexport.TinyMLP", {})
    with pytest.raises(ArchitectureNotAllowedError, match="defined in 'tests.models'"):
        arch.build(["rckpt_reexport"])
    assert isinstance(arch.build(["rckpt_reexport", "tests.models"]), TinyMLP)


def test_package_scripts_are_never_allowed() -> None:
    with pytest.raises(ArchitectureNotAllowedError, match="outside"):
        Architecture("torch.nn.__main__.Net").build(["torch"])


def test_missing_module_or_attribute_under_an_allowed_prefix_is_refused() -> None:
    with pytest.raises(ArchitectureNotAllowedError, match="importable"):
        Architecture("torch.nn.no_such_module.Net").build()
    with pytest.raises(ArchitectureNotAllowedError, match="not a class"):
        Architecture("torch.nn.NoSuchNet").build()


def test_nested_and_local_classes_are_refused_when_described(tmp_path: Path) -> None:
    class Local(torch.nn.Module):
        pass

    store = CheckpointStore(str(tmp_path / "runs"), "local")
    with pytest.raises(ValueError, match="nested or local"):
        store.write_architecture(Local())
    assert not store.storage.exists(ARCHITECTURE_FILE)
    assert trusted_modules() == frozenset()


def test_legacy_pickle_class_is_not_trusted(tmp_path: Path) -> None:
    torch.save(TinyPolicy(), tmp_path / "whole.pt")
    artifact = ray_ckpt.load_from_uri(str(tmp_path / "whole.pt"), trust_pickle=True)
    assert artifact.architecture is not None
    assert isinstance(artifact.instantiate(), TinyPolicy)  # the unpickled model itself, nothing rebuilt
    assert trusted_modules() == frozenset()
    with pytest.raises(ArchitectureNotAllowedError):
        artifact.architecture.build()
    with pytest.raises(ArchitectureNotAllowedError):  # a configured list refuses it up front
        ray_ckpt.load_from_uri(str(tmp_path / "whole.pt"), trust_pickle=True, allowed_architecture_prefixes=["x"])


def test_cli_migrate_records_an_architecture_only_when_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    torch.save(TinyPolicy(), src / "pol:v1.pt")
    assert main(["migrate", str(src), str(tmp_path / "refused"), "--trust-pickle"]) == 0
    assert "--allow-architecture" in capsys.readouterr().out
    assert not (tmp_path / "refused" / "pol" / ARCHITECTURE_FILE).exists()
    argv = ["migrate", str(src), str(tmp_path / "dst"), "--trust-pickle"]
    assert main([*argv, "--allow-architecture", "ray_ckpt.interop.mock"]) == 0
    assert json.loads((tmp_path / "dst" / "pol" / ARCHITECTURE_FILE).read_text())["class_path"] == (
        "ray_ckpt.interop.mock.TinyPolicy"
    )
    built = ray_ckpt.load_from_uri(
        f"{tmp_path}/dst/pol:v1", allowed_architecture_prefixes=["ray_ckpt.interop.mock"]
    ).instantiate()
    assert isinstance(built, TinyPolicy)
    capsys.readouterr()
    assert main(["migrate", str(src), str(tmp_path / "x"), "--allow-architecture", ""]) == 2


def test_served_prefixes() -> None:
    live = Architecture.describe(TinyMLP)
    assert served_prefixes(None, live) == [*DEFAULT_ARCHITECTURE_PREFIXES, "tests.models"]
    assert served_prefixes(["mine"], live) == ["mine"]  # a configured list is served unchanged
    forget_trusted_modules()
    assert served_prefixes(None, Architecture.describe("tests.models.TinyMLP")) is None  # a string trusts nothing


# ---------------------------------------------------------------------------------------------
# The checkpointer serves a registered class's module to eval clients in other processes.
# ---------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("ray_session")
def test_register_reaches_eval_clients_in_other_processes(tmp_path: Path, run_name: str) -> None:
    import ray

    @ray.remote(num_cpus=0)
    class Evaluator:
        def __init__(self, run_name: str) -> None:
            self.ev = ray_ckpt.EvalClient(run_name)

        def build(self, step: int) -> str:
            try:
                return type(self.ev.load_model(step)).__name__
            except ArchitectureNotAllowedError:
                return "refused"

    config = ray_ckpt.CheckpointConfig(storage_uri=str(tmp_path / "store"), run_name=run_name)
    handle = ray_ckpt.start_checkpointer(config)
    try:
        CheckpointStore(config=config).write_architecture("tests.models.TinyMLP", {"d_in": 2, "hidden": 3, "d_out": 1})
        ray_ckpt.WorkerClient(run_name, 0, 1).save(1, TinyMLP(2, 3, 1).state_dict(), blocking=True)
        evaluator = Evaluator.remote(run_name)  # started before register
        assert ray.get(evaluator.build.remote(1)) == "refused"  # a string in the file trusts nothing
        handle.register(TinyMLP(2, 3, 1), {"d_in": 2, "hidden": 3, "d_out": 1})
        assert handle.config.allowed_architecture_prefixes == [*DEFAULT_ARCHITECTURE_PREFIXES, "tests.models"]
        assert ray.get(evaluator.build.remote(1)) == "TinyMLP"
        assert ray.get(Evaluator.remote(run_name).build.remote(1)) == "TinyMLP"
    finally:
        handle.shutdown()
