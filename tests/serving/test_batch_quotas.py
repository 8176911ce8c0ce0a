"""Per-key quotas of batch jobs (issue 25): jobs in flight, items queued, result bytes kept, follow
streams; results past a size in results_dir; a full Redis answered 503, never evicted. A real Redis,
the router with two keys, a real worker loop (tests/cluster/helpers.py FakeSynth) to finish items.

Before: any key could queue without bound (100k items a submission, any number of jobs), keep results
without bound, and hold any number of `follow=true` streams, each polling Redis for up to 300 s.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import pytest
import redis

from bark_serve.cluster.quotas import Quota
from bark_serve.serving.batch_api import BatchLimits
from tests.cluster.helpers import drain, expected_audio
from tests.cluster.redis_server import RedisServer, prefix, redis_server  # noqa: F401  (fixtures)
from tests.serving.test_batch_tenancy import A, B, body, make_client, submit


def refused(resp, limit: str) -> dict:
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["code"] == "quota_exceeded" and limit in error["message"] and resp.headers["retry-after"]
    return error


def test_jobs_in_flight_per_key(redis_server, prefix):
    with make_client(redis_server.url, prefix, limits=BatchLimits(quota=Quota(max_jobs_in_flight=2))) as api:
        first = submit(api, A, "a1", key="one")
        submit(api, A, "a2")
        refused(api.post("/v1/batches", content=body("a3"), headers=A), "max_jobs_in_flight")
        assert len(api.get("/v1/batches", headers=A).json()["data"]) == 2  # nothing was written
        assert submit(api, A, "a4", key="one")["id"] == first["id"]  # adding to an open job is no new job
        submit(api, B, "b1")  # another key has its own count
        assert api.delete(f"/v1/batches/{first['id']}", headers=A).status_code == 200
        submit(api, A, "a5")  # a cancelled job is not in flight


def test_items_queued_per_key_counts_only_new_items(redis_server, prefix):
    with make_client(redis_server.url, prefix, limits=BatchLimits(quota=Quota(max_items_queued=5))) as api:
        job = submit(api, A, "i1", "i2", "i3", key="book")
        error = refused(api.post("/v1/batches", content=body("i4", "i5", "i6"), headers={**A, "Idempotency-Key": "x"}),
                        "max_items_queued")
        assert "3 of your items" in error["message"] and "adds 3" in error["message"]
        # the same file again, with two new lines: only the two count, and they fit
        again = submit(api, A, "i1", "i2", "i3", "i4", "i5", key="book")
        assert again["id"] == job["id"] and again["added"] == 2 and again["duplicates"] == 3
        assert submit(api, A, "i1", "i2", key="book")["added"] == 0  # a pure resubmission always passes
        refused(api.post("/v1/batches", content=body("z"), headers=A), "max_items_queued")
        submit(api, B, "b1", "b2", "b3", "b4", "b5")
        # a malformed item fails at once, so it holds no place in the queue
        bad = api.post("/v1/batches", content=body("b6").replace('"text"', '"txt"'), headers=B)
        assert bad.status_code == 202 and bad.json()["invalid"] == 1


def test_result_bytes_kept_per_key(redis_server, prefix):
    with make_client(redis_server.url, prefix, limits=BatchLimits(quota=Quota(max_result_bytes=25))) as api:
        job = submit(api, A, "r1", "r2", "r3")
        asyncio.run(drain(redis_server.url, prefix, job["id"]))
        kept = sum(len(expected_audio(i, f"text {i}")) for i in ("r1", "r2", "r3"))
        assert kept >= 25
        error = refused(api.post("/v1/batches", content=body("r4"), headers=A), "max_result_bytes")
        assert f"{kept} bytes" in error["message"]
        submit(api, B, "b1")  # B keeps nothing
        lines = api.get(f"/v1/batches/{job['id']}/results", headers=A).text.splitlines()
        assert [json.loads(x)["type"] for x in lines] == ["result"] * 3 + ["end"]  # kept results stay readable



def long_items(n: int, chars: int, tag: str = "") -> str:
    return "".join(json.dumps({"id": f"{tag}{i}", "text": "w" * chars}) + "\n" for i in range(n))


def test_request_bytes_kept_per_key_and_a_cancel_gives_them_back(redis_server, prefix):
    """Submitting and cancelling big jobs held their item requests in Redis until the jobs expired (7 days),
    counted by no quota: one key filled the shared Redis, and every other key's submissions were refused as
    `store_full`. Now a key's requests count against max_request_bytes, and a cancel drops them at once."""
    limit = 40_000
    with make_client(redis_server.url, prefix, limits=BatchLimits(quota=Quota(max_request_bytes=limit))) as api:
        first = api.post("/v1/batches", content=long_items(3, 10_000), headers=A)
        assert first.status_code == 202, first.text
        job = first.json()["id"]
        error = refused(api.post("/v1/batches", content=long_items(2, 10_000, "more"), headers=A), "max_request_bytes")
        assert "bytes of item requests" in error["message"] and "adds" in error["message"]
        assert api.post("/v1/batches", content=long_items(3, 10_000), headers=B).status_code == 202  # B's own
        client = redis.Redis.from_url(redis_server.url)
        items_key = f"{prefix}:job:{job}:items"
        assert client.exists(items_key) and int(client.hget(f"{prefix}:job:{job}", "request_bytes")) > 30_000
        assert api.delete(f"/v1/batches/{job}", headers=A).status_code == 200
        assert not client.exists(items_key)  # the requests are gone from Redis, not kept until the job expires
        assert int(client.hget(f"{prefix}:job:{job}", "request_bytes")) == 0
        again = api.post("/v1/batches", content=long_items(3, 10_000, "again"), headers=A)
        assert again.status_code == 202, again.text  # the cancelled job's bytes were given back
        assert api.get(f"/v1/batches/{job}", headers=A).json()["status"] == "cancelled"


