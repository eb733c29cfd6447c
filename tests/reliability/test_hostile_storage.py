"""The second round of hostile and damaged storage: nothing planted on storage destroys, fakes or
stalls a run.

Each test plants what an attacker with write access to the storage (a shared bucket, a stale
job) or a disk fault would, then checks the safe outcome: the real steps survive bit-exact, the
run still lists, ranks, saves and loads, and what is refused names the file. Where the storage
makes a difference (object stores have no renames, no symlinks, no FIFOs) the case runs on a
local disk and on the loopback S3 server. docs/RELIABILITY.md lists the cases.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointStore, open_store
from ray_ckpt.core.layout import staging_dir, step_dir
from ray_ckpt.core.storage.storage import Storage

RUN = "planted"
REPLACE_ID = "0123456789ab"


def _state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((32,), float(step)), "b": torch.arange(5.0) * step}


def _same(state: dict[str, Any], expected: dict[str, torch.Tensor]) -> bool:
    return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A storage root and its options: a local directory, or a fresh bucket on loopback S3."""
    if request.param == "local":
        yield str(tmp_path / "runs"), {}
    else:
        yield request.getfixturevalue("s3_bucket")


def _open(where: tuple[str, dict[str, Any]], **options: Any) -> CheckpointStore:
    uri, storage_options = where
    options = {"metric_name": "loss", "mode": "min", "leftover_grace_s": 0, **options}
    return CheckpointStore(uri, run_name=RUN, storage_options=storage_options, **options)


def _two_steps(where: tuple[str, dict[str, Any]]) -> CheckpointStore:
    store = _open(where)
    store.save(1, _state(1), metrics={"loss": 1.0})
    store.save(2, _state(2), metrics={"loss": 0.5})
    return store


def _copy_step(storage: Storage, src: str, dst: str, **marker_fields: Any) -> None:
    """Copy every file of a step directory to ``dst``, the marker last, with fields changed."""
    for name in storage.find(src):
        if name != "checkpoint.json":
            storage.makedirs(os.path.dirname(f"{dst}/{name}"))
            storage.copy(f"{src}/{name}", f"{dst}/{name}")
    marker = json.loads(storage.read_bytes(f"{src}/checkpoint.json"))
    marker.update(marker_fields)
    storage.write_bytes(f"{dst}/checkpoint.json", json.dumps(marker).encode())


def _check_intact(where: tuple[str, dict[str, Any]]) -> CheckpointStore:
    """Both real steps list, verify and load bit-exact; no staging directory is left."""
    store = _open(where)
    assert [i.step for i in store.list()] == [1, 2]
    for step in (1, 2):
        store.verify(step)
        assert _same(store.load(step), _state(step))
    assert [n for n in store.storage.list_names("checkpoints") if n.startswith(".")] == []
    return store


# -- 1. overwrite recovery proves a staged replacement before swapping it in -------------------
def _marker_only(storage: Storage) -> None:
    """A staging folder holding a copy of step 1's marker with a replace id, and no files."""
    marker = json.loads(storage.read_bytes(f"{step_dir(1)}/checkpoint.json"))
    marker["replace_id"] = REPLACE_ID
    storage.write_bytes(f"{staging_dir(1, REPLACE_ID)}/checkpoint.json", json.dumps(marker).encode())


def _another_step(storage: Storage) -> None:
    """A complete copy of step 2 (files and marker, with a replace id) staged as step 1's replacement."""
    _copy_step(storage, step_dir(2), staging_dir(1, REPLACE_ID), replace_id=REPLACE_ID)


def _damaged_file(storage: Storage) -> None:
    """A copy of step 1 with its marker and replace id, one shard's byte flipped (sizes still match)."""
    marker = json.loads(storage.read_bytes(f"{step_dir(1)}/checkpoint.json"))
    staged = staging_dir(1, REPLACE_ID)
    _copy_step(storage, step_dir(1), staged, replace_id=REPLACE_ID)
    shard = next(n for n in marker["files"] if n.endswith(".safetensors"))
    data = bytearray(storage.read_bytes(f"{staged}/{shard}"))
    data[-1] ^= 0xFF
    storage.write_bytes(f"{staged}/{shard}", bytes(data))


STAGED = {"marker-without-files": _marker_only, "another-steps-copy": _another_step, "a-damaged-file": _damaged_file}


