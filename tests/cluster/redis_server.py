"""A real redis-server for tests: free localhost port, temp dir, AOF persistence, restartable.

Install it with ``apt-get update && apt-get install -y redis-server``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from bark_serve.cluster.ports import free_port

INSTALL_HINT = "redis-server is not installed: run `apt-get update && apt-get install -y redis-server`"


class RedisServer:
    """One redis-server process with ``--appendonly yes`` in ``workdir``; ``restart()`` keeps port and data."""

    def __init__(self, workdir: Path, port: int | None = None, extra_args: tuple[str, ...] = (),
                 scheme: str = "redis", client_kwargs: dict | None = None):
        binary = shutil.which("redis-server") or next(
            (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).exists()), None)
        if binary is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.binary = binary
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.extra_args = list(extra_args)
        self.scheme = scheme
        self.client_kwargs = client_kwargs or {}  # how the readiness check connects (TLS, password)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        tls = self.scheme == "rediss"
        port_args = ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        cmd = [self.binary, *port_args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
               "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"), *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, **self.client_kwargs)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    log = (self.workdir / "redis.log").read_text()[-2000:]
                    raise RuntimeError(f"redis-server exited: {log}") from None
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start within 10 s")
            time.sleep(0.02)
        client.close()
        return self

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (Redis flushes its AOF and exits) or SIGKILL."""
        if self.proc is None:
            return
        self.proc.kill() if kill else self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again. redis-py (8.x) retries a failed command a few
        times with backoff by itself, so an outage shorter than that is invisible to its clients."""
        self.stop(kill=kill)
        time.sleep(down_s)
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the whole session (tests keep apart by key prefix)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test alone, with AOF (for tests that kill, stop or restart it)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture
def prefix() -> str:
    """Keys of one test never meet another's: each test has its own prefix on the shared server."""
    return f"t{uuid.uuid4().hex[:10]}"
