"""Ray fixtures for integration tests (one ray.init per session, small num_cpus)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.ray_session import RAY_NAMESPACE, ensure_ray


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """The session's local Ray; yields its namespace."""
    ensure_ray()
    yield RAY_NAMESPACE


@pytest.fixture
def run_name() -> str:
    """A unique run name (so named checkpointer actors never collide between tests)."""
    return f"run-{uuid.uuid4().hex[:10]}"