@pytest.mark.parametrize("start", ["gc", "first-save", "cli-gc"])
@pytest.mark.parametrize("plant", list(STAGED), ids=list(STAGED))
def test_a_planted_staging_folder_is_never_swapped_in(
    where: tuple[str, dict[str, Any]],
    plant: str,
    start: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = _two_steps(where)
    STAGED[plant](store.storage)
    writer = _open(where)
    with caplog.at_level(logging.WARNING, logger="ray_ckpt"):
        if start == "gc":
            writer.gc()
        elif start == "first-save":
            writer.save(3, _state(3), metrics={"loss": 2.0})
        else:
            from ray_ckpt.cli.main import main as cli_main

            monkeypatch.setenv("RAY_CKPT_STORAGE_OPTIONS", json.dumps(where[1]))
            assert cli_main(["gc", f"{where[0]}/{RUN}"]) == 0
    assert any(staging_dir(1, REPLACE_ID) in r.getMessage() for r in caplog.records)  # named, then removed
    if start == "first-save":
        writer.delete(3)
    _check_intact(where)


def test_a_symlinked_staging_folder_or_staged_link_is_removed_as_a_link(tmp_path: Path) -> None:
    where = (str(tmp_path / "runs"), {})
    store = _two_steps(where)
    checkpoints = tmp_path / "runs" / RUN / "checkpoints"
    # A whole staging folder that is a link to a committed-looking copy elsewhere.
    _copy_step(store.storage, step_dir(1), "elsewhere", replace_id=REPLACE_ID)
    os.symlink(tmp_path / "runs" / RUN / "elsewhere", checkpoints / f".step_000000001.replace-{REPLACE_ID}")
    # A staging folder of real files except one, a link to the real step's own shard.
    other = "fedcba987654"
    staged = checkpoints / f".step_000000002.replace-{other}"
    marker2 = json.loads((checkpoints / "step_000000002" / "checkpoint.json").read_text())
    _copy_step(store.storage, step_dir(2), staging_dir(2, other), replace_id=other)
    shard = next(n for n in marker2["files"] if n.endswith(".safetensors"))
    (staged / shard).unlink()
    os.symlink(checkpoints / "step_000000002" / shard, staged / shard)
    _open(where).gc()
    _check_intact(where)
    assert (tmp_path / "runs" / RUN / "elsewhere" / "checkpoint.json").exists()  # the link's target untouched


def test_a_proven_replacement_is_still_finished(where: tuple[str, dict[str, Any]]) -> None:
    """Control: a real replacement cut short after its staging commit is proven and swapped in."""
    store = _two_steps(where)
    _copy_step(store.storage, step_dir(2), staging_dir(1, REPLACE_ID), replace_id=REPLACE_ID, step=1)
    _open(where).gc()
    store = _open(where)
    assert [i.step for i in store.list()] == [1, 2]
    store.verify(1)
    assert _same(store.load(1), _state(2))  # step 1 now holds the staged version


def test_a_failed_copy_on_s3_loses_neither_version(
    s3_bucket: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that fails mid-swap leaves the staged version whole: the next start finishes it."""
    store = _two_steps(s3_bucket)
    copies = [0]
    original = Storage.copy

    def failing(self: Storage, src: str, dst: str) -> None:
        copies[0] += 1
        if copies[0] == 2:
            raise OSError(5, "injected copy failure")
        original(self, src, dst)

    monkeypatch.setattr(Storage, "copy", failing)
    with pytest.raises(OSError):
        store.save(1, _state(7), metrics={"loss": 3.0}, overwrite=True)
    monkeypatch.setattr(Storage, "copy", original)
    _open(s3_bucket).gc()
    store = _open(s3_bucket)
    assert [i.step for i in store.list()] == [1, 2]
    store.verify(1)
    assert _same(store.load(1), _state(7)) and _same(store.load(2), _state(2))


# -- 2. a phantom step from the change log ---------------------------------------------------
def _plant_commit_entry(storage: Storage, step: int, loss: float) -> str:
    """A ``commit`` log entry (ranked best) for a step directory that holds no marker."""
    storage.write_bytes(f"{step_dir(step)}/model.safetensors", b"junk")
    record = {"created": 1.0, "total_size": 4, "files_size": 4, "world_size": 1, "metadata": {}}
    entry = {"op": "commit", "step": step, "record": {**record, "metrics": {"loss": loss}, "durability": []}}
    name = f"index_log/{99999999999999999999:020d}-0badc0de.json"
    storage.write_bytes(name, json.dumps(entry).encode())
    return name


@pytest.mark.parametrize("when", ["at-open", "while-writing"])
def test_a_commit_log_entry_without_a_marker_is_no_step(
    where: tuple[str, dict[str, Any]], when: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = _open(where, keep_top_k=1, keep_last_n=1)
    store.save(1, _state(1), metrics={"loss": 1.0})
    store.save(2, _state(2), metrics={"loss": 0.5})
    writer = _open(where, keep_top_k=1, keep_last_n=1) if when == "at-open" else store
    with caplog.at_level(logging.WARNING, logger="ray_ckpt"):
        entry = _plant_commit_entry(store.storage, 9, 1e-9)
        writer.save(3, _state(3), metrics={"loss": 0.9})  # retention: the best (2) and the latest (3)
    assert any(entry in r.getMessage() for r in caplog.records)
    for reader in (writer, _open(where)):
        assert [i.step for i in reader.list()] == [2, 3]
        assert reader.best().step == 2 and reader.latest().step == 3
        assert _same(reader.load(2), _state(2))
        reader.verify(2)


# -- 3. an unreadable file is damage: skipped with one warning naming it ----------------------
def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


def _device(path: Path) -> None:
    os.symlink("/dev/zero", path)  # reads as a character device (an endless one)


def _sparse_tib(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB of holes: read whole, a MemoryError


UNREADABLE = {"fifo": _fifo, "directory": _directory, "device": _device, "sparse-1TiB": _sparse_tib}
PLACES = {
    "marker": "checkpoints/step_000000002/checkpoint.json",
    "eval-sidecar": "checkpoints/step_000000002/eval_metrics.json",
    "lease": "leases/step_000000002.0123456789abcdef.json",
    "log-entry": "index_log/00000000000000000001-0badc0de.json",
    "snapshot": "index.parquet",
}


def _three_steps(root: Path) -> None:
    store = CheckpointStore(str(root), run_name=RUN, metric_name="loss", mode="min", keep_last_n=5)
    for step in (1, 2, 3):
        store.save(step, _state(step), metrics={"loss": 1.0 / step})
    store.report_eval(2, {"eval/return": 5.0})


@pytest.mark.parametrize("kind", list(UNREADABLE), ids=list(UNREADABLE))
@pytest.mark.parametrize("place", list(PLACES), ids=list(PLACES))
def test_an_unreadable_file_is_skipped_naming_it_and_the_run_goes_on(
    tmp_path: Path, place: str, kind: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray_ckpt.cli.main import main as cli_main

    root = tmp_path / "runs"
    _three_steps(root)
    path = root / RUN / PLACES[place]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    UNREADABLE[kind](path)
    visible = [1, 3] if place == "marker" else [1, 2, 3]
    with caplog.at_level(logging.WARNING, logger="ray_ckpt"):
        for forget in (False, True):  # from the snapshot and log, then from the markers alone
            store = _open((str(root), {}), keep_last_n=5)
            if forget:
                for name in ("index.parquet", "index_log"):
                    target = root / RUN / name
                    if target.is_dir() and place != "log-entry":
                        for entry in target.iterdir():
                            entry.unlink()
                    elif target.is_file():
                        target.unlink()
                store = _open((str(root), {}), keep_last_n=5)
            assert [i.step for i in store.list()] == visible
            assert store.best().step == 3 and store.latest().step == 3
            for step in (1, 3):
                assert _same(store.load(step), _state(step))
            store.leased_steps()
    assert any(PLACES[place] in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    store = _open((str(root), {}), keep_last_n=5)
    store.save(4, _state(4), metrics={"loss": 0.1})
    store.report_eval(3, {"eval/return": 1.0})
    assert [i.step for i in _open((str(root), {})).list()] == [*visible, 4]
    assert cli_main(["ls", str(root / RUN)]) == 0
    capsys.readouterr()
    code = cli_main(["verify", str(root / RUN), "--json"])
    results = {r["step"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    if place == "marker":  # every step is reported, the unreadable one named
        assert code != 0 and PLACES[place] in results[2]["error"]
        assert all(results[s]["ok"] for s in (1, 3, 4))
    else:
        assert code == 0 and all(results[s]["ok"] for s in (*visible, 4))


def test_a_whole_file_read_is_bounded_before_it_is_read(
    where: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Over its limit, a marker or sidecar is refused before its bytes are read (locally by its
    size, on S3 by one ranged GET), and skipped as damage."""
    store = _two_steps(where)
    store.report_eval(1, {"eval/return": 1.0})
    big = json.dumps({"eval/return": 2.0, "pad": "x" * 4096}).encode()
    store.storage.write_bytes(f"{step_dir(1)}/eval_metrics.json", big)
    marker = store.storage.read_bytes(f"{step_dir(2)}/checkpoint.json")
    store.storage.write_bytes(f"{step_dir(2)}/checkpoint.json", marker + b" " * 4096)
    monkeypatch.setitem(Storage.read_bytes.__kwdefaults__, "limit", len(marker) + 100)
    with pytest.raises(Exception, match="limit") as refused:
        store.storage.read_bytes(f"{step_dir(2)}/checkpoint.json")
    assert "checkpoint.json" in str(refused.value)
    assert store.storage.read_bytes(f"{step_dir(1)}/checkpoint.json")  # under the limit: read
    with caplog.at_level(logging.WARNING, logger="ray_ckpt"):
        reader = _open(where)
        reader.run_index.forget()
        reader = _open(where)
        assert [i.step for i in reader.list()] == [1]
        assert "eval/return" not in reader.info(1).metrics
    assert any("eval_metrics.json" in r.getMessage() for r in caplog.records)


def test_bounded_reads_of_empty_and_exact_size_files(where: tuple[str, dict[str, Any]]) -> None:
    """The limit is exact: an empty file reads as empty (on S3 a ranged GET of an empty object is
    refused by the server), a file of exactly ``limit`` bytes reads whole, one byte more is refused."""
    storage = Storage(f"{where[0]}/{RUN}", where[1])
    storage.write_bytes("empty.json", b"")
    storage.write_bytes("ten.json", b"0123456789")
    assert storage.read_bytes("empty.json", limit=10) == b""
    assert storage.read_bytes("ten.json", limit=10) == b"0123456789"
    with pytest.raises(OSError, match="ten.json.*limit"):
        storage.read_bytes("ten.json", limit=9)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("missing.json", limit=10)


def test_the_checkpointer_starts_on_a_run_with_unreadable_files(
    tmp_path: Path, ray_session: str, run_name: str
) -> None:
    import ray_ckpt

    root = tmp_path / "runs"
    store = CheckpointStore(str(root), run_name=run_name, metric_name="loss", mode="min", keep_last_n=5)
    for step in (1, 2, 3):
        store.save(step, _state(step), metrics={"loss": 1.0 / step})
    run = root / run_name
    (run / "checkpoints" / "step_000000002" / "checkpoint.json").unlink()
    os.mkfifo(run / "checkpoints" / "step_000000002" / "checkpoint.json")
    _sparse_tib(run / "checkpoints" / "step_000000001" / "eval_metrics.json")
    (run / "leases").mkdir(exist_ok=True)
    (run / "leases" / "step_000000003.0123456789abcdef.json").mkdir()
    _sparse_tib(run / "index.parquet")
    config = ray_ckpt.CheckpointConfig(
        storage_uri=str(root), run_name=run_name, metric_name="loss", mode="min", keep_last_n=5, save_timeout_s=30.0
    )
    handle = ray_ckpt.start_checkpointer(config)
    try:
        assert [i.step for i in handle.list()] == [1, 3]
        worker = ray_ckpt.WorkerClient(run_name, 0, 1)
        worker.save(4, _state(4), metrics={"loss": 0.1}, blocking=True)
        assert handle.latest().step == 4 and handle.best().step == 4
        evaluator = ray_ckpt.EvalClient(run_name)
        assert _same(evaluator.load(3), _state(3))
        evaluator.close()
    finally:
        handle.shutdown()


# -- 6. tiering proves the remote copy before counting it durable ----------------------------
def _tiered(tmp_path: Path, remote: tuple[str, dict[str, Any]]) -> Any:
    from ray_ckpt import CheckpointConfig

    remote_uri, options = remote
    return CheckpointConfig(
        storage_uri=str(tmp_path / "local"),
        remote_uri=remote_uri,
        remote_storage_options=options,
        run_name=RUN,
        metric_name="loss",
        mode="min",
        leftover_grace_s=0,
    )


def _local_only(cfg: Any, **options: Any) -> CheckpointStore:
    """A writer of the same run without the remote tier (as if it died before uploading)."""
    return CheckpointStore(config=cfg.replace(remote_uri=None, remote_storage_options=None, **options))


@pytest.mark.parametrize("damage", ["missing-file", "damaged-file"])
def test_a_remote_copy_with_missing_or_damaged_files_is_uploaded_again(
    tmp_path: Path, remote: tuple[str, dict[str, Any]], damage: str
) -> None:
    cfg = _tiered(tmp_path, remote)
    _local_only(cfg).save(1, _state(1), metrics={"loss": 1.0})
    # The remote tier holds step 1's marker with the same file list, and missing or damaged files.
    local = Storage(str(tmp_path / "local" / RUN))
    far = Storage(f"{remote[0]}/{RUN}", remote[1])
    marker = json.loads(local.read_bytes(f"{step_dir(1)}/checkpoint.json"))
    shard = next(n for n in marker["files"] if n.endswith(".safetensors"))
    for name in marker["files"]:
        data = local.read_bytes(f"{step_dir(1)}/{name}")
        if name == shard and damage == "damaged-file":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        if name != shard or damage == "damaged-file":
            far.write_bytes(f"{step_dir(1)}/{name}", data)
    far.write_bytes(f"{step_dir(1)}/checkpoint.json", json.dumps(marker).encode())
    store = open_store(cfg)
    assert [i.durability for i in store.list()] == [["local"]]  # not verifiably uploaded yet
    store.save(2, _state(2), metrics={"loss": 2.0})  # the writer start queues step 1's upload
    assert sorted(store.wait_for_uploads(60)) == [1, 2]
    reader = CheckpointStore(remote[0], run_name=RUN, storage_options=remote[1])
    reader.verify(1)
    assert _same(reader.load(1), _state(1))
    assert all(i.durability == ["local", "remote"] for i in store.list())
    store.close()


def test_a_planted_uploaded_json_never_stops_an_upload(tmp_path: Path, remote: tuple[str, dict[str, Any]]) -> None:
    cfg = _tiered(tmp_path, remote)
    _local_only(cfg).save(1, _state(1), metrics={"loss": 1.0})
    step1 = tmp_path / "local" / RUN / step_dir(1)
    created = json.loads((step1 / "checkpoint.json").read_text())["created"]
    # A well-formed claim of an upload the remote tier does not hold, and a damaged one.
    (step1 / "uploaded.json").write_text(json.dumps({"step": 1, "uri": "x", "uploaded": 1.0, "created": created}))
    _local_only(cfg).save(2, _state(2), metrics={"loss": 2.0})
    (tmp_path / "local" / RUN / step_dir(2) / "uploaded.json").write_text('{"step": 2, "created": "yesterday"}')
    store = open_store(cfg)
    store.save(3, _state(3), metrics={"loss": 3.0})
    assert sorted(store.wait_for_uploads(60)) == [1, 2, 3]
    assert store.uploader.stats()["not_uploaded"] == []
    reader = CheckpointStore(remote[0], run_name=RUN, storage_options=remote[1])
    assert [i.step for i in reader.list()] == [1, 2, 3]
    for step in (1, 2, 3):
        reader.verify(step)
    store.close()


def test_not_uploaded_counts_a_planted_record(tmp_path: Path) -> None:
    """Before any upload ran, ``stats()["not_uploaded"]`` lists a step whose record is planted."""
    cfg = _tiered(tmp_path, (f"file://{tmp_path / 'remote'}", {}))
    _local_only(cfg).save(1, _state(1), metrics={"loss": 1.0})
    (tmp_path / "local" / RUN / step_dir(1) / "uploaded.json").write_text('{"step": 1, "created": 5.0}')
    store = open_store(cfg)
    assert store.uploader.stats()["not_uploaded"] == [1]
    assert store.retention_plan() == ([1], [])
    store.close(wait=False)


# -- 7. lying ranks ------------------------------------------------------------------------------
def _cause(ref: Any, timeout: float = 60) -> BaseException:
    """The exception a Ray call ended with (as the actor raised it)."""
    import ray

    with pytest.raises(ray.exceptions.RayTaskError) as excinfo:
        ray.get(ref, timeout=timeout)
    return excinfo.value.as_instanceof_cause()


@pytest.mark.slow
def test_an_alias_over_another_ranks_tensor_aborts_naming_key_and_ranks(
    tmp_path: Path, ray_session: str, run_name: str
) -> None:
    import ray

    import ray_ckpt
    from ray_ckpt import SaveAbortedError
    from ray_ckpt.distributed.wire import RankState, TensorMeta
    from tests.reliability.test_bad_reports import _assert_next_step_commits, _config, _f32, _gather_report

    handle = ray_ckpt.start_checkpointer(_config(tmp_path, run_name))
    try:
        rank0 = RankState({"w": TensorMeta("F32", (4,), 16), "b": TensorMeta("F32", (3,), 12)})
        rank1 = RankState({"w": TensorMeta("F32", (4,), 16)}, aliases={"b": "w"})  # b is rank 0's own tensor
        ray.get(handle.actor.report.remote(5, _gather_report(0, 2, rank0, {"w": _f32(4), "b": _f32(3)})))
        committed = handle.actor.wait_committed.remote(5)
        ray.get(handle.actor.report.remote(5, _gather_report(1, 2, rank1, {"w": _f32(4)})))
        cause = _cause(committed)
        assert isinstance(cause, SaveAbortedError) and "key 'b'" in str(cause), cause
        assert "rank 1" in str(cause) and "rank 0" in str(cause), cause
        assert [i.step for i in CheckpointStore(str(tmp_path), run_name=run_name).list()] == []
        _assert_next_step_commits(tmp_path, run_name, 6, [])
    finally:
        handle.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["declared-halves-of-2TiB", "2**62-elements"])
def test_direct_ranks_declaring_more_than_they_hold_abort_fast_naming_rank_and_key(
    tmp_path: Path, ray_session: str, run_name: str, case: str
) -> None:
    import time

    import ray

    import ray_ckpt
    from ray_ckpt import SaveAbortedError
    from ray_ckpt.distributed.wire import RankReport, RankResult, RankState, TensorMeta
    from tests.reliability.test_bad_reports import _assert_next_step_commits, _config, _good_state

    handle = ray_ckpt.start_checkpointer(_config(tmp_path, run_name, write_mode="direct"))
    try:
        started = time.monotonic()
        if case == "2**62-elements":
            state = RankState({"huge": TensorMeta("F32", (2**62,), 2**64)})
            waiting = handle.actor.plan.remote(5, RankReport(0, 2, _good_state(0)[0]), False, "direct")
            cause = _cause(handle.actor.plan.remote(5, RankReport(1, 2, state), False, "direct"))
            assert isinstance(cause, SaveAbortedError), cause
            assert "rank 1's report is invalid: model: key 'huge'" in str(cause) and "limit" in str(cause), cause
            _cause(waiting)
        else:
            half = 2**38  # two ranks "hold" halves of an F32[2**39]: 2 TiB they do not have
            refs = [
                handle.actor.plan.remote(
                    5,
                    RankReport(
                        r, 2, RankState({"big": TensorMeta("F32", (half,), half * 4, None, (2 * half,), (r * half,))})
                    ),
                    False,
                    "direct",
                )
                for r in range(2)
            ]
            ray.get(refs, timeout=120)
            committed = handle.actor.wait_committed.remote(5)
            for r in range(2):  # each rank writes what it holds (nothing) and says it is done
                ray.get(handle.actor.finish_rank.remote(5, RankResult(r)), timeout=120)
            cause = _cause(committed, timeout=120)
            assert isinstance(cause, SaveAbortedError) and "key 'big'" in str(cause), cause
            assert "ranks [0, 1]" in str(cause) and "never written" in str(cause), cause
        # refused before anything of it is read: reading 2 TiB from this disk takes over 15 minutes;
        # the bound leaves room for Ray calls on a machine loaded by other jobs
        assert time.monotonic() - started < 180
        assert [i.step for i in CheckpointStore(str(tmp_path), run_name=run_name).list()] == []
        _assert_next_step_commits(tmp_path, run_name, 6, [])
    finally:
        handle.shutdown()


def _slow_once(checkpointer: Any, needle: str, seconds: float) -> None:
    """Runs inside the actor: the first write of a path containing ``needle`` completes, then its
    writer thread stalls ``seconds`` (a master whose own share outlasts ``save_timeout_s``)."""
    import time

    storage = checkpointer.store.storage
    original = storage.write_stream
    fired: list[str] = []

    def write_stream(path: str, writer: Any, **kwargs: Any) -> Any:
        result = original(path, writer, **kwargs)
        if needle in path and not fired:
            fired.append(path)
            time.sleep(seconds)
        return result

    storage.write_stream = write_stream


@pytest.mark.slow
def test_save_timeout_covers_the_masters_share_too(tmp_path: Path, ray_session: str, run_name: str) -> None:
    import ray

    import ray_ckpt
    from ray_ckpt import SaveAbortedError

    config = ray_ckpt.CheckpointConfig(
        storage_uri=str(tmp_path), run_name=run_name, metric_name="loss", mode="min", save_timeout_s=8.0
    )
    handle = ray_ckpt.start_checkpointer(config)
    try:
        worker = ray_ckpt.WorkerClient(run_name, 0, 1)
        worker.save(1, _state(1), metrics={"loss": 1.0}, blocking=True).result(60)
        ray.get(handle.actor.__ray_call__.remote(_slow_once, "step_000000002/model", 16.0))
        with pytest.raises(SaveAbortedError, match="did not finish writing and committing it within save_timeout_s"):
            worker.save(2, _state(2), metrics={"loss": 0.5}, blocking=True).result(90)
        time.sleep(14)  # the stalled writer thread resumes: the aborted step must not commit after all
        store = CheckpointStore(str(tmp_path), run_name=run_name)
        assert [i.step for i in store.list()] == [1]
        assert not (tmp_path / run_name / "checkpoints" / "step_000000002").exists()
        info = worker.save(3, _state(3), metrics={"loss": 0.2}, blocking=True).result(60)
        assert info.step == 3 and _same(CheckpointStore(str(tmp_path), run_name=run_name).load(3), _state(3))
    finally:
        handle.shutdown()


# -- 4. what the index accepts it can always write back -----------------------------------------
def _entry(root: Path, op: dict[str, Any], name: str = "00000000000000000002-0badc0de") -> str:
    path = root / RUN / "index_log" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(op))
    return f"index_log/{name}.json"


