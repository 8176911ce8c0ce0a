"""Fixtures of the batch-job tests: a real redis-server and a fresh key prefix per test."""

from __future__ import annotations

from tests.cluster.redis_server import own_redis, prefix, redis_server  # noqa: F401  (fixtures)