def test_a_cancel_frees_a_full_redis(tmp_path, prefix):
    """On a Redis at maxmemory (noeviction) a cancel still runs and frees the job's requests, so submissions
    are taken again."""
    from bark_serve.cluster.local_redis import LocalRedis

    server = LocalRedis.start(tmp_path / "state", maxmemory="4mb")
    try:
        client = redis.Redis.from_url(server.url)
        with make_client(server.url, prefix) as api:
            big = api.post("/v1/batches", content=long_items(100, 15_000), headers=A)
            assert big.status_code == 202, big.text
            for size in (2**17, 2**10):  # fill the rest, to the brim: Redis refuses the write that finds it full
                with pytest.raises(redis.exceptions.OutOfMemoryError):
                    for n in range(10_000):
                        client.set(f"ballast{size}-{n}", b"x" * size)
            full = api.post("/v1/batches", content=body("b1"), headers=B)
            assert full.status_code == 503 and full.json()["error"]["code"] == "store_full", full.text
            cancel = api.delete(f"/v1/batches/{big.json()['id']}", headers=A)
            assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled", cancel.text
            # UNLINK frees a big hash in Redis's background thread: the room comes back within moments (a client
            # told 503 retries after Retry-After)
            deadline = time.monotonic() + 15
            while (again := api.post("/v1/batches", content=body("b1"), headers=B)).status_code == 503:
                assert time.monotonic() < deadline, again.text
                time.sleep(0.1)
            assert again.status_code == 202, again.text
    finally:
        server.stop()

