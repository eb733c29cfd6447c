"""ray-ckpt's metrics: exported as ``ray_ckpt_*`` (no double prefix), from every side, read back from Ray.

The export is checked where Prometheus would read it: the session node's metrics agent
(``/metrics`` on its metrics export port), which Ray's workers and driver report to about every
10 s. Observations come from real actors (a WorkerClient saving through a real checkpointer, an
EvalClient loading and querying) and a real tiered store in the driver (an upload, then one that
is retried and fails for good).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from ray_ckpt.distributed import metrics

SCRAPE_TIMEOUT_S = 60.0


def test_names_are_exported_with_one_ray_prefix() -> None:
    """Ray puts ``ray_`` before a user metric's name: ours are named ``ckpt_*`` so the family is ``ray_ckpt_*``."""
    from ray._private.telemetry.open_telemetry_metric_recorder import NAMESPACE

    assert f"{NAMESPACE}_" == metrics.RAY_EXPORT_PREFIX
    assert len(metrics.SPECS) == len(metrics.EXPORTED_NAMES) >= 12
    for spec in metrics.SPECS.values():
        assert spec.name.startswith("ckpt_") and not spec.name.startswith("ray_"), spec.name
        assert spec.exported_name.startswith("ray_ckpt_"), spec.exported_name
        assert not spec.exported_name.startswith("ray_ray_")
        assert spec.kind in ("counter", "gauge", "histogram")
        assert (spec.kind == "histogram") == bool(spec.boundaries), spec.name
    assert "ray_ckpt_committed_bytes_total" in metrics.EXPORTED_NAMES
    assert "ray_ckpt_worker_blocked_seconds" in metrics.EXPORTED_NAMES


def test_the_readme_lists_every_metric() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = set(re.findall(r"^\| `(ray_ckpt_\w+)` \|", readme, re.M))
    assert listed == set(metrics.EXPORTED_NAMES)


def test_observations_without_ray_do_nothing_and_never_import_or_start_ray() -> None:
    """In a process without Ray, and in one that imported Ray but never called ray.init."""
    code = """
import sys
from ray_ckpt.distributed import metrics
calls = [
    lambda: metrics.observe_commit("r", 0.5, 100), lambda: metrics.set_pending_saves("r", 2),
    lambda: metrics.observe_query("r", 0.001), lambda: metrics.observe_worker_save("r", 0.01, 10),
    lambda: metrics.observe_eval_load("r", 0.2), lambda: metrics.observe_eval_query("r", 0.0001),
    lambda: metrics.observe_upload("r", 1.0, 100), lambda: metrics.count_upload_retry("r"),
    lambda: metrics.count_upload_failure("r"),
]
for call in calls:
    call()
assert "ray" not in sys.modules, "an observation imported ray"
import ray
for call in calls:
    call()
assert not ray.is_initialized(), "an observation started Ray"
assert metrics._CREATED == {}, metrics._CREATED
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def _scrape() -> str:
    """The session node's Prometheus page (every process of the node reports there)."""
    import ray

    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _series(text: str, run: str) -> dict[str, float]:
    """``{sample name: value}`` of the ray_ckpt samples tagged with ``run``."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(ray_ckpt_\w+)\{(.*)\} (\S+)$", line)
        if match and f'run="{run}"' in match.group(2):
            if match.group(1).endswith("_bucket"):
                continue
            found[match.group(1)] = found.get(match.group(1), 0.0) + float(match.group(3))
    return found


def _wait_for(run: str, wanted: set[str]) -> dict[str, float]:
    """Scrape until every sample name in ``wanted`` is there for ``run`` (Ray reports every ~10 s)."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    found: dict[str, float] = {}
    while time.monotonic() < deadline:
        found = _series(_scrape(), run)
        if wanted <= set(found):
            return found
        time.sleep(1.0)
    raise AssertionError(
        f"missing for run {run!r} after {SCRAPE_TIMEOUT_S}s: {sorted(wanted - set(found))}; found {sorted(found)}"
    )


