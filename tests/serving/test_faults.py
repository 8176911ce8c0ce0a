"""Faults on the real app (real local Ray, real HTTP, tiny checkpoint): a SIGKILLed stage replica, a flood of segments.

- A coarse replica SIGKILLed with requests in flight: every client gets the right audio (the stage call is
  resent once Serve has restarted the replica) or 503 with Retry-After; never a 500, never a hang. Then
  /readyz turns 200 again and new requests are served; the recovery time is printed.
- One request of many tiny segments (CJK text, max_semantic_tokens 1) does not fill the stage queues: the
  stages here accept only 16 calls from the orchestrator (8 running + 8 queued), so without the per-request
  window of segments (orchestrator.max_segments_in_flight) its ~60 coarse calls would be refused with 503.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from bark_serve.cluster.ports import free_port
from bark_serve.stages.encoders import from_pcm16
from tests.serving.conftest import API_KEY, e2e_config
from tests.serving.e2e_helpers import running_app

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = {"temperature": 0, "min_eos_p": None}
QUANT = 2 / 32767  # 16-bit PCM quantization
TIGHT = {"max_ongoing_requests": 8, "max_queued_requests": 8}  # per stage, as seen from the orchestrator
RECOVERY_BOUND_S = 90.0


@pytest.fixture(scope="module")
def fault_app(tiny_ckpt):
    """A Ray instance of its own (own temp dir) with the app; stage queues kept small on purpose."""
    raw = e2e_config(str(tiny_ckpt), free_port())
    for stage in ("semantic", "coarse", "fine", "codec"):
        raw[stage].update(TIGHT)
    raw["orchestrator"].update(max_text_chars=20_000, max_body_bytes=400_000)
    with running_app(raw) as url:
        yield url


def tts(url, body, timeout=180):
    """POST /v1/tts; -> (status, retry_after, body bytes). A streamed answer is read to its end."""
    with httpx.stream("POST", url + "/v1/tts", json=body, headers=AUTH, timeout=timeout) as r:
        return r.status_code, r.headers.get("retry-after"), r.read()


def stage_stats(stage: str) -> dict:
    from ray import serve

    name = {"coarse": "CoarseServer"}[stage]
    return serve.get_deployment_handle(name, app_name="bark").stats.remote().result(timeout_s=30)


def wait_until_held(stage: str, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stage_stats(stage)["held"] + stage_stats(stage)["queued"] >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{stage} never held {n} requests")


def wait_ready(url: str, timeout: float) -> float:
    """Seconds until /readyz answers 200 (AssertionError after ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(url + "/readyz", timeout=10).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/readyz not 200 within {timeout} s")


def test_a_killed_coarse_replica_costs_no_500_and_service_resumes(fault_app):
    url = fault_app
    long_text = "One sentence to start. Then a second sentence, which is here. And a third."
    bodies = [{"text": f"Request number {i} is here.", "max_semantic_tokens": 120, "format": "pcm", **GREEDY}
              for i in range(3)]
    bodies.append({"text": long_text, "max_semantic_tokens": 60, "stream": True, "format": "pcm", **GREEDY})
    reference = [tts(url, b) for b in bodies]  # before the fault: the audio each request must give
    assert all(status == 200 for status, _, _ in reference)
    victim = stage_stats("coarse")["pid"]

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(tts, url, b) for b in bodies]
        wait_until_held("coarse", 3)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        answers = [f.result(timeout=200) for f in futures]  # a hang fails here
    wait_ready(url, RECOVERY_BOUND_S)
    recovery_s = time.monotonic() - t_kill
    print(f"\nSIGKILL of coarse: answers {[a[0] for a in answers]}; /readyz 200 again {recovery_s:.1f} s after "
          f"the kill")
    for (status, retry_after, data), (_, _, ref) in zip(answers, reference):
        assert status in (200, 503), data[:300]
        if status == 503:
            assert retry_after and int(retry_after) >= 1 and b"retry" in data
        else:  # resent after the restart: the same tokens, so the same audio (batch-dependent rounding aside)
            np.testing.assert_allclose(from_pcm16(data), from_pcm16(ref), atol=QUANT)
    status, _, data = tts(url, bodies[0])
    assert status == 200
    np.testing.assert_allclose(from_pcm16(data), from_pcm16(reference[0][2]), atol=QUANT)
    assert stage_stats("coarse")["pid"] != victim


def test_many_tiny_segments_do_not_flood_the_stage_queues(fault_app, tiny_ckpt):
    from bark_serve.stages.longform import split_text
    from bark_serve.stages.text import TextPreparer
    from bark_serve.stages.weights import Checkpoint

    url = fault_app
    text = "这是一个很长的中文句子没有标点符号" * 64  # 1088 characters with no sentence end
    count = TextPreparer.from_checkpoint(Checkpoint.open(str(tiny_ckpt))).count
    n_segments = len(split_text(text, count, 24))  # the app's segment_max_tokens (e2e_config)
    assert n_segments > 2 * sum(TIGHT.values())  # more coarse calls than the stage would accept at once
    t0 = time.monotonic()
    status, retry_after, data = tts(url, {"text": text, "max_semantic_tokens": 1, "format": "pcm", "seed": 3})
    assert status == 200, data[:300]
    audio = from_pcm16(data)
    assert audio.size > 0 and np.isfinite(audio).all()
    print(f"\n{len(text)} CJK characters ({n_segments} segments), max_semantic_tokens 1: 200 in "
          f"{time.monotonic() - t0:.1f} s")
