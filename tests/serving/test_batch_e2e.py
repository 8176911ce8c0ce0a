"""Batch jobs through the real app: real Redis, real local Ray, the real Bark pipeline (tiny checkpoint).

A job of 60 items completes with every item exactly once although a batch worker replica is killed and
redis-server restarts mid-job; malformed items fail alone; cancel stops what is left; the CLI resumes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from bark_serve.cluster.ports import free_port
from bark_serve.serving.config import AudioConfig
from bark_serve.stages.audio import join_segments
from bark_serve.stages.engine import EngineOptions
from bark_serve.stages.pipeline import BarkPipeline
from bark_serve.stages.types import GenerationParams
from tests.serving.conftest import API_KEY, e2e_config
from tests.serving.e2e_helpers import running_app

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OPTS = {"max_semantic_tokens": 6, "temperature": 0, "min_eos_p": None}


def batch_config(tiny_ckpt, redis_srv) -> dict:
    """The e2e app with batch jobs on ``redis_srv`` and two BatchWorker replicas that take over fast."""
    raw = e2e_config(str(tiny_ckpt), free_port())
    raw["batch"] = {"enabled": True, "redis_url": redis_srv.url, "claim_timeout_s": 4, "max_in_flight": 4,
                    "worker": {"num_replicas": 2, "num_cpus": 0.1}}
    return raw


@pytest.fixture(scope="module")
def batch_app(tiny_ckpt, redis_srv):
    with running_app(batch_config(tiny_ckpt, redis_srv)) as url:
        yield url


def submit(url, lines: list[str], key: str | None = None):
    headers = {**AUTH, "Content-Type": "application/jsonl", **({"Idempotency-Key": key} if key else {})}
    r = httpx.post(url + "/v1/batches", content="\n".join(lines).encode(), headers=headers, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()


def status(url, job_id):
    r = httpx.get(f"{url}/v1/batches/{job_id}", headers=AUTH, timeout=30)
    return r.json() if r.status_code == 200 else {"status": f"http {r.status_code}", "counts": {}}


def results(url, job_id):
    r = httpx.get(f"{url}/v1/batches/{job_id}/results", headers=AUTH, timeout=120)
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def wait_for(predicate, timeout=300, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def kill_one_batch_worker():
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "BatchWorker" in a["name"]]
    assert names, "no BatchWorker replica found"
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=False)


def test_job_survives_a_killed_worker_and_a_redis_restart(batch_app, redis_srv, tiny_ckpt):
    url = batch_app
    items = [json.dumps({"id": f"item-{i:03d}", "text": f"Batch line number {i}.", "format": "wav",
                         "voice": "v2/en_speaker_6" if i % 2 else None, "options": OPTS}) for i in range(60)]
    items += [json.dumps({"id": "empty", "text": "   "}),
              json.dumps({"id": "badvoice", "text": "hi", "voice": "nobody"}), "{this is not json"]
    job = submit(url, items, key="e2e-job")
    job_id = job["id"]
    wait_for(lambda: status(url, job_id)["counts"].get("succeeded", 0) >= 5)
    kill_one_batch_worker()
    wait_for(lambda: status(url, job_id)["counts"].get("succeeded", 0) >= 20)
    redis_srv.restart()  # SIGTERM: Redis writes its AOF; the app keeps going once it is back
    final = wait_for(lambda: (s := status(url, job_id))["status"] == "completed" and s, timeout=600)
    assert final["counts"]["succeeded"] == 60 and final["counts"]["failed"] == 3
    records = [r for r in results(url, job_id) if r.get("type") != "end"]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 63  # every item exactly once
    failed = {r["id"]: r for r in records if r["state"] == "failed"}
    assert set(failed) == {"empty", "badvoice", "62"}  # the bad JSON line has no id: its line index
    assert "unknown voice" in json.dumps(failed["badvoice"]) and "empty" in json.dumps(failed["empty"])
    # resubmitting the same job key does not duplicate work
    again = submit(url, items, key="e2e-job")
    assert again["id"] == job_id and status(url, job_id)["counts"]["succeeded"] == 60
    # a result is the real pipeline's audio
    import base64

    rec = next(r for r in records if r["id"] == "item-007")
    audio, sr = sf.read(io.BytesIO(base64.b64decode(rec["audio"])), dtype="float32")
    pipe = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions())
    ref = pipe.generate("Batch line number 7.", "v2/en_speaker_6",
                        GenerationParams.greedy(max_semantic_tokens=6, min_eos_p=None))[0].audio
    joined = join_segments([ref], 24000, AudioConfig().post_process())  # the worker joins as the config says
    np.testing.assert_allclose(audio, joined, atol=2 / 32767)


def test_cancel_stops_the_remaining_items(batch_app):
    url = batch_app
    items = [json.dumps({"id": f"c{i}", "text": f"Cancel me {i}.", "options": {**OPTS, "max_semantic_tokens": 40}})
             for i in range(40)]
    job_id = submit(url, items)["id"]
    wait_for(lambda: status(url, job_id)["counts"].get("succeeded", 0) >= 2)
    r = httpx.delete(f"{url}/v1/batches/{job_id}", headers=AUTH, timeout=30)
    assert r.status_code == 200
    time.sleep(3)
    s = status(url, job_id)
    assert s["status"] == "cancelled" and s["counts"].get("succeeded", 0) < 40
    done = s["counts"].get("succeeded", 0)
    time.sleep(3)
    assert status(url, job_id)["counts"].get("succeeded", 0) == done  # nothing more runs


def test_cli_submit_writes_every_result_and_resumes(batch_app, tmp_path):
    url = batch_app
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"id": f"cli-{i}", "text": f"From the CLI {i}.", "format": "flac",
                                           "options": OPTS}) for i in range(8)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bark_serve.cli", "batch", "submit", str(items), "--out", str(out), "--url", url,
           "--api-key", API_KEY, "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.glob("*.flac")) == sorted(f"cli-{i}.flac" for i in range(8))
    assert sf.info(out / "cli-3.flac").samplerate == 24000
    first = (out / "cli-3.flac").stat().st_mtime_ns
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # re-run: nothing to redo
    assert res.returncode == 0 and (out / "cli-3.flac").stat().st_mtime_ns == first
    bad = subprocess.run([*cmd[:5], str(tmp_path / "missing.jsonl"), *cmd[6:]], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_a_batch_item_with_a_script_is_the_in_process_script(batch_app, tiny_ckpt):
    url = batch_app
    script = [{"voice": "v2/en_speaker_6", "text": "Chapter one. It was a quiet night."},
              {"voice": "v2/de_speaker_3", "text": "Wer ist da?"},
              {"voice": {"id": "alloy"}, "text": "Only the wind, said the narrator."}]
    raw = {"trim_silence": False, "crossfade_ms": 0, "normalize_loudness": False}  # the model's samples, as ref
    items = [json.dumps({"id": "dialogue", "script": script, "format": "wav", "options": {**OPTS, **raw}}),
             json.dumps({"id": "blank-line", "script": [{"voice": "alloy", "text": " "}]}),
             json.dumps({"id": "bad-voice", "script": [{"voice": "alloy", "text": "a"},
                                                       {"voice": "nobody", "text": "b"}]})]
    job_id = submit(url, items)["id"]
    wait_for(lambda: status(url, job_id)["status"] == "completed", timeout=300)
    records = {r["id"]: r for r in results(url, job_id) if r.get("type") != "end"}
    assert records["dialogue"]["state"] == "succeeded", records["dialogue"]
    assert records["blank-line"]["state"] == "failed" and "script line 0: text is empty" in json.dumps(records)
    assert records["bad-voice"]["state"] == "failed" and "unknown voice" in json.dumps(records["bad-voice"])
    import base64

    audio, _ = sf.read(io.BytesIO(base64.b64decode(records["dialogue"]["audio"])), dtype="float32")
    lines = [(line["voice"] if isinstance(line["voice"], str) else "v2/en_speaker_6", line["text"]) for line in script]
    ref = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions()).synthesize_script(
        lines, GenerationParams.greedy(max_semantic_tokens=6, min_eos_p=None), max_segment_tokens=24).audio
    np.testing.assert_allclose(audio, ref, atol=2 / 32767)
