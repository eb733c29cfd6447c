"""Fixtures of the reliability suite: a stoppable loopback S3 server and the S3 credentials
environment. The session's Ray and run names come from tests/conftest.py; the faults themselves
live in tests/reliability/faults.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.faults import MotoServer

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


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
