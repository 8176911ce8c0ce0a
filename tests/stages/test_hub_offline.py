"""An unreachable hub fails fast (one short probe, not ~30 s of retries) and names the fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bark_serve.cluster.ports import free_port

PROBE = """
import json, time
from bark_serve.stages.weights import Checkpoint, CheckpointError
t0 = time.monotonic()
try:
    Checkpoint.open("suno/bark-small")
    message = None
except CheckpointError as exc:
    message = str(exc)
print(json.dumps({"seconds": time.monotonic() - t0, "message": message}))
"""


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "closed-port"}, {"HF_HUB_OFFLINE": "1"}])
def test_unreachable_hub_fails_fast_and_names_make_checkpoint(tmp_path, env):
    env = {k: (f"http://127.0.0.1:{free_port()}" if v == "closed-port" else v) for k, v in env.items()}
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full.update(env, HF_HOME=str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=full)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["message"] is not None
    assert "unreachable" in out["message"] and "bark-serve make-checkpoint" in out["message"]
    assert out["seconds"] < 10