def _record(step: int, created: float, **fields: Any) -> dict[str, Any]:
    record = {"created": created, "total_size": 4, "files_size": 4, "world_size": 1, "metadata": {}, "metrics": {}}
    return {"op": "commit", "step": step, "record": {**record, **fields}}


def _sums_past_int64(root: Path) -> str:
    path = root / RUN / "checkpoints" / "step_000000002" / "checkpoint.json"
    marker = json.loads(path.read_text())
    for digest in marker["files"].values():
        digest["size"] = 2**62  # each in range; their sum is not
    path.write_text(json.dumps(marker))
    return "checkpoints/step_000000002/checkpoint.json"


def _created(root: Path, step: int) -> float:
    return json.loads((root / RUN / "checkpoints" / f"step_{step:09d}" / "checkpoint.json").read_text())["created"]


INDEX_VALUES = {
    "marker-sizes-sum-past-int64": _sums_past_int64,
    "log-total-size-2**70": lambda root: _entry(root, _record(2, _created(root, 2), total_size=2**70)),
    "log-world-size-2**40": lambda root: _entry(root, _record(2, _created(root, 2), world_size=2**40)),
    "log-metric-lone-surrogate": lambda root: _entry(root, {"op": "metrics", "step": 2, "metrics": {"\ud800bad": 1.0}}),
    "sidecar-metric-lone-surrogate": lambda root: (
        (root / RUN / "checkpoints" / "step_000000002" / "eval_metrics.json").write_text('{"\\ud800bad": 1.0}'),
        "checkpoints/step_000000002/eval_metrics.json",
    )[1],
}


