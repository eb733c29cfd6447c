"""Shared fixtures: a real S3 endpoint (moto's HTTP server on loopback), fresh buckets, stores.

Also the Ray fixtures (`ray_session`, `run_name`): Ray starts only when a test asks for it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Never reach out for models or telemetry from the test suite.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, Any]]:
    """moto's real HTTP S3 server on 127.0.0.1 (started once per session).

    Yields ``{"url": endpoint_url, "storage_options": {...}}``; the storage options are what
    s3fs (and so ray-ckpt's Storage) needs to talk to it.
    """
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for key, value in _FAKE_AWS_ENV.items():
            mp.setenv(key, value)
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        mp.setenv("NO_PROXY", no_proxy)
        mp.setenv("no_proxy", no_proxy)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        url = f"http://127.0.0.1:{port}"
        try:
            yield {
                "url": url,
                "storage_options": {
                    "key": "testing",
                    "secret": "testing",
                    "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
                },
            }
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh, empty bucket on the loopback endpoint: ``("s3://<bucket>", storage_options)``."""
    import s3fs

    # s3fs caches filesystem instances (and their listings) by options: start every test clean.
    s3fs.S3FileSystem.clear_instance_cache()
    import boto3

    options = s3_endpoint["storage_options"]
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    # boto3, not s3fs.mkdir: s3fs sends a LocationConstraint that us-east-1 refuses.
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint["url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    try:
        yield f"s3://{bucket}", dict(options)
    finally:
        try:
            fs.rm(bucket, recursive=True)
        except Exception:  # best effort: the server goes away with the session anyway
            pass
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(params=["local", "s3"])
def remote(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """The remote tier: another local directory, or a bucket prefix on the loopback S3 endpoint."""
    if request.param == "local":
        return f"file://{tmp_path / 'remote'}", {}
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/prefix", options


@pytest.fixture
def s3fs_client(s3_endpoint: dict[str, Any]) -> Any:
    """An uncached s3fs filesystem on the loopback endpoint (to tamper with objects directly)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint["storage_options"])


@pytest.fixture
def tmp_run(tmp_path: Any) -> Callable[..., Any]:
    """A factory of CheckpointStores on a fresh local directory: ``tmp_run(run_name="r", **options)``."""
    from ray_ckpt import CheckpointStore

    root = tmp_path / "runs"

    def make(run_name: str = "run", **options: Any) -> CheckpointStore:
        return CheckpointStore(str(root), run_name=run_name, **options)

    make.root = root  # type: ignore[attr-defined]
    return make


@pytest.fixture
def memory_uri() -> Iterator[str]:
    """A unique memory:// prefix, removed afterwards (the memory filesystem is process-global)."""
    import fsspec

    prefix = f"memory://ray-ckpt-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    fs = fsspec.filesystem("memory")
    try:
        fs.rm(prefix.removeprefix("memory://"), recursive=True)
    except FileNotFoundError:
        pass


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """The session's one local Ray (started on first use only); yields its namespace.

    Shut down at the end of the session (index followers first, see
    :func:`tests.ray_session.shutdown_ray`), so the test process exits with pytest's own status
    instead of dying in Ray's exit hook.
    """
    from tests.ray_session import RAY_NAMESPACE, ensure_ray, shutdown_ray

    ensure_ray()
    try:
        yield RAY_NAMESPACE
    finally:
        shutdown_ray()


@pytest.fixture
def run_name() -> str:
    """A unique run name (so named checkpointer actors never collide between tests)."""
    return f"run-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def other_ray() -> Iterator[dict[str, str]]:
    """Another Ray on this machine, as `ray start --head` leaves one for a user: free ports, its own
    temp dir. Yields the environment a process needs to find it the way ``ray.init()`` would (its
    ``ray_current_cluster`` file is in ``RAY_TMPDIR``), without ``RAY_ADDRESS``; stopped after."""
    import shutil
    import subprocess
    import sys
    import tempfile

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp = tempfile.mkdtemp(prefix="rck-other-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=temp, RAY_USAGE_STATS_ENABLED="0")
    ports = [str(_free_port()) for _ in range(5)]
    start = [
        ray_bin, "start", "--head", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
        f"--port={ports[0]}", f"--node-manager-port={ports[1]}",
        f"--object-manager-port={ports[2]}", f"--ray-client-server-port={ports[3]}",
        f"--dashboard-agent-listen-port={ports[4]}", "--object-store-memory=100000000",
    ]  # fmt: skip
    out = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        # where a plain ray.init() looks first: <RAY_TMPDIR>/ray/ray_current_cluster
        assert os.path.exists(os.path.join(temp, "ray", "ray_current_cluster")), os.listdir(temp)
        yield {**env, "OTHER_RAY_ADDRESS": f"127.0.0.1:{ports[0]}"}
    finally:
        _stop_processes_under(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_processes_under(temp: str) -> None:
    """End the processes of the Ray started in ``temp`` (each names its session dir there), by
    their ids: `ray stop` would end every Ray on the machine, other users' too."""
    import signal
    import time

    def ours() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if temp.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
        return found

    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        pids = ours()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
