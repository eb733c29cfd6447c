"""Crash consistency: a process saving in a loop is SIGKILLed at 20+ deterministic moments.

A traced run of the save loop lists every storage event (each write chunk, fsync, rename before
and after, delete). Each kill run forks a fresh child that kills itself at one of those events;
the parent then checks that every listed checkpoint verifies and loads bit-exact, that every
earlier checkpoint is intact, and that the leftovers are invisible and removed by ``gc()``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_ckpt import CheckpointStore
from tests.reliability.faults import (
    CRASH_KEEP_LAST_N,
    MARKER,
    ForkServer,
    TraceEvent,
    assert_state,
    assert_trainer_state,
    crash_store_options,
    read_trace,
    step_dirs,
    temp_files,
    tensors_for,
    trainer_state_for,
    unmarked_step_dirs,
)

RUN = "crashy"
MIN_KILL_POINTS = 20


@pytest.fixture(scope="module")
def forks() -> Iterator[ForkServer]:
    """A subprocess that imported torch and ray_ckpt once and forks one save-loop child per run."""
    server = ForkServer()
    yield server
    server.close()


def _run_child(forks: ForkServer, root: Path, steps: list[int], kill_at: int, trace: Path | None) -> int:
    """Run the save loop in a fresh child process; its exit code (-9 when it SIGKILLed itself)."""
    return forks.run(str(root), RUN, steps, kill_at, str(trace) if trace else None, str(root / "committed.log"))


def _committed(root: Path) -> list[int]:
    log = root / "committed.log"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def _base(tmp_path: Path, steps: list[int]) -> Path:
    """A run with ``steps`` committed by this process (the checkpoints that must survive)."""
    root = tmp_path / f"base-{len(steps)}"
    root.mkdir(parents=True)
    store = CheckpointStore(str(root), run_name=RUN, **crash_store_options())
    for step in steps:
        store.save(step, tensors_for(step), metrics={"loss": 1.0 / step}, trainer_state=trainer_state_for(step))
    (root / "committed.log").write_text("".join(f"{s}\n" for s in steps))
    return root


def _copy(base: Path, root: Path) -> Path:
    shutil.copytree(base, root)
    return root


def _distinct_moments(events: list[TraceEvent]) -> list[TraceEvent]:
    """Drop the middle of runs of identical events (e.g. the 2nd..n-1th chunk written to one file)."""
    keep = []
    for i, event in enumerate(events):
        same = [
            j
            for j in (i - 1, i + 1)
            if 0 <= j < len(events) and (events[j].kind, events[j].path) == (event.kind, event.path)
        ]
        if len(same) < 2:
            keep.append(event)
    return keep


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory on tmpfs when there is one: a process kill keeps the page cache, so the
    crash semantics are the same, and fsync costs nothing on a busy 2-core machine."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="ray-ckpt-crash-", dir=shm))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _describe(event: TraceEvent) -> str:
    return f"kill at event {event.number} ({event.kind} {Path(event.path).name}) while saving step {event.step}"


def _check_after_kill(root: Path, event: TraceEvent, steps: list[int]) -> None:
    """Everything the guarantee promises after a SIGKILL at ``event`` of a loop saving ``steps``."""
    run_dir = root / RUN
    logged = _committed(root)
    inflight = event.step
    assert logged[-1:] == [s for s in steps if s < inflight][-1:], f"log {logged} vs in-flight step {inflight}"

    reader = CheckpointStore(str(root), run_name=RUN, **crash_store_options())
    listed = [i.step for i in reader.list()]
    # Only committed steps are listed: the logged ones plus, perhaps, the in-flight one.
    assert set(listed) <= set(logged) | {inflight}, listed
    # Every earlier checkpoint retention had not deleted is still there.
    newest = (logged + ([inflight] if inflight in listed else []))[-CRASH_KEEP_LAST_N:]
    assert set(newest) <= set(listed), f"lost committed checkpoints: listed {listed}, expected {newest}"
    # At most one step more than retention keeps: the one retention was deleting when killed.
    assert len(listed) <= len(newest) + 1, listed
    for step in listed:
        reader.verify(step)
        assert_state(step, reader.load(step))
        assert_trainer_state(step, reader.load_trainer_state(step))
    latest = reader.latest()
    assert (latest.step if latest else None) == max(listed, default=None)

    # Leftovers are invisible (above) and gc() removes them all; committed steps are untouched.
    reader.gc()
    assert temp_files(run_dir) == [], temp_files(run_dir)
    assert unmarked_step_dirs(run_dir) == [], unmarked_step_dirs(run_dir)
    assert step_dirs(run_dir) == [f"step_{s:09d}" for s in listed]
    fresh = CheckpointStore(str(root), run_name=RUN, **crash_store_options())
    assert [i.step for i in fresh.list()] == listed

    # The next start carries on: a new save commits and the run stays consistent.
    nxt = max(listed, default=0) + 1
    fresh.save(nxt, tensors_for(nxt), metrics={"loss": 1.0 / nxt}, trainer_state=trainer_state_for(nxt))
    again = CheckpointStore(str(root), run_name=RUN, **crash_store_options())
    for info in again.list():
        again.verify(info.step)
    assert_state(nxt, again.load("latest"))


# (steps committed before the child starts, steps the child saves, the step whose save is killed)
SCENARIOS = {
    "first save of an empty run": ([], [1, 2], 1),
    "steady state, retention deleting": ([1, 2, 3], [4, 5], 4),
}


@pytest.mark.slow
def test_sigkill_at_every_storage_event_of_a_save_never_loses_or_exposes_a_checkpoint(
    fast_dir: Path, forks: ForkServer
) -> None:
    tmp_path = fast_dir
    failures: list[str] = []
    points: list[TraceEvent] = []
    for number, (scenario, (before, steps, killed_step)) in enumerate(SCENARIOS.items()):
        base = _base(tmp_path / f"s{number}", before) if before else (tmp_path / f"s{number}" / "empty")
        base.mkdir(parents=True, exist_ok=True)
        trace_file = tmp_path / f"trace{number}.tsv"
        traced = _copy(base, tmp_path / f"s{number}" / "trace")
        assert _run_child(forks, traced, steps, 0, trace_file) == 0
        assert _committed(traced) == before + steps
        chosen = _distinct_moments([e for e in read_trace(trace_file) if e.step == killed_step])
        points += chosen
        for event in chosen:
            root = _copy(base, tmp_path / f"s{number}" / f"kill{event.number:04d}")
            code = _run_child(forks, root, steps, event.number, None)
            if code != -9:
                failures.append(f"{scenario}: {_describe(event)}: child exited {code}, not killed")
                continue
            try:
                _check_after_kill(root, event, before + steps)
            except Exception as exc:  # collect every broken moment, then fail once
                failures.append(f"{scenario}: {_describe(event)}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
    assert len(points) >= MIN_KILL_POINTS, f"only {len(points)} kill points"
    # The moments the issue names are among them.
    names = [(e.kind, Path(e.path).name) for e in points]
    assert any(k == "write" and n.startswith("model-00002") for k, n in names), "during a shard write"
    assert any(k == "fsync" and n.startswith("model-00001") for k, n in names), "between shards"
    assert ("rename-before", MARKER) in names and ("rename-after", MARKER) in names, "around the commit marker"
    assert any(k == "rm" and n == MARKER for k, n in names), "during retention's delete"
    assert any(k == "rename-before" and re.fullmatch(r"\d{20}-[0-9a-f]{8}\.json", n) for k, n in names), (
        "while the run index's change-log entry is written"
    )


def test_a_torn_marker_rename_is_all_or_nothing(tmp_path: Path, forks: ForkServer) -> None:
    """Killed right after the marker's rename the step is committed; right before, it is not."""
    base = _base(tmp_path, [1])
    trace_file = tmp_path / "trace.tsv"
    assert _run_child(forks, _copy(base, tmp_path / "trace"), [2], 0, trace_file) == 0
    renames = [e for e in read_trace(trace_file) if e.step == 2 and Path(e.path).name == MARKER]
    outcome = {}
    for kind in ("rename-before", "rename-after"):
        event = next(e for e in renames if e.kind == kind)
        root = _copy(base, tmp_path / kind)
        assert _run_child(forks, root, [2], event.number, None) == -9
        outcome[kind] = [i.step for i in CheckpointStore(str(root), run_name=RUN).list()]
    assert outcome == {"rename-before": [1], "rename-after": [1, 2]}
