"""Bad input: each case raises a clear error naming the key, file or field, and nothing committed
is lost. Only what tests/test_*.py and tests/integration/test_checkpointer.py do not already
cover is here (docs/RELIABILITY.md maps every case to its test).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ray_ckpt import (
    ArchitectureNotAllowedError,
    CheckpointConfig,
    CheckpointExistsError,
    CheckpointStore,
    ConfigError,
    CorruptCheckpointError,
    load_from_uri,
)
from ray_ckpt.core.format.digests import Checksum
from ray_ckpt.core.planner import MODEL, RankState, SavePlan, TensorMeta, plan_save
from ray_ckpt.core.uri import MAX_RUN_NAME_LENGTH
from ray_ckpt.distributed.checkpointer import compare_replicas
from tests.reliability.faults import SHARD_LIMIT, assert_state, tensors_for

RUN = "bad"
MARKER = "checkpoint.json"


def _store(root: Path, **options: Any) -> CheckpointStore:
    return CheckpointStore(str(root), run_name=RUN, metric_name="loss", max_shard_size=SHARD_LIMIT, **options)


def _step_dir(store: CheckpointStore, step: int) -> Path:
    return Path(store.storage.local_path(f"checkpoints/step_{step:09d}"))


def _assert_nothing_lost(store: CheckpointStore, steps: list[int]) -> None:
    fresh = CheckpointStore(store.config.storage_uri, run_name=store.run_name, metric_name="loss")
    assert [i.step for i in fresh.list()] == steps
    for step in steps:
        fresh.verify(step)
        assert_state(step, fresh.load(step))
    on_disk = sorted(p.name for p in Path(store.storage.local_path("checkpoints")).iterdir())
    assert on_disk == [f"step_{s:09d}" for s in steps], on_disk


# ---------------------------------------------------------------------------------------------
# Bad saves next to a committed checkpoint: refused naming the culprit, the committed one intact.
# ---------------------------------------------------------------------------------------------
class Opaque:
    """Not a tensor, not a container, not a JSON scalar."""


BAD_SAVES: list[tuple[str, dict[str, Any], type[BaseException], str]] = [
    ("object in a state dict", {"state_dict": {"w": torch.ones(2), "head": Opaque()}}, TypeError, "head"),
    (
        "object nested deep",
        {"state_dict": {"w": torch.ones(2), "opt": {"s": [1, {"f": Opaque()}]}}},
        TypeError,
        r"opt\.s\.1\.f",
    ),
    ("a set", {"state_dict": {"w": torch.ones(2), "tags": {"a", "b"}}}, TypeError, "tags"),
    ("meta tensor (no data)", {"state_dict": {"w": torch.empty(3, device="meta")}}, TypeError, "'?w'?"),
    ("unsupported dtype", {"state_dict": {"w": torch.ones(2, dtype=torch.complex128)}}, TypeError, "w"),
    ("sparse tensor", {"state_dict": {"w": torch.ones(3).to_sparse()}}, TypeError, "w"),
    ("numpy object array", {"state_dict": {"w": np.array([Opaque()], dtype=object)}}, TypeError, "w"),
    ("object in trainer_state", {"trainer_state": {"sched": Opaque()}}, TypeError, "sched"),
    ("empty state dict", {"state_dict": {}}, ValueError, "empty"),
    ("no tensors at all", {"state_dict": {"cfg": {"lr": 0.1}}}, ValueError, "empty"),
    ("metric not a number", {"metrics": {"loss": "low"}}, TypeError, "loss"),
    ("metric a list", {"metrics": {"loss": [0.1]}}, TypeError, "loss"),
    ("metric name not a string", {"metrics": {3: 0.1}}, TypeError, "metric names"),
    ("metadata not JSON", {"metadata": {"when": Opaque()}}, TypeError, "metadata"),
    ("negative step", {"step": -1}, ValueError, "step"),
    ("step a float", {"step": 2.0}, ValueError, "step"),
    ("step lower than the latest", {"step": 1}, CheckpointExistsError, "older than the latest"),
    ("step equal to the latest", {"step": 3}, CheckpointExistsError, "already committed"),
]


@pytest.mark.parametrize(
    ("case", "change", "error", "names"), BAD_SAVES, ids=[case[0].replace(" ", "-") for case in BAD_SAVES]
)
def test_bad_save_is_refused_naming_the_culprit_and_loses_nothing(
    tmp_path: Path, case: str, change: dict[str, Any], error: type[BaseException], names: str
) -> None:
    store = _store(tmp_path)
    for step in (2, 3):
        store.save(step, tensors_for(step), metrics={"loss": 1.0 / step})
    args: dict[str, Any] = {"step": 4, "state_dict": tensors_for(4), "metrics": {"loss": 0.1}}
    args.update(change)
    with pytest.raises(error, match=names):
        store.save(args.pop("step"), args.pop("state_dict"), **args)
    _assert_nothing_lost(store, [2, 3])


def test_overwrite_true_replaces_a_lower_step_and_keeps_the_rest(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for step in (2, 3):
        store.save(step, tensors_for(step), metrics={"loss": 1.0 / step})
    store.save(1, tensors_for(1), metrics={"loss": 1.0}, overwrite=True)
    _assert_nothing_lost(store, [1, 2, 3])
    assert store.latest().step == 3


# ---------------------------------------------------------------------------------------------
# NaN / inf / missing metrics: kept, never ranked best.
# ---------------------------------------------------------------------------------------------
def test_nan_inf_and_missing_metrics_are_kept_but_never_best(tmp_path: Path) -> None:
    store = _store(tmp_path, keep_top_k=1, keep_checkpoints_without_metrics=False)
    losses = {1: 0.5, 2: float("nan"), 3: -float("inf"), 4: float("inf"), 5: None}
    for step, loss in losses.items():
        store.save(step, tensors_for(step), metrics={} if loss is None else {"loss": loss})
        store.verify(step)  # committed whatever the metric
        if step > 1:
            assert store.best().step == 1  # -inf with mode=min would win if it were ranked
    assert [i.step for i in store.top_k(5)] == [1]
    assert [i.step for i in store.list()] == [1, 5]  # top-1 plus the latest: the unranked went
    store.report_eval(1, {"loss": float("nan")})  # an evaluator reporting NaN unranks it too
    assert store.best() is None
    # the ranking changed, so retention ran: no rule keeps step 1 now (no finite metric, not latest)
    assert [i.step for i in store.list()] == [5]


# ---------------------------------------------------------------------------------------------
# The same key with different values from two ranks (the planning both write modes share).
# ---------------------------------------------------------------------------------------------
def _rank(tensors: dict[str, tuple[str, tuple[int, ...], str]]) -> RankState:
    sizes = {"F32": 4, "F16": 2}
    return RankState({k: TensorMeta(d, s, int(np.prod(s)) * sizes[d], h) for k, (d, s, h) in tensors.items()})


@pytest.mark.parametrize(
    ("other", "detail"),
    [
        (("F32", (4,), "bbbb"), "the bytes differ"),
        (("F16", (4,), "aaaa"), r"F32\[4\] vs F16\[4\]"),
        (("F32", (2, 2), "aaaa"), r"F32\[4\] vs F32\[2, 2\]"),
    ],
    ids=["bytes", "dtype", "shape"],
)
def test_conflicting_replicated_key_names_the_key_and_both_ranks(
    other: tuple[str, tuple[int, ...], str], detail: str
) -> None:
    states = {0: _rank({"emb": ("F32", (4,), "aaaa"), "a": ("F32", (1,), "x")}), 1: _rank({"emb": other})}

    def plan_and_compare(states: dict[int, RankState]) -> SavePlan:
        plan = plan_save(
            1, {r: {MODEL: s} for r, s in states.items()}, directory="d", mode="gather", max_shard_size=1 << 20
        )
        compare_replicas(plan, lambda part, key, rank: states[rank].tensors[key].digest)
        return plan

    with pytest.raises(ValueError, match=rf"key 'emb': ranks 0 and 1 .*{detail}"):
        plan_and_compare(states)
    plan = plan_and_compare({0: states[0], 1: _rank({"emb": ("F32", (4,), "aaaa")})})
    # identical copies are fine: one chunk, written once by rank 0, rank 1's copy compared
    assert [c.ranks for c in plan.parts[MODEL].tensors["emb"].chunks] == [(0, 1)]
    assert [c.ranks for c in plan.parts[MODEL].tensors["a"].chunks] == [(0,)]


# ---------------------------------------------------------------------------------------------
# Run names.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["..", "../escape", "a/../../b", "a/b", "/etc", "/", "a\x00b", "A" * (MAX_RUN_NAME_LENGTH + 1), "", "."],
    ids=["dotdot", "dotdot-escape", "dotdot-inside", "slash", "absolute", "root", "nul", "overlong", "empty", "dot"],
)
def test_bad_run_names_are_refused_before_anything_is_created(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ConfigError, match=r"^run_name:"):
        CheckpointStore(str(root), run_name=name)
    with pytest.raises(ConfigError, match=r"run_name:"):
        CheckpointConfig.from_dict({"storage_uri": str(root), "run_name": name})
    assert list(root.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["root"]


# ---------------------------------------------------------------------------------------------
# Damaged or malicious files of a committed checkpoint.
# ---------------------------------------------------------------------------------------------
def _rewrite_marker(store: CheckpointStore, step: int, edit: Any) -> None:
    path = _step_dir(store, step) / MARKER
    marker = json.loads(path.read_text())
    edit(marker)
    path.write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "name",
    ["../step_000000001/model-00001-of-00003.safetensors", "/etc/hostname", "a/../../x", "sub\\..\\x", ""],
    ids=["dotdot-sibling", "absolute", "dotdot-nested", "backslash", "empty"],
)
def test_a_marker_listing_a_file_outside_its_step_is_refused(tmp_path: Path, name: str) -> None:
    store = _store(tmp_path)
    store.save(1, tensors_for(1), metrics={"loss": 1.0})
    store.save(2, tensors_for(2), metrics={"loss": 0.5})
    _rewrite_marker(store, 2, lambda m: m["files"].update({name: {"size": 1, "checksum": "xxh3_64:0"}}))
    for call in (lambda: store.verify(2), lambda: store.load(2)):
        with pytest.raises(CorruptCheckpointError, match="step_000000002/checkpoint.json") as excinfo:
            call()
        assert "files" in str(excinfo.value)
    fresh = _store(tmp_path)
    fresh.rebuild_index()  # rebuilt from the markers: the damaged one is skipped
    assert [i.step for i in fresh.list()] == [1]
    fresh.verify(1)
    assert_state(1, fresh.load(1))


def test_header_offsets_past_the_end_are_caught_even_with_a_matching_checksum(tmp_path: Path) -> None:
    """A shard whose header claims more data than the file holds, recorded with its own checksum."""
    store = _store(tmp_path)
    store.save(1, tensors_for(1), metrics={"loss": 1.0})
    store.save(2, tensors_for(2), metrics={"loss": 0.5})
    name = "model-00002-of-00003.safetensors"
    shard = _step_dir(store, 2) / name
    header = json.dumps({"layer0.weight": {"dtype": "F32", "shape": [64, 32], "data_offsets": [0, 8192]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + b"\0" * 100  # 100 bytes where 8192 are claimed
    shard.write_bytes(blob)
    checksum = Checksum()
    checksum.update(blob)
    digest = {"size": len(blob), "checksum": checksum.hexdigest()}
    _rewrite_marker(store, 2, lambda m: m["files"].update({name: digest}))
    for verify in (True, False):
        with pytest.raises(CorruptCheckpointError, match=rf"step_000000002/{name}.*past the end"):
            store.load(2, verify=verify)
        with pytest.raises(CorruptCheckpointError, match=rf"step_000000002/{name}.*past the end"):
            store.load(2, keys=["layer0.weight"], verify=verify)
    with pytest.raises(CorruptCheckpointError, match=rf"step_000000002/{name}"):
        store.verify(2)
    store.verify(1)
    assert_state(1, store.load(1))


# ---------------------------------------------------------------------------------------------
# model_architecture.json naming a class outside allowed_architecture_prefixes.
# ---------------------------------------------------------------------------------------------
PROBE_MODULE = """
import os
import pathlib