def work_off(url: str, prefix: str, job: str, results_dir, **queue_attrs) -> dict:
    """Run a batch worker (FakeSynth) with a results_dir until ``job`` is finished; its results by item id.
    ``queue_attrs`` are set on the WorkQueue first (inline_max, inline_fraction)."""
    from bark_serve.cluster.batch_worker import BatchWorkerLoop
    from bark_serve.cluster.jobs import JobStore
    from tests.cluster.helpers import FakeSynth, build, wait_finished

    async def run() -> dict:
        _, store, queue = build(url, prefix, results_dir=str(results_dir))
        for name, value in queue_attrs.items():
            setattr(queue, name, value)
        worker = BatchWorkerLoop(queue, FakeSynth(), max_in_flight=2, claim_timeout_s=5)
        task = asyncio.create_task(worker.run())
        await wait_finished(store, job)
        await worker.stop(grace_s=1)
        await task
        assert isinstance(store, JobStore)
        return {r.item_id: r for r in await store.results(job)}

    return asyncio.run(run())


def test_small_results_go_to_results_dir_once_redis_is_half_full(tmp_path, prefix):
    """With a results_dir, a result small enough to stay inline goes to the folder instead once Redis holds
    more than inline_results_max_fraction of its maxmemory: one key's many small (mp3, opus) results cannot
    fill a capped Redis for every key. Both kinds read back the same through the API."""
    from bark_serve.cluster.local_redis import LocalRedis

    server = LocalRedis.start(tmp_path / "state", maxmemory="16mb")
    try:
        client = redis.Redis.from_url(server.url)
        with make_client(server.url, prefix) as api:
            def run(job: str) -> dict:  # every result of this test is small
                return work_off(server.url, prefix, job, tmp_path / "results", inline_max=2**20, inline_fraction=0.5)

            roomy = submit(api, A, "before")["id"]
            assert run(roomy)["before"].audio is not None  # Redis nearly empty: inline
            n = 0
            while client.info("memory")["used_memory"] < 0.6 * 16 * 2**20:  # past half, with room to write
                client.set(f"ballast{n}", b"x" * 2**18)
                n += 1
            assert client.info("memory")["used_memory"] < 0.8 * 16 * 2**20
            tight = submit(api, B, "after", "after-2")["id"]
            recs = run(tight)
            for item_id, rec in recs.items():
                assert rec.audio is None and rec.path and rec.path.startswith(str(tmp_path / "results")), item_id
            lines = api.get(f"/v1/batches/{tight}/results", headers=B).text.splitlines()[:-1]
            got = {json.loads(x)["id"]: json.loads(x) for x in lines}
            for item_id in recs:
                assert base64.b64decode(got[item_id]["audio"]) == expected_audio(item_id, f"text {item_id}")
    finally:
        server.stop()


def test_follow_streams_per_key(redis_server, prefix):
    limits = BatchLimits(max_follow_streams=1, follow_max_s=30)
    with make_client(redis_server.url, prefix, limits=limits) as api:
        a = submit(api, A, "f1")["id"]
        b = submit(api, B, "g1")["id"]
        opened, release = threading.Event(), threading.Event()

        def follow():
            with api.stream("GET", f"/v1/batches/{a}/results?follow=true", headers=A) as resp:
                assert resp.status_code == 200
                opened.set()
                release.wait(30)  # held open: the job never finishes (no worker)

        holder = threading.Thread(target=follow)
        holder.start()
        try:
            assert opened.wait(10)
            refused(api.get(f"/v1/batches/{a}/results?follow=true", headers=A), "max_follow_streams")
            assert api.get(f"/v1/batches/{a}/results", headers=A).status_code == 200  # without follow: fine
            with api.stream("GET", f"/v1/batches/{b}/results?follow=true&wait_s=0.5", headers=B) as resp:
                assert resp.status_code == 200  # another key
                resp.read()
        finally:
            release.set()
            holder.join(30)
        for _ in range(50):  # the closed stream gives its place back
            resp = api.get(f"/v1/batches/{a}/results?follow=true&wait_s=0.2", headers=A)
            if resp.status_code == 200:
                break
        assert resp.status_code == 200, resp.text



