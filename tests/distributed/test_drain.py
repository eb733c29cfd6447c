"""The drain (preemption) signal: DrainWatcher's logic on a scripted poll, and Ray's own drain on a
real 3-raylet cluster (tests/distributed/drain_scenario.py, in its own process)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Mapping

import pytest

from ray_ckpt.distributed.drain import DRAIN_REASONS, DrainWatcher, request_drain
from tests.integration.test_multinode import run_scenario

A, B, C = "a" * 56, "b" * 56, "c" * 56


class Script:
    """A poll function answering a scripted sequence of draining tables (the last one repeats)."""

    def __init__(self, *tables: Mapping[str, float | None] | Exception) -> None:
        self.tables = list(tables)
        self.calls = 0
        self.threads: set[int] = set()

    def __call__(self) -> Mapping[str, float | None]:
        self.threads.add(threading.get_ident())
        table = self.tables[min(self.calls, len(self.tables) - 1)]
        self.calls += 1
        if isinstance(table, Exception):
            raise table
        return table


class Recorder:
    """An on_drain callback recording its calls; raises for the nodes in ``failing``."""

    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.calls: list[tuple[str, float | None]] = []
        self.failing = failing

    async def __call__(self, node: str, deadline: float | None) -> None:
        self.calls.append((node, deadline))
        if node in self.failing:
            raise RuntimeError(f"flush for {node} failed")


def polls(watcher: DrainWatcher, n: int) -> list[list[str]]:
    """``n`` polls of ``watcher`` in one event loop; what each reported."""

    async def go() -> list[list[str]]:
        return [await watcher.poll_once() for _ in range(n)]

    return asyncio.run(go())


def test_each_newly_draining_node_of_interest_is_reported_once() -> None:
    script = Script({}, {A: 100.0, C: 50.0}, {A: 100.0, C: 50.0}, {A: 100.0, B: None, C: 50.0})
    calls = Recorder()
    watcher = DrainWatcher(lambda: {A, B}, calls, poll=script)
    assert polls(watcher, 5) == [[], [A], [], [B], []]
    assert calls.calls == [(A, 100.0), (B, None)]  # C drains but is not of interest
    assert watcher.reported == {A, B}


def test_a_node_draining_before_it_is_of_interest_is_reported_when_it_becomes_so() -> None:
    wanted: set[str] = {A}
    calls = Recorder()
    watcher = DrainWatcher(lambda: wanted, calls, poll=Script({B: 7.0}))
    assert polls(watcher, 2) == [[], []]
    wanted.add(B)
    assert polls(watcher, 2) == [[B], []]
    assert calls.calls == [(B, 7.0)]


def test_one_poll_reports_earliest_deadline_first_and_no_deadline_last() -> None:
    calls = Recorder()
    watcher = DrainWatcher(lambda: [A, B, C], calls, poll=Script({A: None, B: 30.0, C: 20.0}))
    assert polls(watcher, 1) == [[C, B, A]]
    assert calls.calls == [(C, 20.0), (B, 30.0), (A, None)]


def test_a_node_gone_from_the_table_is_forgotten_and_a_changed_deadline_is_not_reported_again() -> None:
    script = Script({A: 10.0}, {A: 5.0}, {}, {A: None})
    calls = Recorder()
    watcher = DrainWatcher(lambda: [A], calls, poll=script)
    assert polls(watcher, 3) == [[A], [], []]
    assert watcher.reported == frozenset()
    assert polls(watcher, 1) == [[A]]  # listed again after it left: reported again
    assert calls.calls == [(A, 10.0), (A, None)]


def test_a_failing_poll_is_logged_and_the_next_poll_reports(caplog: pytest.LogCaptureFixture) -> None:
    calls = Recorder()
    watcher = DrainWatcher(lambda: [A], calls, poll=Script(TimeoutError("GCS did not answer"), {A: 1.0}))
    with caplog.at_level(logging.WARNING, logger="ray_ckpt.distributed.drain"):
        assert polls(watcher, 2) == [[], [A]]
    assert "polling Ray's draining nodes failed" in caplog.text and "GCS did not answer" in caplog.text
    assert calls.calls == [(A, 1.0)]


def test_a_failing_callback_is_logged_counts_as_reported_and_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = Recorder(failing=frozenset({A}))
    watcher = DrainWatcher(lambda: [A, B], calls, poll=Script({A: 1.0, B: 2.0}))
    with caplog.at_level(logging.ERROR, logger="ray_ckpt.distributed.drain"):
        assert polls(watcher, 2) == [[A, B], []]
    assert calls.calls == [(A, 1.0), (B, 2.0)]
    assert f"drain callback for node {A} failed" in caplog.text and "flush for" in caplog.text


def test_the_poll_runs_off_the_event_loop_thread() -> None:
    script = Script({A: 1.0})
    polls(DrainWatcher(lambda: [A], Recorder(), poll=script), 1)
    assert script.threads and threading.get_ident() not in script.threads


def test_run_polls_every_interval_until_stopped() -> None:
    script = Script({}, {}, {A: 3.0})
    calls = Recorder()
    watcher = DrainWatcher(lambda: [A], calls, interval_s=0.01, poll=script)

    async def go() -> float:
        task = watcher.start()
        assert watcher.start() is task  # once
        deadline = time.monotonic() + 30.0
        while not calls.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await watcher.stop()
        assert task.done() and task.exception() is None
        return time.monotonic() - started

    stop_s = asyncio.run(go())
    assert calls.calls == [(A, 3.0)] and script.calls >= 3
    assert stop_s < 5.0  # stop() does not wait out a poll interval's worth of polls
    # a stopped watcher polls no more
    done = script.calls
    time.sleep(0.05)
    assert script.calls == done


def test_stop_wakes_a_long_interval_at_once() -> None:
    watcher = DrainWatcher(lambda: [A], Recorder(), interval_s=3600.0, poll=Script({}))

    async def go() -> float:
        watcher.start()
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await watcher.stop()
        return time.monotonic() - started

    assert asyncio.run(go()) < 5.0


def test_bad_arguments_are_refused_before_ray_is_asked() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        DrainWatcher(lambda: [], Recorder(), interval_s=0)
    with pytest.raises(ValueError, match="unknown drain reason"):
        request_drain(A, deadline_s=time.time() + 30, reason="spot")
    with pytest.raises(ValueError, match=r"Unix timestamp \(time.time\(\) \+ seconds\), got 30"):
        request_drain(A, deadline_s=30)  # seconds from now, not a timestamp
    with pytest.raises(ValueError, match="Unix timestamp"):
        request_drain(A, deadline_s=float("nan"))
    for bad in ("xyz", "ab" * 10, "f" * 56):  # not hex, too short, the nil id
        with pytest.raises(ValueError, match="not a Ray node id"):
            request_drain(bad, deadline_s=time.time() + 30)
    assert set(DRAIN_REASONS) == {"preemption", "idle_termination"}


# -- a real cluster ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The drain scenario's result: a 3-raylet cluster up, node_b drained, the cluster torn down.

    The cluster lives (and is shut down, also on a timeout's SIGTERM) in the scenario's process.
    """
    yield run_scenario("drain", tmp_path_factory.mktemp("drain"), 180.0, module="tests.distributed.drain_scenario")