import torch

pathlib.Path(os.environ["RAY_CKPT_IMPORT_PROBE"]).write_text(__name__)  # records that it was imported


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
"""


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two importable modules, ``rckpt_safe`` and ``rckpt_safe_evil``, that write a file when imported."""
    package_root = tmp_path / "probe_modules"
    package_root.mkdir()
    for module in ("rckpt_safe", "rckpt_safe_evil"):
        (package_root / f"{module}.py").write_text(PROBE_MODULE)
        sys.modules.pop(module, None)
    monkeypatch.syspath_prepend(str(package_root))
    record = tmp_path / "imported.txt"
    monkeypatch.setenv("RAY_CKPT_IMPORT_PROBE", str(record))
    yield record
    for module in ("rckpt_safe", "rckpt_safe_evil"):
        sys.modules.pop(module, None)


@pytest.mark.parametrize("allowed", [["rckpt_safe."], ["rckpt_safe"], ["torch.", "rckpt_safe"]])
def test_architecture_outside_the_prefixes_is_refused_before_any_import(
    tmp_path: Path, probe: Path, allowed: list[str]
) -> None:
    writer = CheckpointStore(str(tmp_path / "runs"), run_name=RUN)
    writer.write_architecture("rckpt_safe_evil.Model", {})
    writer.save(1, {"w": torch.ones(2)})
    reader = CheckpointStore(str(tmp_path / "runs"), run_name=RUN, allowed_architecture_prefixes=allowed)
    with pytest.raises(ArchitectureNotAllowedError, match=r"rckpt_safe_evil\.Model.*nothing was imported"):
        reader.instantiate()
    with pytest.raises(ArchitectureNotAllowedError, match=r"rckpt_safe_evil\.Model"):
        load_from_uri(f"{tmp_path / 'runs'}/{RUN}", allowed_architecture_prefixes=allowed).model()
    assert not probe.exists(), "the refused module was imported"
    assert "rckpt_safe_evil" not in sys.modules
    assert torch.equal(reader.load(1)["w"], torch.ones(2))  # the weights themselves stay readable


