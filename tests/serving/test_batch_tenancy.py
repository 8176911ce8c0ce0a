"""Batch jobs belong to the API key that made them (issue 25): the router with two keys, a real Redis.

Before this, key B reusing key A's Idempotency-Key got A's job (its item added to it, A's audio
downloadable), and any key could read, download and cancel any job; there was no list.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from bark_serve.cluster.batch_types import BatchKeys
from bark_serve.cluster.jobs import JobStore
from bark_serve.serving.batch_api import BatchLimits, batch_router
from bark_serve.serving.errors import APIError
from bark_serve.serving.http_api import check_api_key, key_owner
from tests.cluster.helpers import drain
from tests.cluster.redis_server import prefix, redis_server  # noqa: F401  (fixtures)

KEYS = frozenset({"key-a-secret", "key-b-secret"})
A = {"Authorization": "Bearer key-a-secret", "Content-Type": "application/jsonl"}
B = {"Authorization": "Bearer key-b-secret", "Content-Type": "application/jsonl"}


def make_client(url: str, prefix: str, keys: frozenset[str] = KEYS, limits: BatchLimits = BatchLimits()) -> TestClient:
    def factory() -> JobStore:
        return JobStore(aioredis.Redis.from_url(url), keys=BatchKeys(prefix), result_ttl_s=3600)

    def require_key(request: Request):
        check_api_key(request, keys)

    app = FastAPI()

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    app.include_router(batch_router(factory, limits=limits, dependencies=[Depends(require_key)],
                                    owner_of=lambda r: key_owner(r, keys)))
    return TestClient(app)


@pytest.fixture
def api(redis_server, prefix):
    with make_client(redis_server.url, prefix) as client:
        yield client


def body(*ids: str) -> str:
    return "".join(json.dumps({"id": i, "text": f"text {i}"}) + "\n" for i in ids)


def submit(api, headers, *ids, key=None):
    resp = api.post("/v1/batches", content=body(*ids), headers={**headers, **({"Idempotency-Key": key} if key else {})})
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_an_idempotency_key_names_a_job_only_among_its_owners(api):
    a = submit(api, A, "a1", "a2", key="chapter1")
    b = submit(api, B, "b1", key="chapter1")
    assert b["created"] and b["id"] != a["id"] and b["counts"]["total"] == 1 and b["job_key"] == "chapter1"
    assert api.get(f"/v1/batches/{a['id']}", headers=A).json()["counts"]["total"] == 2  # B added nothing to A's
    again = submit(api, A, "a3", key="chapter1")  # A's own key still names A's job
    assert again["id"] == a["id"] and not again["created"] and again["counts"]["total"] == 3


def test_another_keys_job_is_not_found(api, redis_server, prefix):
    a = submit(api, A, "a1", "a2")
    for method, path in (("GET", ""), ("GET", "/results"), ("DELETE", "")):
        resp = api.request(method, f"/v1/batches/{a['id']}{path}", headers=B)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "job_not_found", (method, path)
    assert api.get(f"/v1/batches/{a['id']}", headers=A).json()["status"] == "queued"  # B's DELETE did nothing
    asyncio.run(drain(redis_server.url, prefix, a["id"]))
    lines = api.get(f"/v1/batches/{a['id']}/results", headers=A).text.splitlines()
    assert [json.loads(x)["type"] for x in lines] == ["result", "result", "end"]
    assert api.get(f"/v1/batches/{a['id']}/results", headers=B).status_code == 404
    assert api.get(f"/v1/batches/{a['id']}", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_list_shows_the_callers_jobs_newest_first_in_pages(api):
    mine = [submit(api, A, f"x{n}")["id"] for n in range(5)]
    theirs = submit(api, B, "y")["id"]
    page = api.get("/v1/batches?limit=2", headers=A).json()
    assert page["object"] == "list" and [j["id"] for j in page["data"]] == mine[::-1][:2] and page["has_more"]
    assert (page["first_id"], page["last_id"]) == (mine[4], mine[3])
    seen = [j["id"] for j in page["data"]]
    while page["has_more"]:
        page = api.get(f"/v1/batches?limit=2&after={page['last_id']}", headers=A).json()
        seen += [j["id"] for j in page["data"]]
    assert seen == mine[::-1] and theirs not in seen
    assert [j["id"] for j in api.get("/v1/batches", headers=B).json()["data"]] == [theirs]
    for query in ("limit=0", "limit=101", "limit=x", f"after={theirs}", "after=nonsense"):
        resp = api.get(f"/v1/batches?{query}", headers=A)
        assert resp.status_code == 400 and "Traceback" not in resp.text, query


def test_a_cancelled_job_releases_only_its_owners_key(api):
    a = submit(api, A, "a1", key="k")
    b = submit(api, B, "b1", key="k")
    assert api.delete(f"/v1/batches/{a['id']}", headers=A).json()["status"] == "cancelled"
    assert submit(api, B, "b2", key="k")["id"] == b["id"]  # B's job under the same key is untouched
    fresh = submit(api, A, "a1", key="k")
    assert fresh["created"] and fresh["id"] != a["id"]


def test_the_key_itself_is_never_stored(api, redis_server, prefix):
    submit(api, A, "a1", key="chapter1")

    async def everything() -> bytes:
        r = aioredis.Redis.from_url(redis_server.url)
        out = b""
        async for key in r.scan_iter(f"{prefix}:*"):
            kind = (await r.type(key)).decode()
            out += key + b" " + repr(await {"hash": r.hgetall, "string": r.get, "zset": lambda k: r.zrange(k, 0, -1),
                                            "stream": lambda k: r.xrange(k)}.get(kind, r.type)(key)).encode()
        await r.aclose()
        return out

    dump = asyncio.run(everything())
    assert b"owner" in dump and b"key-a-secret" not in dump


def test_without_keys_everyone_is_one_tenant(redis_server, prefix):
    with make_client(redis_server.url, prefix, keys=frozenset()) as api:
        plain = {"Content-Type": "application/jsonl"}
        first = submit(api, plain, "i1", key="shared")
        assert submit(api, plain, "i2", key="shared")["id"] == first["id"]
        assert api.get(f"/v1/batches/{first['id']}", headers=plain).status_code == 200
        assert [j["id"] for j in api.get("/v1/batches", headers=plain).json()["data"]] == [first["id"]]