@pytest.mark.slow
def test_a_drained_training_node_is_seen_with_its_deadline_and_reported_once(drained: dict) -> None:
    ids = drained["node_ids"]
    node_b = ids["node_b"]
    assert drained["before"] == {}
    # Ray refuses an idle termination of a node that runs an actor, and says why
    assert "no longer idle" in drained["idle_rejection"] and node_b in drained["idle_rejection"]
    # a preemption with a deadline is accepted; an actor on another node sees it, deadline to the ms
    assert drained["accepted"] is True
    assert list(drained["seen"]) == [node_b]
    assert drained["seen"][node_b] == pytest.approx(drained["deadline_sent"], abs=0.002)
    assert drained["seen_after_s"] < 60.0
    # the watcher's callback fired once, for node_b only, with that deadline; a re-drain did not re-fire it
    assert drained["redrain_accepted"] is True
    fired = drained["while_draining"]["fired"]
    assert [(node, deadline) for node, deadline, _ in fired] == [(node_b, drained["seen"][node_b])]
    assert drained["while_draining"]["reported"] == [node_b]
    # a draining node stays alive while it runs something; once its last actor is gone it ends
    assert drained["alive_while_draining"][node_b] is True
    assert drained["node_b_after"] == [False, 3, "drain_scenario"]  # AUTOSCALER_DRAIN_PREEMPTED
    assert drained["after"] == {"fired": fired, "reported": []}
