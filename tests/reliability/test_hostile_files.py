"""Hostile and damaged files on storage: a clear error naming the file, or the bad part skipped
with one warning naming it, and the rest of the run still lists, saves, loads and ranks.

Each row of ``DAMAGE`` damages a healthy three-step run the way an attacker or a torn disk
would; the test then opens the run afresh (with and without ``index.parquet``) and checks the
outcome the row names. docs/RELIABILITY.md lists the rows and their counts. Code-execution
payloads in ``model_architecture.json`` are in tests/core/test_architecture.py; bad rank reports in
tests/reliability/test_bad_input.py.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ray_ckpt
from ray_ckpt import CheckpointStore, CorruptCheckpointError, StorageError
from ray_ckpt.cli.main import main as cli_main
from ray_ckpt.core.format.digests import Checksum

RUN = "hostile"
STEPS = [1, 2, 3]
DEEP = 200_000  # nesting depth of the recursion bomb


def _tensors(step: int) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((4, 4), float(step)), "b.bias": torch.arange(6.0) + step}


def _open(root: Path, **options: Any) -> CheckpointStore:
    options = {"metric_name": "loss", "mode": "min", "keep_last_n": 3, **options}
    return CheckpointStore(str(root), run_name=RUN, **options)


def _healthy_run(root: Path) -> CheckpointStore:
    store = _open(root, max_shard_size=200)  # several shards per step
    for step in STEPS:
        store.save(step, _tensors(step), metrics={"loss": 1.0 / step}, trainer_state={"step": step, "lr": 0.1})
    store.report_eval(2, {"eval/return": 5.0})
    lease = store.acquire_lease(1, 600.0, holder="eval-0")
    assert lease
    store.run_index.compact()  # index.parquet holds the three steps; the change log is empty
    return store


def _run(root: Path) -> Path:
    return root / RUN


def _step(root: Path, step: int) -> Path:
    return _run(root) / "checkpoints" / f"step_{step:09d}"


def _marker(root: Path, step: int) -> dict[str, Any]:
    return json.loads((_step(root, step) / "checkpoint.json").read_text())


def _write_marker(root: Path, step: int, data: Any) -> None:
    (_step(root, step) / "checkpoint.json").write_text(data if isinstance(data, str) else json.dumps(data))


def _edit_marker(path: tuple[str, ...], value: Any) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        data = _marker(root, 2)
        node = data
        for key in path[:-1]:
            node = node[key] if not key.startswith("*") else node[next(iter(node))]
        last = path[-1]
        node[next(iter(node)) if last == "*" else last] = value
        _write_marker(root, 2, data)

    return damage


def _raw_marker(text: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        data = json.dumps(_marker(root, 2))
        _write_marker(root, 2, text.replace("$MARKER", data[1:-1]))

    return damage


def _sidecar(text: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (_step(root, 2) / "eval_metrics.json").write_text(text)

    return damage


def _lease(text: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (_run(root) / "leases" / "step_000000003.deadbeefdeadbeef.json").write_text(text)

    return damage


def _rehash(root: Path, step: int, name: str) -> None:
    """Record a changed file's new size and checksum in the marker (an attacker who re-hashes)."""
    data = _marker(root, step)
    content = (_step(root, step) / name).read_bytes()
    checksum = Checksum()
    checksum.update(content)
    data["files"][name] = {"size": len(content), "checksum": checksum.hexdigest()}
    _write_marker(root, step, data)


def _drop_tensor_from_shard(root: Path) -> None:
    """A shard rewritten without one of the tensors the index maps to it, checksums re-hashed."""
    index = json.loads((_step(root, 2) / "model.safetensors.index.json").read_text())
    key, shard = next(iter(index["weight_map"].items()))
    path = _step(root, 2) / shard
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop(key)
    body = json.dumps(header).encode()
    body += b" " * (-(len(body) + 8) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + length :])
    _rehash(root, 2, shard)


def _index_outside(root: Path) -> None:
    (_run(root).parent / "evil.index.json").write_text(json.dumps({"weight_map": {"x": "secret.safetensors"}}))
    data = _marker(root, 2)
    data["model"]["index"] = "../../../evil.index.json"
    _write_marker(root, 2, data)


def _index_names_outside_file(root: Path) -> None:
    index = _step(root, 2) / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "../step_000000001/model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    _rehash(root, 2, "model.safetensors.index.json")