@pytest.mark.parametrize("case", list(INDEX_VALUES), ids=list(INDEX_VALUES))
def test_values_the_snapshot_cannot_store_are_refused_on_the_way_in(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "runs"
    where = (str(root), {})
    _three_steps(root)
    _open(where).run_index.forget()  # the planted entry is the only change since the snapshot
    named = INDEX_VALUES[case](root)
    with caplog.at_level(logging.WARNING, logger="ray_ckpt"):
        writer = _open(where, keep_last_n=100)
        writer.save(4, _state(4), metrics={"loss": 0.1})  # the writer's first save compacts
        for step in range(5, 5 + 40):  # past COMPACT_EVERY pending entries: every save commits, none raises
            writer.save(step, _state(step), metrics={"loss": 1.0 + step})
        writer.run_index.compact()
    assert any(named in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert (root / RUN / "index.parquet").exists()
    reader = _open(where)
    listed = [i.step for i in reader.list()]
    assert listed[:4] == ([1, 3, 4, 5] if case.startswith("marker") else [1, 2, 3, 4])
    assert reader.best().step == 4
    assert _same(reader.load(3), _state(3))


def test_a_metric_name_that_cannot_be_stored_is_refused_at_report(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _three_steps(root)
    store = _open((str(root), {}))
    with pytest.raises(ValueError, match="lone surrogate"):
        store.report_eval(2, {"\udcffscore": 1.0})
    with pytest.raises(ValueError, match="lone surrogate"):
        store.save(4, _state(4), metrics={"\ud800": 1.0})
    assert [i.step for i in store.list()] == [1, 2, 3]
    store.save(4, _state(4), metrics={"loss": 0.1})
    store.run_index.compact()


def test_a_snapshot_bomb_is_refused_before_it_is_decoded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A tiny dictionary/RLE-encoded index.parquet claiming 2M rows is refused at once; the
    markers rebuild the index."""
    import io
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "runs"
    _three_steps(root)
    rows = 2_000_000
    zeros = pa.array([0] * rows, pa.int32())
    table = pa.table(
        {
            "step": pa.array([1] * rows, pa.int64()),
            "uri": pa.DictionaryArray.from_arrays(zeros, pa.array(["x" * 1000])),
            "created": pa.array([1.0] * rows, pa.float64()),
            "total_size": pa.array([1] * rows, pa.int64()),
            "files_size": pa.array([1] * rows, pa.int64()),
            "world_size": pa.array([1] * rows, pa.int32()),
            "metrics": pa.MapArray.from_arrays(
                pa.array([0] * (rows + 1), pa.int32()), pa.array([], pa.string()), pa.array([], pa.float64())
            ),
            "metadata": pa.DictionaryArray.from_arrays(zeros, pa.array(["{}"])),
            "durability": pa.array([[]] * rows, pa.list_(pa.string())),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    (root / RUN / "index.parquet").write_bytes(sink.getvalue())
    assert len(sink.getvalue()) < 1 << 20
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ray_ckpt"):
        store = _open((str(root), {}))
        assert [i.step for i in store.list()] == [1, 2, 3]
    assert time.monotonic() - started < 10
    assert any("index.parquet" in r.getMessage() for r in caplog.records)
    assert _same(store.load(2), _state(2))


# -- 5. the writer refuses what its reader would refuse --------------------------------------------
def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"n": value}
    return value


@pytest.mark.parametrize("what", ["state", "trainer_state", "metadata"])
def test_state_nested_past_the_readers_limit_is_refused_at_save(where: tuple[str, dict[str, Any]], what: str) -> None:
    store = _two_steps(where)
    deep = 70  # past the 64 levels every JSON reader allows
    kwargs: dict[str, Any] = {"metrics": {"loss": 0.1}}
    state: Any = _state(3)
    if what == "state":
        state = {**_state(3), "deep": _nested(deep, torch.ones(2))}
    elif what == "trainer_state":
        kwargs["trainer_state"] = _nested(deep, torch.ones(2))
    else:
        kwargs["metadata"] = _nested(deep, 1)
    with pytest.raises(ValueError, match="64-level limit") as refused:
        store.save(3, state, **kwargs)
    assert "checkpoint.json" in str(refused.value) or "trainer_state.json" in str(refused.value)
    reader = _check_intact(where)
    assert [n for n in reader.storage.list_names("checkpoints") if "000000003" in n] == []
    # just under the limit commits and loads back
    shallow = _nested(15, torch.ones(2))  # (a state's structure nests three JSON levels per dict)
    store.save(3, {**_state(3), "deep": shallow}, trainer_state=shallow, metadata=_nested(50, 1))
    loaded = _open(where).load(3)
    assert _same({k: loaded[k] for k in ("w", "b")}, _state(3))


# -- 9. header dimensions every tensor can be allocated with ----------------------------------------
@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [2**62, 0, 4], [2**40, 2**40, 0]], ids=str)
def test_header_dims_that_cannot_be_allocated_are_refused_naming_the_file(tmp_path: Path, shape: list[int]) -> None:
    import struct

    from ray_ckpt import CorruptCheckpointError
    from ray_ckpt.core.writer import write_small_file

    root = tmp_path / "runs"
    _three_steps(root)
    step2 = root / RUN / "checkpoints" / "step_000000002"
    shard = next(p for p in step2.iterdir() if p.name.endswith(".safetensors"))
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header["evil"] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end]}  # zero bytes, checksum re-hashed
    body = json.dumps(header).encode()
    body += b" " * (-(len(body) + 8) % 8)
    # written as the writer writes a file, its digest recorded in the marker (an attacker who re-hashes)
    storage = Storage(str(root / RUN))
    digest = write_small_file(storage, step_dir(2), shard.name, struct.pack("<Q", len(body)) + body + raw[8 + length :])
    marker = json.loads(storage.read_bytes(f"{step_dir(2)}/checkpoint.json"))
    marker["files"][shard.name] = digest.to_json()
    storage.write_bytes(f"{step_dir(2)}/checkpoint.json", json.dumps(marker).encode())
    store = _open((str(root), {}))
    for load in (lambda: store.load(2), lambda: store.load(2, verify=False), lambda: store.verify(2)):
        with pytest.raises(CorruptCheckpointError, match=shard.name) as refused:
            load()
        assert "dimensions multiply past" in str(refused.value)
    assert [i.step for i in store.list()] == [1, 2, 3]
    assert _same(store.load(3), _state(3))


# -- 8. config files -------------------------------------------------------------------------------
YAML_BOMBS = {
    "20000-deep": "metric_name: loss\nstorage_options: " + "[" * 20_000 + "]" * 20_000 + "\n",
    "20000-deep-block": "storage_options:\n" + "".join(f"{' ' * (i + 1)}k{i}:\n" for i in range(2_000)) + "\n",
    "self-referencing-alias": "storage_options: &opts {anon: true, again: *opts}\n",
    "alias-bomb": "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(7))
    + "storage_options: {k: *h}\n",
}


@pytest.mark.parametrize("case", list(YAML_BOMBS), ids=list(YAML_BOMBS))
def test_a_hostile_yaml_config_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    import time

    from ray_ckpt import CheckpointConfig, ConfigError

    path = tmp_path / "hostile.yaml"
    path.write_text(YAML_BOMBS[case])
    started = time.monotonic()
    with pytest.raises(ConfigError, match="hostile.yaml") as refused:
        CheckpointConfig.from_yaml(path)
    assert time.monotonic() - started < 5
    assert "alias" in str(refused.value) or "deeper than 64" in str(refused.value), refused.value
    # a plain config still loads
    path.write_text("metric_name: loss\nstorage_options: {anon: true}\nretention: {keep_last_n: 2}\n")
    config = CheckpointConfig.from_yaml(path)
    assert config.metric_name == "loss" and config.keep_last_n == 2
