"""bark_serve.cluster: what talks to shared cluster services and placement.

What lives here: the Redis job store, work queue and batch-worker loop
(jobs.py, queue.py, batch_worker.py, batch_types.py), the Redis connection
and its settings (redis_conn.py, ``RedisSettings``), a local redis-server for
development (local_redis.py), pool resources (placement.py) and free ports (ports.py).

Layer: above ``bark_serve.schema``, below ``bark_serve.serving``. It may import
``bark_serve.schema``, ``bark_serve.stages`` and third-party packages; it owns the small settings
types it needs, which ``serving`` translates its config into. Enforced by
import-linter (pyproject.toml, run by .ci/run).
"""