def _fifo_shard(root: Path) -> None:
    index = json.loads((_step(root, 2) / "model.safetensors.index.json").read_text())
    shard = _step(root, 2) / next(iter(index["weight_map"].values()))
    shard.unlink()
    os.mkfifo(shard)


def _huge_header_length(root: Path) -> None:
    index = json.loads((_step(root, 2) / "model.safetensors.index.json").read_text())
    path = _step(root, 2) / next(iter(index["weight_map"].values()))
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", 200 * 1024 * 1024)
    path.write_bytes(bytes(raw))
    _rehash(root, 2, path.name)


def _trainer_structure(root: Path) -> None:
    path = _step(root, 2) / "trainer_state" / "trainer_state.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "structure": {"__dtype__": "load"}}))
    _rehash(root, 2, "trainer_state/trainer_state.json")


def _snapshot_garbage(root: Path) -> None:
    (_run(root) / "index.parquet").write_bytes(b"PAR1 not really parquet PAR1")


def _deep_metadata(root: Path) -> None:
    data = _marker(root, 2)
    text = json.dumps(data)[:-1] + ', "deep": ' + "[" * DEEP + "]" * DEEP + "}"
    _write_marker(root, 2, text)


@dataclass(frozen=True)
class Damage:
    """One way to damage the run, and what a fresh reader must then do."""

    damage: Callable[[Path], None]
    # "skip": step 2 is skipped with a warning naming ``file``; "ignore": the damaged part is
    # ignored (step 2 still listed and loadable) with a warning naming ``file``; "load-error":
    # listing is fine, load/verify of step 2 raise CorruptCheckpointError naming ``file``.
    outcome: str
    file: str
    error: type[Exception] | tuple[type[Exception], ...] = CorruptCheckpointError


MARKER2 = "checkpoints/step_000000002/checkpoint.json"
EVAL2 = "checkpoints/step_000000002/eval_metrics.json"
LEASE = "leases/step_000000003.deadbeefdeadbeef.json"
INDEX2 = "checkpoints/step_000000002/model.safetensors.index.json"

