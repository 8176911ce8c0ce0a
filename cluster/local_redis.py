"""A local redis-server for `bark-serve up` with batch jobs and no configured Redis.

Persistence on (AOF), bound to 127.0.0.1, and its memory capped (``maxmemory``) with the policy
``noeviction``: a full Redis refuses writes (the batch API answers 503 ``store_full``) and never
evicts a key, since every key is queue state or a result that a client has not read yet."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bark_serve.cluster.ports import free_port


@dataclass
class LocalRedis:
    process: subprocess.Popen
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, directory: Path, port: int | None = None, timeout: float = 10.0,
              maxmemory: str = "1gb") -> "LocalRedis":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("batch jobs need Redis: set batch.redis_url, or install redis-server "
                               "(apt-get install redis-server) so that `bark-serve up` can start one")
        directory.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                                 "--appendonly", "yes", "--save", "60 1",
                                 "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return cls(proc, port, directory)
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"redis-server did not start on port {port}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
