"""`bark-serve up` starts a local Ray with the app; `say` talks to it; Ctrl-C and SIGTERM stop everything
cleanly and fast. (SIGTERM once it is up is checked by tests/test_readme.py, which serves the README.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import soundfile as sf

from bark_serve.cluster.ports import free_port
from tests.cli.up_process import UpProcess

pytestmark = pytest.mark.slow


STOP_S = 20  # up must stop within this (it takes ~2-6 s; Ray's own shutdown is most of it)


def _assert_clean_stop(stopped) -> None:
    assert stopped.returncode == 0, stopped.log[-3000:]
    assert "bark-serve: stopped" in stopped.log
    assert stopped.seconds < STOP_S, f"took {stopped.seconds:.1f} s"
    assert not stopped.leftovers, f"left behind: {stopped.leftovers}"


def test_up_say_and_ctrl_c(tiny_ckpt, tmp_path, monkeypatch):
    import psutil

    from bark_serve.serving.serve_config import PROXY_READY_ENV

    port = free_port()
    monkeypatch.delenv(PROXY_READY_ENV, raising=False)  # up sets it for its own instance (serve_config.py)
    up = UpProcess(["--model", tiny_ckpt, "--port", port, "--num-cpus", "2"], tmp_path / "up.log")
    try:
        ready = up.wait_ready(300)
        raylets = [p for p in psutil.Process(up.proc.pid).children(recursive=True) if p.name() == "raylet"]
        assert raylets and all(p.environ().get(PROXY_READY_ENV) == "30" for p in raylets)
        assert ready["url"] == f"http://127.0.0.1:{port}" and ready["app"] == "bark"
        assert "/v1/batches" not in ready["routes"] and "POST /v1/tts" in ready["routes"]
        log = up.log()
        assert log.index("deploying") < log.index("bark-serve is up")  # in the order things happen
        assert "will not be applied" not in log and "INFO" not in log  # Ray's own logs stay out (no --verbose)
        assert "RAY_AUTH_MODE=token" in log and "auth_token" in log
        # nothing listens beyond the HTTP host asked for (127.0.0.1): not Ray's GCS, raylet, agents, metrics
        # export (issue 25: they listened on 0.0.0.0 and the machine's address)
        sockets = up.listening()
        assert any(p == int(port) for _, p, _ in sockets), sockets  # the HTTP proxy is one of them
        exposed = sorted(s for s in sockets if s[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1"))
        # Known exception: Ray Serve 2.60 binds each replica's inter-deployment gRPC server to [::]:0 with no
        # option (ray/serve/_private/replica.py); Ray's token auth guards it. Everything else is loopback.
        assert len(sockets) > 5 and all("ServeReplica" in name for _, _, name in exposed), exposed
        assert any(name in ("gcs_server", "raylet") for _, _, name in sockets)
        out = tmp_path / "said.flac"
        cli = [sys.executable, "-m", "bark_serve.cli", "say"]
        res = subprocess.run([*cli, "Hello from say.", "-o", str(out), "--seed", "4"], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "BARK_URL": f"http://127.0.0.1:{port}"})
        assert res.returncode == 0, res.stderr
        assert sf.info(out).samplerate == 24000
        bad = subprocess.run([*cli, "Hi", "-o", str(out), "--url", f"http://127.0.0.1:{port}", "--voice", "nobody"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "unknown voice 'nobody'" in bad.stderr
        _assert_clean_stop(up.stop(signal.SIGINT))  # Ctrl-C
    finally:
        up.kill()


def test_up_stops_on_sigterm_while_starting(tiny_ckpt, tmp_path):
    """Started in the background from a script and killed while Ray is starting: still a clean stop."""
    up = UpProcess(["--model", tiny_ckpt, "--port", free_port(), "--num-cpus", "2"], tmp_path / "up.log",
                   env={"RAY_ADDRESS": "127.0.0.1:1"})  # a stale RAY_ADDRESS: up starts its own Ray anyway
    try:
        up.wait_for("deploying .* on a new local Ray instance", 120)
        time.sleep(3)  # inside ray.init / the deployment
        _assert_clean_stop(up.stop(signal.SIGTERM))
    finally:
        up.kill()


def test_up_rejects_a_bad_model_or_config_with_exit_2(tmp_path):
    cli = [sys.executable, "-m", "bark_serve.cli", "up"]
    res = subprocess.run([*cli, "--model", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no such directory" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("semantic: {max_batch: 0, colour: blue}\n")
    res = subprocess.run([*cli, "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "semantic.max_batch" in res.stderr and "semantic.colour" in res.stderr