DAMAGE: dict[str, Damage] = {
    # checkpoint.json
    "marker: world_size Infinity": Damage(_raw_marker('{$MARKER, "world_size": Infinity}'), "skip", MARKER2),
    "marker: world_size 0": Damage(_edit_marker(("world_size",), 0), "skip", MARKER2),
    "marker: files size 1e999": Damage(
        _raw_marker('{$MARKER, "files": {"x.bin": {"size": 1e999, "checksum": "0"}}}'), "skip", MARKER2
    ),
    "marker: files size negative": Damage(_edit_marker(("files", "*", "size"), -1), "skip", MARKER2),
    "marker: files a list": Damage(_edit_marker(("files",), []), "skip", MARKER2),
    "marker: file name ../": Damage(
        _edit_marker(("files",), {"../../x": {"size": 1, "checksum": "0"}}), "skip", MARKER2
    ),
    "marker: model.index a list": Damage(_edit_marker(("model", "index"), ["a"]), "skip", MARKER2),
    "marker: model.index outside the run": Damage(_index_outside, "skip", MARKER2),
    "marker: model.structure malformed": Damage(_edit_marker(("model", "structure"), {"__dict__": 5}), "skip", MARKER2),
    "marker: model.structure unknown tag": Damage(
        _edit_marker(("model", "structure"), {"__pickle__": "x"}), "skip", MARKER2
    ),
    "marker: model.aliases a list": Damage(_edit_marker(("model", "aliases"), [1]), "skip", MARKER2),
    "marker: step a string": Damage(_edit_marker(("step",), "abc"), "skip", MARKER2),
    "marker: step 2**64": Damage(_edit_marker(("step",), 2**64), "skip", MARKER2),
    "marker: step of another dir": Damage(_edit_marker(("step",), 7), "skip", MARKER2),
    "marker: created NaN": Damage(_raw_marker('{$MARKER, "created": NaN}'), "skip", MARKER2),
    "marker: metrics a list": Damage(_edit_marker(("metrics",), [1, 2]), "skip", MARKER2),
    "marker: metric a string": Damage(_edit_marker(("metrics",), {"loss": "low"}), "skip", MARKER2),
    "marker: metadata a string": Damage(_edit_marker(("metadata",), "x"), "skip", MARKER2),
    "marker: kind unknown": Damage(_edit_marker(("kind",), "pickle"), "skip", MARKER2),
    "marker: format_version from the future": Damage(_edit_marker(("format_version",), 99), "skip", MARKER2),
    "marker: null": Damage(_raw_marker("null"), "skip", MARKER2),
    "marker: a list": Damage(_raw_marker("[1, 2]"), "skip", MARKER2),
    "marker: not JSON": Damage(_raw_marker("{not json"), "skip", MARKER2),
    "marker: not UTF-8": Damage(_raw_marker("\udcff"[:0] + '{"step": "\\ud800"'), "skip", MARKER2),
    "marker: nested 200,000 deep": Damage(_deep_metadata, "skip", MARKER2),
    # eval_metrics.json
    "eval sidecar: null": Damage(_sidecar("null"), "ignore", EVAL2),
    "eval sidecar: []": Damage(_sidecar("[]"), "ignore", EVAL2),
    "eval sidecar: a string value": Damage(_sidecar('{"eval/return": "high"}'), "ignore", EVAL2),
    "eval sidecar: a nested value": Damage(_sidecar('{"eval/return": {"a": 1}}'), "ignore", EVAL2),
    "eval sidecar: 1e999": Damage(_sidecar('{"eval/return": 1e999}'), "ignore-ok", EVAL2),
    "eval sidecar: not JSON": Damage(_sidecar("{"), "ignore", EVAL2),
    "eval sidecar: nested 200,000 deep": Damage(_sidecar("[" * DEEP + "]" * DEEP), "ignore", EVAL2),
    # leases
    'lease: "expires": "soon"': Damage(_lease('{"step": 3, "lease_id": "x", "expires": "soon"}'), "ignore", LEASE),
    "lease: no step": Damage(_lease('{"lease_id": "x", "expires": 1e12}'), "ignore", LEASE),
    'lease: "step": "abc"': Damage(_lease('{"step": "abc", "expires": 1e12}'), "ignore", LEASE),
    "lease: step -1": Damage(_lease('{"step": -1, "expires": 1e12}'), "ignore", LEASE),
    "lease: expires Infinity": Damage(_lease('{"step": 3, "expires": Infinity}'), "ignore", LEASE),
    "lease: a list": Damage(_lease("[3]"), "ignore", LEASE),
    "lease: null": Damage(_lease("null"), "ignore", LEASE),
    "lease: nested 200,000 deep": Damage(_lease('{"step": ' + "[" * DEEP + "]" * DEEP + "}"), "ignore", LEASE),
    # model files (found at load and verify, listing unaffected)
    "shard: a tensor the index lists is missing (re-hashed)": Damage(
        _drop_tensor_from_shard, "load-error", "checkpoints/step_000000002/model"
    ),
    "index: names a file outside the step (re-hashed)": Damage(_index_names_outside_file, "load-error", INDEX2),
    "shard: header length over 100 MiB (re-hashed)": Damage(
        _huge_header_length, "load-error", "checkpoints/step_000000002/model"
    ),
    "shard: replaced by a FIFO": Damage(
        _fifo_shard,
        "load-error",
        "step_000000002/model.safetensors: not a regular",
        (CorruptCheckpointError, StorageError),
    ),
    "trainer_state.json: a dtype that is a torch function (re-hashed)": Damage(
        _trainer_structure, "trainer-error", "checkpoints/step_000000002/trainer_state/trainer_state.json"
    ),
    # run-level
    "index.parquet: garbage": Damage(_snapshot_garbage, "ignore-ok", "index.parquet"),
}


