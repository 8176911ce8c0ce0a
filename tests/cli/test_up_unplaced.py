"""A deployment that cannot be placed while `up` waits (issue 25): a cluster big enough on paper, with its
CPUs held by something else, so that `up`'s check before deploying passes and the semantic stage waits.

Before: serve.run (which returns only when every deployment runs) held `up` for good, saying nothing and
never reaching its ready timeout. Now `up` names the waiting deployment, what it asks for and what the
cluster has; a local instance gives up at the second sight (exit 1); /readyz answers 503 within seconds.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from bark_serve.cli import up as up_cli
from bark_serve.cli.common import CliError
from bark_serve.cluster.ports import free_port
from bark_serve.serving.config import load_config
from bark_serve.serving.serve_config import pool_resources
from tests.cli.up_process import UpProcess

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 80  # `up --address` waits this long, then gives up (exit 2); the other tests here take about 35 s
WAITING = (r"still waiting: deployment SemanticServer cannot be placed: 1 replica\(s\) wait for CPU 1, "
           r"bark_pool_semantic 1 each; the cluster has CPU \S+ free of 2, bark_pool_semantic 64 free of 64")


@pytest.fixture(scope="module")
def crowded(tiny_ckpt):
    """A local Ray of 2 CPUs, 1.5 of them held by an actor; a config whose stages ask 0.1 CPU each, the
    semantic one 1 CPU: 1.4 in all, which fits on paper but not beside the actor."""
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bku", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    path = tmp / "crowded.yaml"
    small = "num_cpus: 0.1, dtype: float32, max_batch: 4"
    path.write_text(f"model: {tiny_ckpt}\nhttp_host: 127.0.0.1\nhttp_port: {free_port()}\n"
                    f"orchestrator: {{num_cpus: 0.1}}\nsemantic: {{pool: semantic, num_cpus: 1, dtype: float32}}\n"
                    + "".join(f"{s}: {{pool: {s}, {small}}}\n" for s in ("coarse", "fine", "codec")))
    cfg = load_config(path)
    ray.init(address="local", num_cpus=2, resources=pool_resources(cfg), include_dashboard=False,
             configure_logging=False, log_to_driver=False, _temp_dir=str(tmp / "ray"))

    @ray.remote(num_cpus=1.5)
    class Hog:
        def ping(self):
            return True

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    address = ray.get_runtime_context().gcs_address
    up = UpProcess(["--config", path, "--address", address, "--ready-timeout", READY_TIMEOUT_S],
                   tmp / "up.log", env={"RAY_AUTH_MODE": "token", "RAY_TMPDIR": str(tmp / "up-tmp")})
    try:
        yield cfg, up, f"http://127.0.0.1:{cfg.http_port}", tmp / "up-tmp"
    finally:
        up.kill()
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_up_names_the_deployment_it_waits_for_and_what_the_cluster_has(crowded):
    _, up, _ = crowded[:3]
    up.wait_for(WAITING, timeout_s=120)
    assert "deployment CoarseServer" not in up.log()  # placed: loading is not waiting


def test_readyz_answers_503_at_once_while_a_stage_has_no_replica(crowded):
    _, up, url = crowded[:3]
    up.wait_for(WAITING, timeout_s=120)
    deadline = time.time() + 120
    while True:  # until the orchestrator runs (before, the proxy answers 408 when asked to, see docs/CONFIGURATION.md)
        r = httpx.get(url + "/readyz", headers={"x-request-timeout-seconds": "2"}, timeout=10)
        if r.status_code == 503:
            break
        assert r.status_code == 408 and time.time() < deadline, (r.status_code, r.text)
        time.sleep(1)
    t0 = time.monotonic()
    r = httpx.get(url + "/readyz", timeout=10)  # no header: the orchestrator itself answers
    took = time.monotonic() - t0
    assert r.status_code == 503 and r.json()["status"] == "not_ready" and r.json()["stages"]["semantic"] is False
    assert took < 3, f"/readyz took {took:.1f} s"


def test_a_local_instance_gives_up_at_the_second_sight(crowded):
    """The same wait as `up` without --address (nothing will add a node): exit 1 within two checks."""
    cfg, up, url = crowded[:3]
    up.wait_for(WAITING, timeout_s=120)
    t0 = time.monotonic()
    with pytest.raises(CliError) as err:
        up_cli._wait_ready(url, 120, cfg, local=True)
    took = time.monotonic() - t0
    assert err.value.code == 1 and "cannot start: deployment SemanticServer cannot be placed" in str(err.value)
    assert "CPU 1, bark_pool_semantic 1 each" in str(err.value) and "--num-cpus" in str(err.value)
    assert took < 30, f"took {took:.0f} s"


def test_up_with_an_address_gives_up_at_its_ready_timeout(crowded):
    _, up, _, up_tmp = crowded
    try:
        rc = up.proc.wait(READY_TIMEOUT_S + 60)
    except Exception:
        rc = None
    log = up.log()
    assert rc == 2, log[-3000:]
    assert f"did not become ready within {READY_TIMEOUT_S} s" in log and "Traceback" not in log, log[-3000:]
    assert "bark-serve: stopping" in log
    # the deploying thread, still in serve.run after the stop, once auto-started a second Ray instance here
    assert not list(up_tmp.rglob("session_*")) and "SIGTERM handler is not set" not in log, log[-3000:]
    print(log)