def test_the_import_probe_records_an_allowed_import(tmp_path: Path, probe: Path) -> None:
    """Control for the test above: an allowed class is imported, and the probe sees it."""
    writer = CheckpointStore(str(tmp_path / "runs"), run_name=RUN)
    writer.write_architecture("rckpt_safe.Model", {})
    writer.save(1, {"w": torch.ones(2)})
    reader = CheckpointStore(str(tmp_path / "runs"), run_name=RUN, allowed_architecture_prefixes=["rckpt_safe"])
    model = reader.instantiate()
    assert torch.equal(model.w.detach(), torch.ones(2))
    assert probe.read_text() == "rckpt_safe"


# ---------------------------------------------------------------------------------------------
# Pickle payloads: a legacy .pt, and a "pt"-format shard of a committed checkpoint.
# ---------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs code: it writes the file named by RAY_CKPT_PICKLE_PROBE."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_record_unpickle, (os.environ["RAY_CKPT_PICKLE_PROBE"],))


def _record_unpickle(path: str) -> dict[str, Any]:
    Path(path).write_text("unpickled")
    return {"ran": True}


@pytest.fixture
def pickle_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    record = tmp_path / "unpickled.txt"
    monkeypatch.setenv("RAY_CKPT_PICKLE_PROBE", str(record))
    return record