def _warned(caplog: pytest.LogCaptureFixture, file: str) -> bool:
    return any(file in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def _check_rest_of_run(root: Path, visible: list[int], *, metric_steps: list[int]) -> None:
    """The run lists, ranks, loads and saves; retention and the CLI work."""
    store = _open(root)
    assert [i.step for i in store.list()] == visible
    assert store.latest().step == visible[-1]
    assert store.best().step in metric_steps
    for step in (1, 3):
        loaded = store.load(step)
        assert all(torch.equal(loaded[k], v) for k, v in _tensors(step).items())
        store.verify(step)
    info = store.save(4, _tensors(4), metrics={"loss": 0.1})  # retention runs after the commit
    assert info.step == 4
    assert store.latest().step == 4 and store.best().step == 4
    assert 4 in [i.step for i in store.list()]
    store.report_eval(3, {"eval/return": 1.0})
    assert cli_main(["ls", str(_run(root))]) == 0


@pytest.mark.parametrize("case", list(DAMAGE), ids=list(DAMAGE))
@pytest.mark.parametrize("snapshot", [True, False], ids=["with-snapshot", "markers-only"])
def test_a_damaged_file_is_skipped_or_named_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str, snapshot: bool
) -> None:
    row = DAMAGE[case]
    _healthy_run(tmp_path)
    if not snapshot:
        _open(tmp_path).run_index.forget()  # no index.parquet, no change log: every marker is read
    row.damage(tmp_path)
    caplog.set_level(logging.WARNING)
    reader = _open(tmp_path)
    listed = [i.step for i in reader.list()]
    if row.outcome == "skip":
        if snapshot:  # the snapshot still lists step 2; reading it names the file
            with pytest.raises(CorruptCheckpointError, match=row.file):
                reader.load(2)
            reader = _open(tmp_path)
            reader.rebuild_index()
            listed = [i.step for i in reader.list()]
        assert listed == [1, 3]
        assert _warned(caplog, row.file), f"no warning naming {row.file}"
        with pytest.raises(CorruptCheckpointError, match=row.file):
            reader.load(2)
        assert cli_main(["verify", f"{_run(tmp_path)}:2"]) != 0
        _check_rest_of_run(tmp_path, [1, 3], metric_steps=[3])
        return
    assert listed == STEPS
    if row.outcome in ("ignore", "ignore-ok"):
        assert reader.load(2).keys() == _tensors(2).keys()
        if row.file == LEASE:
            assert reader.leased_steps() == {1}  # the damaged lease protects nothing
        if row.outcome == "ignore" and not (snapshot and row.file == EVAL2):  # the snapshot holds the scores
            assert _warned(caplog, row.file), f"no warning naming {row.file}"
        _check_rest_of_run(tmp_path, STEPS, metric_steps=[3])
        return
    if row.outcome == "trainer-error":
        reader.load(2)
        with pytest.raises(CorruptCheckpointError, match=row.file):
            reader.load_trainer_state(2)
    else:
        with pytest.raises(row.error, match=row.file):
            reader.load(2)
    with pytest.raises(row.error, match=row.file):
        reader.verify(2)
    assert cli_main(["verify", f"{_run(tmp_path)}:2"]) != 0
    if row.outcome != "trainer-error":
        assert cli_main(["inspect", str(_run(tmp_path)) + ":2"]) != 0
    _check_rest_of_run(tmp_path, STEPS, metric_steps=[3])


