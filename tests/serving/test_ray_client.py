"""A Ray cluster started with `ray start --head` (client server on a free port, token auth on), the app
deployed from the rendered Serve config file with `serve run`, and a driver outside the cluster calling it
through Ray Client (`ray.init("ray://127.0.0.1:PORT")`).

The head runs with --block in its own session and temp dir, and the test stops exactly that process group:
`ray stop --force` would kill every Ray process on the machine, other people's included. Ports come from
the kernel's ephemeral range (32768+), never from 10002-19999, which are Ray's worker ports here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from bark_serve.cluster.ports import free_port
from tests.serving.conftest import e2e_config

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def run(cmd, env=None, timeout=300, check=True):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd[:3]} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def test_serve_config_file_deploys_and_ray_client_calls_the_handle(tiny_ckpt, tmp_path):
    from bark_serve.serving.config import parse_config
    from bark_serve.serving.serve_config import pool_resources, render_serve_config

    raw = e2e_config(str(tiny_ckpt), free_port())
    raw["orchestrator"].pop("api_keys_env")
    cfg = parse_config(raw)
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump(render_serve_config(cfg), sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="rc-")  # short: Ray's socket paths must fit in 107 bytes
    for attempt in range(3):
        gcs_port, client_port = free_port(), free_port()
        with open(tmp_path / "head.log", "w") as head_log:  # the head writes to its own copy of the handle
            head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                     f"--port={gcs_port}", f"--ray-client-server-port={client_port}", "--num-cpus=4",
                                     f"--resources={json.dumps(pool_resources(cfg))}", "--include-dashboard=false",
                                     "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
                                    stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
        # Ray draws its own components' ports at random; one of them can take the free port picked here
        # (seen once in CI: "client_server is trying to use a port number ... used by other components")
        if _head_refused_port(head, client_port, tmp_path / "head.log") and attempt < 2:
            _stop_group(head)  # whatever it had started
            continue
        break
    address = f"ray://127.0.0.1:{client_port}"
    try:
        _wait_for_port(client_port, head, tmp_path / "head.log")
        # deployed through Ray Client too: `serve run` submits the rendered config file
        _via_client([str(BIN / "serve"), "run", "--address", address, "--non-blocking", str(serve_yaml)],
                    Path(ray_tmp))
        client = textwrap.dedent("""
            import json, time, ray
            from ray import serve
            ray.init(ADDRESS)
            deadline = time.time() + 240
            while (app := serve.status().applications.get("bark")) is None or app.status != "RUNNING":
                assert app is None or app.status != "DEPLOY_FAILED", app.message
                assert time.time() < deadline, "the app did not start"
                time.sleep(1)
            handle = serve.get_app_handle("bark")
            out = handle.synthesize.remote("Hello through Ray Client.", voice="v2/en_speaker_6",
                                           max_semantic_tokens=10, seed=5).result()
            print(json.dumps({"n": len(out["audio"]), "sr": out["sample_rate"], "seed": out["seed"]}))
        """)
        client = client.replace("ADDRESS", repr(address))
        res = _via_client([sys.executable, "-c", client], Path(ray_tmp))
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out == {"n": out["n"], "sr": 24000, "seed": 5} and out["n"] > 0
        denied = run([sys.executable, "-c", client], env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"},
                     timeout=120, check=False)
        assert denied.returncode != 0  # token authentication is on
    finally:
        _stop_group(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# How the proxier reports a specific server that died at start: its own message, or (seen once in CI)
# "Initialization failure from server" with psutil.ZombieProcess raised while it read the dead process
SPECIFIC_SERVER_DIED = ("Starting Ray client server failed", "ZombieProcess")


def _via_client(cmd: list[str], ray_tmp: Path, attempts: int = 3) -> subprocess.CompletedProcess:
    """Run a Ray Client program (`serve run`, the driver). The client server's per-client "specific server"
    process sometimes exits at once (``SPECIFIC_SERVER_DIED``: seen for `serve run` in about one CI run in
    six, and once for the driver); Ray Client has no retry of its own for that, so that start is
    retried here, anything else fails at once. The last failure's message carries the specific servers'
    own logs."""
    for attempt in range(1, attempts + 1):
        res = run(cmd, env={"RAY_AUTH_MODE": "token"}, timeout=300, check=False)
        if res.returncode == 0:
            return res
        logs = "".join(f"\n--- {p.name}:\n{p.read_text()[-2000:]}"
                       for p in sorted(ray_tmp.glob("session_*/logs/ray_client_server*.err")))
        if not any(sign in res.stderr for sign in SPECIFIC_SERVER_DIED) or attempt == attempts:
            raise AssertionError(f"{cmd[:3]} failed ({res.returncode}):\n{res.stdout[-2000:]}\n"
                                 f"{res.stderr[-3000:]}{logs}")
        print(f"{cmd[:2]}: the Ray client server failed to start (attempt {attempt}); retrying{logs}")
        time.sleep(5)
    raise AssertionError("unreachable")


def _head_refused_port(proc: subprocess.Popen, port: int, log: Path, timeout_s: float = 120.0) -> bool:
    """True if the head exited at start because one of Ray's own ports took ``port``; False once the port
    answers or the head failed otherwise (``_wait_for_port`` reports that)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            return "used by other components" in log.read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return False
        except OSError:
            time.sleep(0.5)
    return False


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"the Ray client server did not open port {port}"
            time.sleep(0.5)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group (`ray start --block` stops its processes), then SIGKILL what is left."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
