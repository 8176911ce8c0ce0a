"""`bark-serve up` starts its own redis-server for batch jobs when none is configured, with persistence."""

from __future__ import annotations

import subprocess
import sys

import redis

from bark_serve.cluster.local_redis import LocalRedis


def test_local_redis_starts_persists_and_stops(tmp_path):
    server = LocalRedis.start(tmp_path / "state")
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping() and client.config_get("appendonly")["appendonly"] == "yes"
        client.set("k", "v")
    finally:
        server.stop()
    assert server.process.poll() is not None
    again = LocalRedis.start(tmp_path / "state")  # same directory: the data survived the restart
    try:
        assert redis.Redis.from_url(again.url).get("k") == b"v"
    finally:
        again.stop()


def test_up_refuses_an_unreachable_redis_in_one_line(tiny_ckpt, tmp_path):
    cfg = tmp_path / "batch.yaml"
    cfg.write_text("batch: {enabled: true, redis_url: 'redis://127.0.0.1:1/0'}\n")
    res = subprocess.run([sys.executable, "-m", "bark_serve.cli", "up", "--config", str(cfg),
                          "--model", str(tiny_ckpt)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "redis" in res.stderr.lower()