def test_one_warning_per_damaged_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _healthy_run(tmp_path)
    _open(tmp_path).run_index.forget()  # every marker and sidecar is read
    _sidecar("null")(tmp_path)
    caplog.set_level(logging.WARNING)
    store = _open(tmp_path)
    for _ in range(5):
        store.list()
        store.best()
    assert sum(EVAL2 in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.save(2**63, _tensors(1)), r"step: must be below 2\*\*63"),
        (lambda s: s.save(-1, _tensors(1)), "step: must be a non-negative integer"),
        (lambda s: s.save(9, {"__metadata__": torch.ones(1)}), "__metadata__.*reserved"),
        (lambda s: s.save(9, _tensors(9), metrics={"loss": 10**400}), "'loss' = 1000.*does not fit a float"),
        (lambda s: s.report_eval(3, {"acc": 10**400}), "'acc'.*does not fit a float"),
        (lambda s: s.acquire_lease(3, -5), "ttl_s"),
        (lambda s: s.acquire_lease(3, 0), "ttl_s"),
        (lambda s: s.acquire_lease(3, float("nan")), "ttl_s"),
        (lambda s: s.acquire_lease(3, float("inf")), "ttl_s"),
        (lambda s: s.renew_lease(3, "../../x", 10), "lease_id"),
    ],
    ids=[
        "step 2**63",
        "step -1",
        "key __metadata__",
        "metric 10**400",
        "eval 10**400",
        "ttl -5",
        "ttl 0",
        "ttl NaN",
        "ttl inf",
        "lease id a path",
    ],
)
def test_bad_values_are_refused_before_anything_is_written(tmp_path: Path, call: Any, match: str) -> None:
    store = _healthy_run(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises((ValueError, TypeError), match=match):
        call(store)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before
    _check_rest_of_run(tmp_path, STEPS, metric_steps=[3])


def test_a_header_over_the_safetensors_cap_is_refused_at_save_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray_ckpt.core.format.header as fmt

    monkeypatch.setattr(fmt, "MAX_HEADER_SIZE", 4096)  # the real cap is 100 MiB: same code path, fewer keys
    store = _healthy_run(tmp_path)
    state = {f"layer.{i}.a_rather_long_parameter_name.weight": torch.ones(1) for i in range(100)}
    with pytest.raises(ValueError, match="smaller max_shard_size.*shorter tensor names"):
        store.save(9, state)
    monkeypatch.undo()
    assert [i.step for i in _open(tmp_path).list()] == STEPS
    _check_rest_of_run(tmp_path, STEPS, metric_steps=[3])


def test_the_writer_start_removes_old_leftovers_and_spares_young_ones(tmp_path: Path) -> None:
    _healthy_run(tmp_path)
    old, young = _step(tmp_path, 7), _step(tmp_path, 8)
    for leftover in (old, young):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half")
    os.utime(old / "model.safetensors", (1, 1))
    os.utime(old, (1, 1))
    store = _open(tmp_path, leftover_grace_s=600)
    store.list()
    assert old.exists()  # readers never remove anything
    store.save(4, _tensors(4), metrics={"loss": 0.2})
    assert not old.exists() and young.exists()


def test_retention_and_gc_never_delete_through_a_symlinked_step(tmp_path: Path) -> None:
    _healthy_run(tmp_path / "run")
    outside = tmp_path / "precious"
    outside.mkdir()
    marker = {**_marker(tmp_path / "run", 3), "step": 9}  # a valid committed step 9, behind a link
    (outside / "checkpoint.json").write_text(json.dumps(marker))
    (outside / "keep.txt").write_text("mine")
    (_step(tmp_path / "run", 9)).symlink_to(outside, target_is_directory=True)
    store = _open(tmp_path / "run", keep_last_n=1)
    assert 9 in [i.step for i in store.list()]
    store.save(10, _tensors(10), metrics={"loss": 0.01})  # retention deletes 2, 3 and 9 (1 is leased)
    store.gc()
    assert [i.step for i in store.list()] == [1, 10]
    assert not _step(tmp_path / "run", 9).is_symlink()  # the link is gone ...
    assert (outside / "keep.txt").read_text() == "mine"  # ... and nothing behind it
    assert json.loads((outside / "checkpoint.json").read_text())["step"] == 9


def test_the_checkpointer_starts_and_commits_on_a_damaged_run(tmp_path: Path, ray_session: str, run_name: str) -> None:
    root = tmp_path / "runs"
    store = CheckpointStore(str(root), run_name=run_name, metric_name="loss", keep_last_n=3)
    for step in STEPS:
        store.save(step, _tensors(step), metrics={"loss": 1.0 / step})
    step_dir = root / run_name / "checkpoints"
    (step_dir / "step_000000001" / "eval_metrics.json").write_text("null")
    (step_dir / "step_000000002" / "checkpoint.json").write_text('{"step": 2, "world_size": Infinity}')
    (root / run_name / "leases").mkdir(exist_ok=True)
    (root / run_name / "leases" / "step_000000003.deadbeefdeadbeef.json").write_text('{"expires": "soon"}')
    store.run_index.forget()  # the checkpointer reads every marker
    config = ray_ckpt.CheckpointConfig(
        storage_uri=str(root), run_name=run_name, metric_name="loss", keep_last_n=3, save_timeout_s=30.0
    )
    handle = ray_ckpt.start_checkpointer(config)
    try:
        assert [i.step for i in handle.list()] == [1, 3]
        worker = ray_ckpt.WorkerClient(run_name, 0, 1)
        worker.save(4, _tensors(4), metrics={"loss": 0.1}, blocking=True)
        assert handle.latest().step == 4 and handle.best().step == 4
        evaluator = ray_ckpt.EvalClient(run_name)
        evaluator.report_eval(1, {"eval/return": 2.0})
        loaded = evaluator.load(4)
        assert torch.equal(loaded["a.weight"], _tensors(4)["a.weight"])
        evaluator.close()
    finally:
        handle.shutdown()