def test_a_burst_of_follow_streams_is_held_to_the_cap(redis_server, prefix):
    """Many follow requests at once: at most the cap are granted (each counted in the event-loop step that
    checked the cap; they were counted from their first byte, so a burst passed the check together: 13 of 60
    with a cap of 8), and every place is given back when they end."""
    from concurrent.futures import ThreadPoolExecutor

    limits = BatchLimits(max_follow_streams=2, follow_max_s=30)
    with make_client(redis_server.url, prefix, limits=limits) as api:
        a = submit(api, A, "f1")["id"]

        def follow(_):
            return api.get(f"/v1/batches/{a}/results?follow=true&wait_s=1.5", headers=A).status_code

        for _ in range(2):  # and again, once the first burst has given its places back
            with ThreadPoolExecutor(16) as pool:
                codes = list(pool.map(follow, range(16)))
            assert set(codes) <= {200, 429} and 1 <= codes.count(200) <= 2, codes

def test_big_results_go_to_results_dir_small_ones_stay_in_redis(redis_server, prefix, tmp_path):
    with make_client(redis_server.url, prefix) as api:
        job = submit(api, A, "s", "a-much-longer-item-id")["id"]
        recs = work_off(redis_server.url, prefix, job, tmp_path, inline_max=len(expected_audio("s", "text s")))
        assert recs["s"].audio is not None and recs["s"].path is None
        big = recs["a-much-longer-item-id"]
        assert big.audio is None and big.path and big.path.startswith(str(tmp_path / prefix / job))
        lines = api.get(f"/v1/batches/{job}/results", headers=A).text.splitlines()[:-1]
        got = {json.loads(x)["id"]: json.loads(x) for x in lines}
        for item_id in recs:
            assert base64.b64decode(got[item_id]["audio"]) == expected_audio(item_id, f"text {item_id}")


def test_expired_jobs_result_files_are_swept(redis_server, prefix, tmp_path):
    from tests.cluster.helpers import build

    with make_client(redis_server.url, prefix) as api:
        job = submit(api, A, "x")["id"]
        asyncio.run(drain(redis_server.url, prefix, job, results_dir=str(tmp_path)))
        folder = tmp_path / prefix / job
        assert any(folder.iterdir())
        other = tmp_path / "another-prefix" / job  # another deployment's files are never touched
        other.mkdir(parents=True)

        async def sweep(min_age_s: float) -> int:
            client, _, queue = build(redis_server.url, prefix, results_dir=str(tmp_path))
            try:
                return await queue.sweep_results(min_age_s)
            finally:
                await client.aclose()

        assert asyncio.run(sweep(0)) == 0 and folder.exists()  # the job is alive
        redis.Redis.from_url(redis_server.url).delete(f"{prefix}:job:{job}")  # as if it expired
        assert asyncio.run(sweep(3600)) == 0 and folder.exists()  # too young yet
        assert asyncio.run(sweep(0)) == 1 and not folder.exists() and other.exists()


def test_a_full_redis_refuses_writes_with_503_and_evicts_nothing(tmp_path, prefix):
    from bark_serve.cluster.local_redis import LocalRedis

    server = LocalRedis.start(tmp_path / "state", maxmemory="3mb")
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("maxmemory")["maxmemory"] == str(3 * 2**20)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        with make_client(server.url, prefix) as api:
            first = submit(api, A, "kept")["id"]
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                for n in range(64):  # fill it to the cap: Redis refuses the write that finds it full
                    client.set(f"ballast{n}", b"x" * 2**18)
            client.config_set("maxmemory", "1mb")  # and well past it, so that any write is refused
            resp = api.post("/v1/batches", content=body("one-more"), headers=A)
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "store_full", resp.text
            assert "Traceback" not in resp.text and resp.headers["retry-after"]
            assert api.get(f"/v1/batches/{first}", headers=A).json()["counts"]["queued"] == 1  # not evicted
    finally:
        server.stop()