def test_legacy_pt_with_a_pickle_payload_needs_trust_pickle(tmp_path: Path, pickle_probe: Path) -> None:
    legacy = pytest.importorskip("ray_ckpt.interop.legacy")
    path = tmp_path / "old_run_step_7.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload()}, path)
    with pytest.raises(legacy.UntrustedPickleError, match=r"old_run_step_7\.pt.*trust_pickle=True") as excinfo:
        legacy.read_legacy(str(path), cache=False)
    assert isinstance(excinfo.value, PermissionError)
    assert not pickle_probe.exists(), "the payload ran without trust_pickle"
    ckpt = legacy.read_legacy(str(path), trust_pickle=True, cache=False)
    assert torch.equal(ckpt.state_dict["w"], torch.ones(2))
    assert pickle_probe.exists()  # trusted: unpickled for real (the control)


def test_pt_format_shard_with_a_pickle_payload_is_refused(tmp_path: Path, pickle_probe: Path) -> None:
    store = CheckpointStore(str(tmp_path), run_name=RUN, checkpoint_format="pt")
    store.save(1, {"w": torch.ones(2)})
    store.save(2, {"w": torch.full((2,), 2.0)})
    shard = _step_dir(store, 2) / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "x": Payload()}, shard)  # same keys the index lists, plus a payload
    data = shard.read_bytes()
    checksum = Checksum()
    checksum.update(data)
    _rewrite_marker(
        store,
        2,
        lambda m: m["files"].update({"pytorch_model.bin": {"size": len(data), "checksum": checksum.hexdigest()}}),
    )
    for verify in (True, False):
        with pytest.raises(CorruptCheckpointError, match=r"step_000000002/pytorch_model\.bin"):
            store.load(2, verify=verify)
    assert not pickle_probe.exists(), "the payload ran"
    assert torch.equal(store.load(1)["w"], torch.ones(2))


