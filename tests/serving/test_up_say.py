"""`bark-serve up` starts a local Ray with the app; `say` talks to it; Ctrl-C stops everything cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import soundfile as sf

from tests.serving.conftest import free_port

pytestmark = pytest.mark.slow


def test_up_say_and_ctrl_c(tiny_ckpt, tmp_path):
    port = free_port()
    log = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "bark_serve.serving.cli", "up", "--model", str(tiny_ckpt), "--port", str(port),
                             "--num-cpus", "2"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while "is up on" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-2000:]
            assert time.time() < deadline, "bark-serve up did not come up"
            time.sleep(1)
        out = tmp_path / "said.flac"
        cli = [sys.executable, "-m", "bark_serve.serving.cli", "say"]
        res = subprocess.run([*cli, "Hello from say.", "-o", str(out), "--url", f"http://127.0.0.1:{port}",
                              "--seed", "4"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert sf.info(out).samplerate == 24000
        bad = subprocess.run([*cli, "Hi", "-o", str(out), "--url", f"http://127.0.0.1:{port}", "--voice", "nobody"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "unknown voice 'nobody'" in bad.stderr
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        assert proc.wait(timeout=120) == 0
        assert "bark-serve: stopped" in (tmp_path / "up.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_up_rejects_a_bad_model_or_config_with_exit_2(tmp_path):
    cli = [sys.executable, "-m", "bark_serve.serving.cli", "up"]
    res = subprocess.run([*cli, "--model", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no such directory" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("semantic: {max_batch: 0, colour: blue}\n")
    res = subprocess.run([*cli, "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "semantic.max_batch" in res.stderr and "semantic.colour" in res.stderr
