"""Fixtures of the batch-job tests: a real redis-server and a fresh key prefix per test."""

from __future__ import annotations

import pytest

from tests.cluster.redis_server import RedisServer, prefix, redis_server  # noqa: F401  (fixtures)


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test alone (for tests that restart it)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop(kill=True)
