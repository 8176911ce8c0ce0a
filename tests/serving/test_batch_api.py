"""The batch HTTP router (FastAPI TestClient) over a real redis-server, with a fake synthesize worker."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import msgpack
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bark_serve.cluster.batch_types import BatchKeys
from bark_serve.cluster.jobs import JobStore
from bark_serve.cluster.ports import free_port
from bark_serve.serving.batch_api import BatchLimits, batch_router
from tests.cluster.helpers import drain, expected_audio
from tests.cluster.redis_server import prefix, redis_server  # noqa: F401  (fixtures)

JSONL = {"Content-Type": "application/jsonl"}


def make_client(url: str, prefix: str, **limits) -> TestClient:
    def factory() -> JobStore:
        return JobStore(aioredis.Redis.from_url(url), keys=BatchKeys(prefix), result_ttl_s=3600)

    app = FastAPI()
    app.include_router(batch_router(factory, limits=BatchLimits(**{"max_text_chars": 100, **limits})))
    return TestClient(app)


@pytest.fixture
def api(redis_server, prefix):
    with make_client(redis_server.url, prefix) as client:
        yield client


def jsonl(items) -> str:
    return "\n".join(i if isinstance(i, str) else json.dumps(i) for i in items) + "\n"


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]


def assert_error(resp, status: int, code: str):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert "Traceback" not in resp.text


def test_submit_status_results(api, redis_server, prefix):
    items = [{"id": f"a{n}", "text": f"hello {n}", "format": "flac"} for n in range(6)]
    body = jsonl(items + ["{not json", {"id": "e", "text": ""}, {"id": "f", "text": "x", "format": "ogg"},
                          {"text": "no id: line index"}, {"id": "long", "text": "y" * 101}])
    resp = api.post("/v1/batches", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["id"].startswith("b_") and resp.headers["location"] == f"/v1/batches/{job['id']}"
    assert (job["added"], job["invalid"], job["counts"]["total"]) == (7, 4, 11)
    status = api.get(f"/v1/batches/{job['id']}").json()
    assert status["status"] == "queued" and status["counts"]["queued"] == 7

    asyncio.run(drain(redis_server.url, prefix, job["id"]))
    status = api.get(f"/v1/batches/{job['id']}").json()
    assert status["status"] == "completed" and status["counts"]["succeeded"] == 7
    assert status["rate_items_per_s"] > 0 and status["eta_s"] is None

    resp = api.get(f"/v1/batches/{job['id']}/results")
    assert resp.headers["content-type"].startswith("application/jsonl")
    records = read_jsonl(resp.text)
    end = records.pop()
    assert end["type"] == "end" and end["status"] == "completed" and end["complete"] is True
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records) == 11
    assert base64.b64decode(by_id["a3"]["audio"]) == expected_audio("a3", "hello 3")
    assert by_id["a3"]["media_type"] == "audio/flac" and by_id["a3"]["format"] == "flac"
    assert base64.b64decode(by_id["9"]["audio"]) == expected_audio("9", "no id: line index")
    assert "not valid JSON" in by_id["6"]["error"]["message"]
    assert "text is empty" in by_id["e"]["error"]["message"]
    assert "format" in by_id["f"]["error"]["message"]
    assert "max 100" in by_id["long"]["error"]["message"]
    assert {by_id[i]["error"]["type"] for i in ("6", "e", "f", "long")} == {"invalid_item"}


def test_results_resume_with_cursor_and_msgpack(api, redis_server, prefix):
    items = [{"id": f"m{n}", "text": f"t{n}"} for n in range(10)]
    resp = api.post("/v1/batches", content=msgpack.packb(items), headers={"Content-Type": "application/msgpack"})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    asyncio.run(drain(redis_server.url, prefix, job_id))

    first = read_jsonl(api.get(f"/v1/batches/{job_id}/results", params={"limit": 4}).text)
    assert [r["type"] for r in first] == ["result"] * 4 + ["end"] and first[-1]["complete"] is False
    resp = api.get(f"/v1/batches/{job_id}/results", params={"after": first[-1]["cursor"]},
                   headers={"Accept": "application/msgpack"})
    assert resp.headers["content-type"].startswith("application/msgpack")
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(resp.content)
    rest = list(unpacker)
    assert rest[-1]["type"] == "end" and rest[-1]["complete"] is True
    got = [r["id"] for r in first[:-1] + rest[:-1]]
    assert sorted(got) == sorted(i["id"] for i in items) and len(got) == 10  # no overlap, nothing missing
    assert rest[0]["audio"] == expected_audio(rest[0]["id"], items[int(rest[0]["id"][1:])]["text"])  # raw bytes


def test_idempotency_key(api):
    body = jsonl([{"id": "x", "text": "a"}, {"id": "y", "text": "b"}])
    one = api.post("/v1/batches", content=body, headers={**JSONL, "Idempotency-Key": "run-1"}).json()
    body2 = jsonl([{"id": "x", "text": "a"}, {"id": "y", "text": "b"}, {"id": "z", "text": "c"}])
    two = api.post("/v1/batches", content=body2, headers={**JSONL, "Idempotency-Key": "run-1"}).json()
    assert two["id"] == one["id"] and (two["created"], two["added"], two["duplicates"]) == (False, 1, 2)
    three = api.post("/v1/batches?job_key=run-1", content=jsonl([{"id": "x", "text": "changed"}]), headers=JSONL).json()
    assert three["id"] == one["id"] and three["conflicts"] == ["x"]
    assert three["counts"]["total"] == 3


def test_cancel(api, redis_server, prefix):
    job = api.post("/v1/batches", content=jsonl([{"text": f"t{n}"} for n in range(5)]), headers=JSONL).json()
    resp = api.delete(f"/v1/batches/{job['id']}")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert resp.json()["counts"]["cancelled"] == 5
    end = read_jsonl(api.get(f"/v1/batches/{job['id']}/results?follow=true").text)[-1]
    assert end == {**end, "type": "end", "status": "cancelled", "complete": True}
    assert_error(api.delete("/v1/batches/b_" + "0" * 32), 404, "job_not_found")


def test_follow_streams_until_done(api, redis_server, prefix):
    job = api.post("/v1/batches", content=jsonl([{"text": f"t{n}"} for n in range(12)]), headers=JSONL).json()
    worker = threading.Thread(target=lambda: asyncio.run(drain(redis_server.url, prefix, job["id"])))
    worker.start()
    records = read_jsonl(api.get(f"/v1/batches/{job['id']}/results", params={"follow": "true"}).text)
    worker.join()
    assert [r["type"] for r in records].count("result") == 12
    assert records[-1]["complete"] is True and records[-1]["status"] == "completed"


def test_bad_requests(redis_server, prefix):
    with make_client(redis_server.url, prefix, max_body_bytes=2000, max_items=5) as api:
        ok = jsonl([{"text": "a"}])
        assert_error(api.post("/v1/batches", content=ok, headers={"Content-Type": "text/plain"}), 415,
                     "unsupported_media_type")
        assert_error(api.post("/v1/batches", content=b"\xc1\xff", headers={"Content-Type": "application/msgpack"}),
                     400, "invalid_body")
        assert_error(api.post("/v1/batches", content=msgpack.packb({"text": "a"}),
                              headers={"Content-Type": "application/msgpack"}), 400, "invalid_body")
        assert_error(api.post("/v1/batches", content=b"\xff\xfe{}\n", headers=JSONL), 400, "invalid_body")
        assert_error(api.post("/v1/batches", content="x" * 3000, headers=JSONL), 413, "body_too_large")
        assert_error(api.post("/v1/batches", content=jsonl([{"text": "a"}] * 6), headers=JSONL), 413, "too_many_items")
        assert_error(api.post("/v1/batches", content="\n\n", headers=JSONL), 422, "invalid_items")
        dup = jsonl([{"id": "a", "text": "a"}, {"id": "a", "text": "b"}])
        assert_error(api.post("/v1/batches", content=dup, headers=JSONL), 422, "invalid_items")
        assert_error(api.post("/v1/batches", content=jsonl([{"id": "a/b", "text": "a"}]), headers=JSONL), 422,
                     "invalid_items")
        assert_error(api.post("/v1/batches", content=ok, headers={**JSONL, "Idempotency-Key": "has space"}), 400,
                     "invalid_idempotency_key")
        assert_error(api.get("/v1/batches/b_" + "1" * 32), 404, "job_not_found")
        assert_error(api.get("/v1/batches/nonsense"), 404, "job_not_found")
        assert_error(api.get("/v1/batches/b_" + "1" * 32 + "/results"), 404, "job_not_found")
        job = api.post("/v1/batches", content=ok, headers=JSONL).json()
        assert_error(api.get(f"/v1/batches/{job['id']}/results?after=abc"), 400, "invalid_cursor")
        top = 2**64 - 1  # the largest stream id has nothing after it (was a 200 saying "store unavailable")
        assert_error(api.get(f"/v1/batches/{job['id']}/results?after={top}-{top}"), 400, "invalid_cursor")
        for near in (f"{top}", f"{top}-{top - 1}", f"{top - 1}-{top}"):  # ids Redis takes: past every result
            lines = api.get(f"/v1/batches/{job['id']}/results?after={near}").text.splitlines()
            assert [json.loads(x)["type"] for x in lines] == ["end"], (near, lines)
        assert_error(api.get(f"/v1/batches/{job['id']}/results?limit=x"), 400, "invalid_parameter")


def test_redis_down_is_503():
    with make_client(f"redis://127.0.0.1:{free_port()}/0", "down") as api:
        resp = api.get("/v1/batches/b_" + "1" * 32)
        assert_error(resp, 503, "store_unavailable")
        assert resp.headers["retry-after"] == "2"


def test_results_from_results_dir(api, redis_server, prefix, tmp_path):
    job = api.post("/v1/batches", content=jsonl([{"id": "d1", "text": "on disk", "format": "mp3"}]),
                   headers=JSONL).json()
    asyncio.run(drain(redis_server.url, prefix, job["id"], results_dir=str(tmp_path)))
    [rec, end] = read_jsonl(api.get(f"/v1/batches/{job['id']}/results").text)
    assert base64.b64decode(rec["audio"]) == expected_audio("d1", "on disk") and rec["media_type"] == "audio/mpeg"
    assert (tmp_path / prefix / job["id"] / "d1.a1.mp3").exists() and end["complete"]
