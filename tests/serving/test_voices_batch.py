"""Registered voices with batch jobs on (issue 23): the voice store is then the batch Redis, and a batch item
may name a voice of its job's key, never another key's; the CLI's `voice add / list / rm` against the
same server. Real Ray, Serve, redis-server and the CLI as a subprocess."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf

from bark_serve.cluster.ports import free_port
from tests.cli.test_synth_cli import run_cli
from tests.serving.conftest import API_KEY, e2e_config
from tests.serving.test_batch_e2e import results, status, submit, wait_for
from tests.serving.test_voices_api import A, B, add, custom, tones, wav

pytestmark = pytest.mark.slow
OPTS = {"max_semantic_tokens": 8, "temperature": 0, "min_eos_p": None}


@pytest.fixture(scope="module")
def app(tiny_ckpt, redis_srv):
    from tests.serving.e2e_helpers import running_app

    raw = e2e_config(str(tiny_ckpt), free_port(), voice_cloning={"num_cpus": 0.1})  # no store_dir: Redis keeps them
    raw["batch"] = {"enabled": True, "redis_url": redis_srv.url, "worker": {"num_cpus": 0.1}}
    with running_app(raw) as url:
        yield url


def test_a_batch_item_speaks_with_a_voice_of_its_jobs_key_only(app, redis_srv):
    url = app
    assert add(url, wav(tones(2.5)), "reader").status_code == 201
    import redis

    assert any(k.startswith(b"bark:voices") for k in redis.Redis.from_url(redis_srv.url).keys("*"))  # in Redis
    item = {"text": "A batch line in my own voice.", "voice": "reader", "format": "wav", "options": OPTS}
    job = submit(url, [json.dumps({"id": "mine", **item})])
    wait_for(lambda: status(url, job["id"])["status"] == "completed", timeout=300)
    [rec] = [r for r in results(url, job["id"]) if r.get("type") != "end"]
    assert rec["state"] == "succeeded", rec
    batch_audio, _ = sf.read(io.BytesIO(base64.b64decode(rec["audio"])), dtype="float32")
    direct = httpx.post(url + "/v1/tts", headers=A, timeout=300, json={
        "text": item["text"], "voice": "reader", "format": "wav", **OPTS})
    assert direct.status_code == 200, direct.text
    np.testing.assert_allclose(batch_audio, sf.read(io.BytesIO(direct.content), dtype="float32")[0], atol=1e-4)

    # another key's job cannot name it: that item fails as an unknown voice
    headers = {"Authorization": "Bearer second-key", "Content-Type": "application/jsonl"}
    r = httpx.post(url + "/v1/batches", content=json.dumps({"id": "theirs", **item}).encode(), headers=headers)
    assert r.status_code == 202, r.text
    other = r.json()["id"]
    wait_for(lambda: httpx.get(f"{url}/v1/batches/{other}", headers=B).json()["status"] == "completed", timeout=300)
    lines = httpx.get(f"{url}/v1/batches/{other}/results", headers=B, timeout=60).text.splitlines()
    [failed] = [json.loads(x) for x in lines if '"theirs"' in x]
    assert failed["state"] == "failed" and "unknown voice" in json.dumps(failed), failed


def test_the_cli_adds_lists_and_removes_voices_on_a_server(app, tmp_path):
    url = app
    clip = tmp_path / "me.wav"
    clip.write_bytes(wav(tones(2.0)))
    env = {"BARK_URL": url, "BARK_API_KEY": API_KEY}
    res = run_cli("voice", "add", clip, "--name", "from cli", env=env)
    assert res.returncode == 0 and "added voice 'from cli'" in res.stdout, res.stderr
    assert "from cli" in [v["name"] for v in custom(url)]
    res = run_cli("voice", "list", env=env)
    assert res.returncode == 0 and "from cli\tvoice_" in res.stdout, res.stdout
    listed = run_cli("voice", "list", "--json", env={**env, "BARK_API_KEY": "second-key"})
    assert listed.returncode == 0 and json.loads(listed.stdout) == []  # another key sees none of them
    again = run_cli("voice", "add", clip, "--name", "from cli", env=env)
    assert again.returncode == 2 and "409" in again.stderr and "Traceback" not in again.stderr
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio" * 100)
    res = run_cli("voice", "add", bad, "--name", "bad", env=env)
    assert res.returncode == 2 and "400" in res.stderr, res.stderr
    assert run_cli("voice", "add", tmp_path / "missing.wav", "--name", "x", env=env).returncode == 2
    res = run_cli("voice", "rm", "from cli", env=env)
    assert res.returncode == 0 and "deleted voice voice_" in res.stdout, res.stderr
    assert run_cli("voice", "rm", "from cli", env=env).returncode == 2  # 404 now
    down = run_cli("voice", "list", env={**env, "BARK_URL": f"http://127.0.0.1:{free_port()}"})
    assert down.returncode == 1 and "cannot reach the server" in down.stderr


def test_a_full_or_absent_voice_store_answers_503_and_the_routes_recover(app, redis_srv):
    """The voice routes on a Redis that refuses writes (maxmemory, noeviction) or is gone: 503 `store_full` /
    `store_unavailable` with Retry-After, as the batch routes answer, never a 500; the same routes work again
    once Redis has room or is back. (Was a 500 internal_error from redis-py's exceptions.)"""
    import redis

    url = app
    client = redis.Redis.from_url(redis_srv.url)
    clip = wav(tones(2.0))
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.config_set("maxmemory", str(client.info("memory")["used_memory"] + 2**20))
            for n in range(64):  # fill it to the cap: Redis refuses the write that finds it full
                client.set(f"ballast{n}", b"x" * 2**18)
        client.config_set("maxmemory", "1mb")  # and well past it, so that any write is refused
        full = add(url, clip, "when full")
        assert full.status_code == 503 and full.json()["error"]["code"] == "store_full", full.text
        assert full.headers["retry-after"] and "Traceback" not in full.text
        assert httpx.get(url + "/v1/voices", headers=A, timeout=60).status_code == 200  # reads still answer
    finally:
        client.config_set("maxmemory", "0")
        client.delete(*[f"ballast{n}" for n in range(64)])
    assert add(url, clip, "when full").status_code == 201

    redis_srv.stop()
    try:
        for call in (lambda: httpx.get(url + "/v1/voices", headers=A, timeout=120),
                     lambda: httpx.get(url + "/v1/voices/when%20full", headers=A, timeout=120),
                     lambda: httpx.delete(url + "/v1/voices/when%20full", headers=A, timeout=120)):
            r = call()
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
            assert r.headers["retry-after"]
    finally:
        redis_srv.start()  # same port, same data (AOF)
    assert "when full" in [v["name"] for v in custom(url)]
    assert httpx.delete(url + "/v1/voices/when%20full", headers=A, timeout=60).status_code == 200