# ---------------------------------------------------------------------------------------------
# Invalid YAML config values (cases test_config.py does not have).
# ---------------------------------------------------------------------------------------------
YAML_CASES = [
    ("save_timeout_s: .nan", "save_timeout_s"),
    ("lease_ttl_s: .inf", "lease_ttl_s"),
    ("keep_top_k: 2.5", "keep_top_k"),
    ("keep_last_n: -1", "keep_last_n"),
    ("max_shard_size: -5GB", "max_shard_size"),
    ("max_shard_size: 0.1B", "max_shard_size"),
    ("allowed_architecture_prefixes: tests.models.", "allowed_architecture_prefixes"),
    ("allowed_architecture_prefixes: [tests.models., 7]", "allowed_architecture_prefixes"),
    ("mode: null", "mode"),
    ("metric_name: [loss]", "metric_name"),
    ("run_name: /etc", "run_name"),
    ("run_name: yes", "run_name"),
    ('run_name: "a\\0b"', "run_name"),
    ("storage_uri: ''", "storage_uri"),
    ("max_restarts: -2", "max_restarts"),
    ("max_pending_saves: 0", "max_pending_saves"),
    ("checkpoint_format: pickle", "checkpoint_format"),
    ("verify_on_load: sometimes", "verify_on_load"),
    ("storage_options: none", "storage_options"),
]


@pytest.mark.parametrize(("text", "field"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_invalid_yaml_values_name_the_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "ckpt.yaml"
    path.write_text("checkpoint:\n  " + text + "\n")
    with pytest.raises(ConfigError) as excinfo:
        CheckpointConfig.from_yaml(path)
    assert str(path) in str(excinfo.value) and f"{field}:" in str(excinfo.value), str(excinfo.value)


def test_yaml_that_is_not_a_mapping_or_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.yaml"
    path.write_text("checkpoint: [1, 2]\n")
    with pytest.raises(ConfigError, match="checkpoint"):
        CheckpointConfig.from_yaml(path)
    path.write_bytes(b"\xff\xfe not utf-8 \x00")
    with pytest.raises(ConfigError, match=str(path)):
        CheckpointConfig.from_yaml(path)
    with pytest.raises((ConfigError, FileNotFoundError)) as excinfo:
        CheckpointConfig.from_yaml(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(excinfo.value) or getattr(excinfo.value, "errno", None) == errno.ENOENT


# ---------------------------------------------------------------------------------------------
# Through the checkpointer actor: what a misbehaving worker can send it directly.
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_checkpointer_refuses_bad_reports_and_never_ranks_unrankable_metrics(tmp_path: Path, run_name: str) -> None:
    import ray

    import ray_ckpt
    from ray_ckpt.distributed.wire import RankReport

    config = CheckpointConfig(storage_uri=str(tmp_path), run_name=run_name, metric_name="loss", save_timeout_s=20.0)
    handle = ray_ckpt.start_checkpointer(config)
    worker = ray_ckpt.WorkerClient(run_name, 0, 1)
    worker.save(1, {"w": torch.ones(2)}, metrics={"loss": float("nan")}, blocking=True)
    worker.save(2, {"w": torch.ones(2)}, metrics={"loss": -float("inf")}, blocking=True)
    worker.save(3, {"w": torch.ones(2)}, blocking=True)  # no metric at all
    assert [i.step for i in handle.list()] == [1, 2, 3]  # all kept
    assert handle.best() is None and handle.top_k(3) == []  # none ranked
    worker.save(4, {"w": torch.ones(2)}, metrics={"loss": 0.7}, blocking=True)
    assert handle.best().step == 4

    def report(step: Any, rank: Any, world_size: Any) -> Any:
        empty = RankState({})
        return ray.get(handle.actor.report.remote(step, RankReport(rank, world_size, empty), False))

    for step, rank, world_size, names in [
        (5, 2, 2, r"rank: 2 is outside \[0, 2\)"),
        (5, -1, 2, r"rank: -1 is outside \[0, 2\)"),
        (5, True, 2, r"rank: True"),
        (5, 0, 0, r"world_size: must be a positive integer, got 0"),
        (-1, 0, 1, r"step: must be a non-negative integer, got -1"),
        ("5", 0, 1, r"step: must be a non-negative integer, got '5'"),
        (5.0, 0, 1, r"step: must be a non-negative integer, got 5.0"),
    ]:
        with pytest.raises(ValueError, match=names):
            report(step, rank, world_size)
    for bad_step in (-1, "5", 2.5):
        with pytest.raises(ValueError, match="step"):
            worker.save(bad_step, {"w": torch.ones(2)}, blocking=True)
    assert handle.stats()["pending"] == [] and handle.stats()["queued"] == []
    assert [i.step for i in handle.list()] == [1, 2, 3, 4]
    assert worker.save(5, {"w": torch.ones(2)}, blocking=True).result().step == 5
    handle.shutdown()