@pytest.mark.usefixtures("ray_session")
def test_metrics_reach_the_metrics_agent_from_actors_and_uploads(tmp_path: Path, run_name: str) -> None:
    import ray

    import ray_ckpt
    from ray_ckpt import CheckpointConfig, CheckpointStore, open_store
    from ray_ckpt.core.layout import step_dir
    from ray_ckpt.tiers.tiered import TieredCheckpointStore, UploadError

    # -- an eval client in a real actor: loads and queries ------------------------------------
    config = CheckpointConfig(storage_uri=str(tmp_path / "runs"), run_name=run_name, metric_name="loss", mode="min")
    handle = ray_ckpt.start_checkpointer(config)
    handle.register(torch.nn.Linear, {"in_features": 4, "out_features": 2})

    @ray.remote(num_cpus=0)
    class Trainer:
        def save(self, step: int) -> int:
            client = ray_ckpt.WorkerClient(run_name, 0, 1)
            state = torch.nn.Linear(4, 2).state_dict()
            client.save(step, state, metrics={"loss": 1.0 / step}, blocking=False)  # a snapshot is taken
            return client.wait()[-1].step

    @ray.remote(num_cpus=0)
    class Evaluator:
        def run(self) -> int:
            ev = ray_ckpt.EvalClient(run_name)
            info = ev.wait_for_checkpoint(None, timeout=60)
            for _ in range(5):
                ev.top_k(1)
                ev.latest()
            ev.load(info.step)
            ev.load_model(info.step)
            ev.close()
            return info.step

    # the actors stay alive until the scrape: a process reports its metrics every ~10 s, and what
    # it has not reported yet goes with it
    trainer, evaluator = Trainer.remote(), Evaluator.remote()
    assert ray.get(trainer.save.remote(2), timeout=120) == 2
    assert ray.get(evaluator.run.remote(), timeout=120) == 2
    assert handle.latest().step == 2  # a query answered by the checkpointer itself

    # -- uploads in this process: one that succeeds, one retried once then failing for good ------
    upload_run = f"{run_name}-up"
    tiered = CheckpointConfig(
        storage_uri=str(tmp_path / "local"), remote_uri=f"file://{tmp_path / 'remote'}", run_name=upload_run
    )
    store = open_store(tiered, observer=metrics.OBSERVER)  # the Ray layer's observer of uploads
    store.save(1, {"w": torch.ones(256)})
    assert sorted(store.wait_for_uploads(30)) == [1]
    store.close()
    CheckpointStore(config=tiered.replace(remote_uri=None)).save(2, {"w": torch.zeros(256)})
    shard = tmp_path / "local" / upload_run / step_dir(2) / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    failing = TieredCheckpointStore(  # resumes step 2's upload
        tiered, upload_retries=1, upload_backoff_s=0.01, observer=metrics.OBSERVER
    )
    with pytest.raises(UploadError):
        failing.upload_future(2).result(timeout=30)
    failing.close()

    found = _wait_for(
        run_name,
        {
            # the checkpointer: the commit of step 2, the pending-saves gauge, a query
            "ray_ckpt_commits_total",
            "ray_ckpt_committed_bytes_total",
            "ray_ckpt_save_seconds_count",
            "ray_ckpt_pending_saves",
            "ray_ckpt_query_seconds_count",
            # the trainer's WorkerClient
            "ray_ckpt_worker_blocked_seconds_count",
            "ray_ckpt_worker_snapshot_bytes_total",
            # the evaluator's EvalClient
            "ray_ckpt_eval_load_seconds_count",
            "ray_ckpt_eval_query_seconds_count",
        },
    )
    committed = CheckpointStore(config=config).list()
    assert found["ray_ckpt_commits_total"] == 1 and found["ray_ckpt_save_seconds_count"] == 1
    assert found["ray_ckpt_committed_bytes_total"] == committed[0].files_size
    assert found["ray_ckpt_pending_saves"] == 0
    assert found["ray_ckpt_query_seconds_count"] >= 1
    assert found["ray_ckpt_worker_blocked_seconds_count"] == 1
    assert found["ray_ckpt_worker_snapshot_bytes_total"] >= 4 * 2 * 4 + 2 * 4  # Linear(4, 2) in fp32
    assert found["ray_ckpt_eval_load_seconds_count"] == 2  # load() and load_model()
    assert found["ray_ckpt_eval_query_seconds_count"] >= 10
    uploads = _wait_for(
        upload_run,
        {
            "ray_ckpt_upload_bytes_total",
            "ray_ckpt_upload_seconds_count",
            "ray_ckpt_upload_retries_total",
            "ray_ckpt_upload_failures_total",
        },
    )
    assert uploads["ray_ckpt_upload_seconds_count"] == 1
    assert (
        uploads["ray_ckpt_upload_bytes_total"]
        == CheckpointStore(f"file://{tmp_path / 'remote'}", run_name=upload_run).list()[0].files_size
    )
    assert uploads["ray_ckpt_upload_retries_total"] == 1 and uploads["ray_ckpt_upload_failures_total"] == 1
    assert "ray_ray_ckpt" not in _scrape()
    del trainer, evaluator


