"""Fixtures of the reliability suite: the session's Ray, unique run names, a stoppable loopback S3
server and the S3 credentials environment (faults themselves live in tests/reliability/faults.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.ray_session import RAY_NAMESPACE, ensure_ray
from tests.reliability.faults import MotoServer

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """The session's local Ray (the one ray.init of the test session); yields its namespace."""
    ensure_ray()
    yield RAY_NAMESPACE


@pytest.fixture
def run_name() -> str:
    """A unique run name (named checkpointer actors never collide between tests)."""
    return f"rel-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def moto_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """This test's own moto S3 server on a free loopback port (stoppable; state kept across restarts)."""
    pytest.importorskip("moto.server")
    import s3fs

    for key, value in _FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    server = MotoServer()
    yield server
    try:
        server.stop()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
