"""Concurrent readers vs retention: 32 eval readers load and lease while the trainer saves and
retention deletes. Leased checkpoints are never lost under a reader; a reader of an unleased
checkpoint that disappears gets CheckpointNotFoundError/CorruptCheckpointError, never tensors
other than what that step saved. The races behind those promises are also forced one by one.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ray_ckpt import CheckpointNotFoundError, CheckpointStore, CorruptCheckpointError
from ray_ckpt.distributed.eval import Lease
from tests.reliability.faults import SHARD_LIMIT, assert_state, tensors_for

RUN = "busy"
READERS = 32


def _store(root: Path, **options: Any) -> CheckpointStore:
    return CheckpointStore(str(root), run_name=RUN, metric_name="loss", max_shard_size=SHARD_LIMIT, **options)


@pytest.mark.slow
def test_32_readers_lease_and_load_while_the_trainer_saves_and_retention_deletes(tmp_path: Path) -> None:
    trainer = _store(tmp_path, keep_last_n=2)
    trainer.save(1, tensors_for(1), metrics={"loss": 1.0})
    stop = threading.Event()
    lock = threading.Lock()
    tally: Counter[str] = Counter()
    failures: list[str] = []

    def leased_reader(index: int) -> None:
        store = _store(tmp_path)  # each reader has its own view of the run, like an eval worker
        while not stop.is_set():
            latest = store.latest()
            try:
                lease = Lease(store, latest.step, ttl_s=30.0, holder=f"reader-{index}")
            except CheckpointNotFoundError:
                with lock:
                    tally["lease refused (already deleted)"] += 1
                continue
            try:
                with lease:
                    for _ in range(2):
                        time.sleep(0.005)  # let the trainer commit and apply retention meanwhile
                        assert_state(lease.step, store.load(lease.step))
                with lock:
                    tally["leased reads"] += 2
            except Exception as exc:  # any failure of a leased read breaks the guarantee
                with lock:
                    failures.append(f"reader {index}, leased step {lease.step}: {type(exc).__name__}: {exc}")

    def unleased_reader(index: int) -> None:
        store = _store(tmp_path)
        rng = random.Random(index)
        while not stop.is_set():
            listed = store.list()
            step = listed[0].step if rng.random() < 0.7 else rng.choice(listed).step  # mostly the oldest: doomed
            time.sleep(0.002)
            try:
                loaded = store.load(step) if rng.random() < 0.5 else store.load(step, keys=["layer0.weight"])
            except (CheckpointNotFoundError, CorruptCheckpointError):
                with lock:
                    tally["unleased read of a deleted step: clear error"] += 1
                continue
            try:
                if "embed.weight" in loaded:
                    assert_state(step, loaded)
                else:
                    assert loaded["layer0.weight"].equal(tensors_for(step)["layer0.weight"]), "layer0.weight differs"
                with lock:
                    tally["unleased reads"] += 1
            except AssertionError as exc:
                with lock:
                    failures.append(f"reader {index}: step {step} came back with wrong tensors: {exc}")

    threads = [
        threading.Thread(target=leased_reader if i % 2 == 0 else unleased_reader, args=(i,), daemon=True)
        for i in range(READERS)
    ]
    for thread in threads:
        thread.start()
    try:
        for step in range(2, 26):
            trainer.save(step, tensors_for(step), metrics={"loss": 1.0 / step})
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not failures, "\n".join(failures[:20])
    assert tally["leased reads"] > READERS, tally  # every reader really read, many times
    assert tally["unleased reads"] > 0, tally
    # Once every lease is released, retention is back to keep_last_n.
    trainer.save(26, tensors_for(26), metrics={"loss": 1.0 / 26})
    assert [i.step for i in trainer.list()] == [25, 26]
    assert trainer.active_leases() == []


# ---------------------------------------------------------------------------------------------
# The races, forced deterministically.
# ---------------------------------------------------------------------------------------------
def test_a_lease_taken_while_retention_decides_is_honoured(tmp_path: Path) -> None:
    """Retention read the leases (none), then a reader leased the step: it must not be deleted."""
    trainer = _store(tmp_path, keep_last_n=1)
    reader = _store(tmp_path)
    trainer.save(1, tensors_for(1), metrics={"loss": 1.0})
    original = trainer.leases.leased_steps  # what retention reads before it decides
    leased: list[str] = []

    def leases_then_a_reader_leases() -> set[int]:
        found = original()
        if not leased:
            leased.append(reader.acquire_lease(1, ttl_s=60.0, holder="reader"))  # granted: step 1 is committed
        return found

    trainer.leases.leased_steps = leases_then_a_reader_leases  # type: ignore[method-assign]
    trainer.save(2, tensors_for(2), metrics={"loss": 0.5})
    assert leased, "the reader never leased"
    assert [i.step for i in reader.list()] == [1, 2]
    assert_state(1, reader.load(1))
    reader.release_lease(1, leased[0])
    trainer.leases.leased_steps = original  # type: ignore[method-assign]
    trainer.save(3, tensors_for(3), metrics={"loss": 0.3})
    assert [i.step for i in reader.reload().list()] == [3]


def test_a_lease_asked_for_while_retention_deletes_is_refused(tmp_path: Path) -> None:
    """A lease asked for once retention has decided to delete the step is refused, not granted."""
    trainer = _store(tmp_path, keep_last_n=1)
    reader = _store(tmp_path)
    trainer.save(1, tensors_for(1), metrics={"loss": 1.0})
    original_delete = trainer._delete_local  # what retention calls once the tombstone is up
    outcome: list[Any] = []

    def delete(step: int) -> None:
        try:
            outcome.append(reader.acquire_lease(step, ttl_s=60.0, holder="late reader"))
        except CheckpointNotFoundError as exc:
            outcome.append(exc)
        original_delete(step)

    trainer._delete_local = delete  # type: ignore[method-assign]
    trainer.save(2, tensors_for(2), metrics={"loss": 0.5})
    assert len(outcome) == 1 and isinstance(outcome[0], CheckpointNotFoundError), outcome
    assert "step 1" in str(outcome[0])
    assert [i.step for i in reader.list()] == [2]
    assert reader.leased_steps() == set()


def _interleave(reader: CheckpointStore, when: str, action: Any) -> None:
    """Run ``action`` once, right before the reader opens its first file whose name contains ``when``."""
    original = reader.storage.open_read
    fired: list[bool] = []

    def open_read(path: str, **kwargs: Any) -> Any:
        if when in path and not fired:
            fired.append(True)
            action()
        return original(path, **kwargs)

    reader.storage.open_read = open_read  # type: ignore[method-assign]


def test_deleted_while_being_read_is_a_clear_error(tmp_path: Path) -> None:
    trainer = _store(tmp_path)
    reader = _store(tmp_path)
    for step in (1, 2):
        trainer.save(step, tensors_for(step), metrics={"loss": 1.0 / step})
    _interleave(reader, "step_000000001/model-00002", lambda: trainer.delete(1))
    with pytest.raises(CheckpointNotFoundError, match="step 1"):
        reader.load(1)
    assert_state(2, reader.load(2))


@pytest.mark.parametrize(
    ("how", "verify_on_load", "keys"),
    [("whole, verified", True, None), ("whole, unverified", False, None), ("some keys", True, ["layer1.weight"])],
)
def test_replaced_while_being_read_never_yields_a_mix(
    tmp_path: Path, how: str, verify_on_load: bool, keys: list[str] | None
) -> None:
    """Step 1 is deleted and saved again (overwrite=True) with other values between two shard reads."""
    trainer = _store(tmp_path)
    reader = _store(tmp_path, verify_on_load=verify_on_load)
    trainer.save(1, tensors_for(1), metrics={"loss": 1.0})
    replacement = tensors_for(99)  # same keys, shapes and sizes; other values
    when = "model-00002" if keys is None else "model-00003"
    _interleave(reader, f"step_000000001/{when}", lambda: trainer.save(1, replacement, overwrite=True))
    try:
        loaded = reader.load(1, keys=keys)
    except (CheckpointNotFoundError, CorruptCheckpointError) as exc:
        assert "step_000000001" in str(exc) or "step 1" in str(exc), exc
        return
    # No error: then every tensor must be from one and the same save (never a torn mix).
    origins = {
        key: ("old" if value.equal(tensors_for(1)[key]) else "new" if value.equal(replacement[key]) else "neither")
        for key, value in loaded.items()
    }
    assert len(set(origins.values())) == 1 and "neither" not in origins.values(), f"{how}: {origins}"
    assert set(origins.values()) == {"old"}, f"{how}: the reader asked for the step it resolved, got {origins}"