@pytest.mark.usefixtures("ray_session")
def test_checkpointer_and_worker_observations_export_from_an_actor(run_name: str) -> None:
    """The checkpointer's and workers' functions, called in an actor, reach the agent under their names."""
    import ray

    @ray.remote(num_cpus=0)
    class Observer:
        def observe(self, run: str) -> int:
            metrics.observe_commit(run, 0.25, 1000)
            metrics.observe_commit(run, 0.5, 500)
            metrics.set_pending_saves(run, 3)
            metrics.observe_query(run, 0.0002)
            metrics.observe_worker_save(run, 0.01, 4096)
            return os.getpid()

    observer = Observer.remote()  # alive until the scrape (see above)
    assert ray.get(observer.observe.remote(run_name), timeout=120) != os.getpid()
    found = _wait_for(
        run_name,
        {
            "ray_ckpt_save_seconds_count",
            "ray_ckpt_committed_bytes_total",
            "ray_ckpt_commits_total",
            "ray_ckpt_pending_saves",
            "ray_ckpt_query_seconds_count",
            "ray_ckpt_worker_blocked_seconds_count",
            "ray_ckpt_worker_snapshot_bytes_total",
        },
    )
    assert found["ray_ckpt_committed_bytes_total"] == 1500 and found["ray_ckpt_commits_total"] == 2
    assert found["ray_ckpt_save_seconds_count"] == 2 and found["ray_ckpt_pending_saves"] == 3
    assert found["ray_ckpt_worker_snapshot_bytes_total"] == 4096
    del observer


@pytest.mark.usefixtures("ray_session")
def test_a_gauge_survives_an_idle_period(run_name: str) -> None:
    """A gauge set once (no save for a while) is still exported after several of Ray's export
    intervals: Ray drops a series not recorded within about two, so ray-ckpt sets it again."""
    import ray

    @ray.remote(num_cpus=0)
    class Idle:
        def set_once(self, run: str) -> float:
            metrics.set_pending_saves(run, 2)
            return metrics.GAUGE_REFRESH_S

    idle = Idle.remote()  # alive, and idle, through the scrapes
    refresh_s = ray.get(idle.set_once.remote(run_name), timeout=120)
    assert _wait_for(run_name, {"ray_ckpt_pending_saves"})["ray_ckpt_pending_saves"] == 2
    time.sleep(35.0)  # > 3 export intervals (10 s each) with no save: only the refresh records it
    assert refresh_s < 10.0
    found = _wait_for(run_name, {"ray_ckpt_pending_saves"})
    assert found["ray_ckpt_pending_saves"] == 2
    del idle
