"""Helpers of the robustness end-to-end tests: start the real app with a given config, and look at its replicas
(pids from Ray's actor table, the orchestrator's active requests and memory)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.serving.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_ERROR_BYTES = 4096  # no error answer may be bigger than this, whatever was sent
_SHARED: dict[str, Any] = {}  # this test process's shared app: its key, ExitStack and (url, ...) value


@contextlib.contextmanager
def running_app(raw_config: dict, metrics_port: int | None = None, num_cpus: float = 4,
                num_gpus: float | None = None):
    """Ray + Serve + the bark app from ``raw_config`` (an e2e_config dict); yields the base URL.

    The one way the end-to-end tests start the app: a new Ray instance of its own (``address="local"``,
    even when another Ray runs on this machine) in a temp dir of its own, removed afterwards.
    """
    import ray
    from ray import serve

    from bark_serve.serving.app import build_app

    stop_shared_app()  # one Ray instance per test process
    from bark_serve.serving.config import parse_config
    from bark_serve.serving.serve_config import patient_proxy_start, pool_resources

    os.environ["BARK_E2E_API_KEYS"] = f"{API_KEY},second-key"  # inherited by the Ray workers started below
    cfg = parse_config(raw_config)
    tmp = tempfile.mkdtemp(prefix="bark-e2e-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    if num_gpus is not None:  # GPUs the node advertises (fake ones on a CPU machine: Ray only counts them)
        extra["num_gpus"] = num_gpus
    patient_proxy_start()
    ray.init(address="local", num_cpus=num_cpus, resources=pool_resources(cfg), include_dashboard=False,
             configure_logging=False, log_to_driver=False, _temp_dir=tmp, **extra)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": cfg.http_port})
        t0 = time.time()
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
        print(f"bark app up in {time.time() - t0:.1f} s")
        yield f"http://127.0.0.1:{cfg.http_port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def shared_app(key: tuple, start: Callable[[contextlib.ExitStack], tuple]) -> tuple:
    """What ``start(stack)`` returned for ``key`` (a tuple, the app's base URL first) while that app still runs
    and answers /healthz in this process; else the running one is stopped and ``start`` called.
    ``start`` enters the app's context managers on ``stack``; :func:`stop_shared_app` closes them."""
    if _SHARED.get("key") == key and _answers(_SHARED["value"]):
        return _SHARED["value"]
    stop_shared_app()
    stack = contextlib.ExitStack()
    with stack:
        value = start(stack)
        _SHARED.update(key=key, value=value, stack=stack.pop_all())
    return value


def stop_shared_app() -> None:
    """Stop the shared app of this process, if one runs (tests/conftest.py calls it between groups)."""
    stack = _SHARED.pop("stack", None)
    _SHARED.clear()
    if stack is not None:
        stack.close()


def _answers(value: tuple) -> bool:
    try:
        return httpx.get(value[0] + "/healthz", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def replica_pids() -> dict[str, int]:
    """Deployment replica actor name -> pid, for every live Serve replica of the app."""
    from ray._private import state

    return {a["Name"] or a["ActorID"]: a["Pid"] for a in state.actors().values()
            if a["State"] == "ALIVE" and "ServeReplica" in a["ActorClassName"]}


def orchestrator_stats() -> dict:
    from ray import serve

    return serve.get_app_handle("bark").stats.remote().result(timeout_s=30)


def active_requests(url: str) -> int:
    return httpx.get(url + "/readyz", timeout=30).json()["active_requests"]


def wait_idle(url: str, timeout: float = 10.0) -> int:
    """Poll until the orchestrator has no active request (a stream frees its slot just after its last byte)."""
    deadline = time.time() + timeout
    active = active_requests(url)
    while active and time.time() < deadline:
        time.sleep(0.1)
        active = active_requests(url)
    return active


def rss_mb(pid: int) -> float:
    """Resident memory of a process on this machine (the replicas run here), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def assert_error_shape(resp: httpx.Response, context: str = "") -> dict:
    """A 4xx answer, small, JSON, in the documented {"error": {"message", "type", "code"}} shape."""
    where = f"{context}: {resp.status_code} {resp.text[:300]!r}"
    assert 400 <= resp.status_code < 500, where
    assert len(resp.content) < MAX_ERROR_BYTES, f"{context}: answer of {len(resp.content)} bytes"
    assert resp.headers.get("content-type", "").startswith("application/json"), where
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"}, where
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"], where
    assert isinstance(err["code"], str) and isinstance(err["type"], str), where
    return err


def speak(url: str, **extra) -> httpx.Response:
    """A normal, cheap request: the server must still answer it with audio."""
    body = {"text": "still serving", "max_semantic_tokens": 3, "seed": 1, **extra}
    return httpx.post(url + "/v1/tts", json=body, headers=AUTH, timeout=120)
