"""The job store on a real redis-server: submission, idempotency, malformed items, cancel, cursor, TTL."""

from __future__ import annotations

import asyncio

import pytest

from bark_serve.cluster.batch_types import BatchKeys, InvalidBatchError, ItemState, JobState, check_unique, parse_item
from bark_serve.cluster.jobs import JobCancelled
from tests.cluster.helpers import FakeSynth, all_results, build, records


def run(coro):
    return asyncio.run(coro)


def test_parse_item_reasons():
    ok = parse_item({"id": "a", "text": "hi", "format": "flac", "options": {"semantic_temperature": 0.5}}, 0, 10)
    assert ok.error is None and ok.format == "flac" and ok.options == {"semantic_temperature": 0.5}
    assert parse_item({"text": "hi"}, 7, 10).id == "7"  # default id: the line index
    assert parse_item({"id": 12, "text": "hi"}, 0, 10).id == "12"
    reasons = {
        "missing": parse_item({"id": "a"}, 0, 10).error,
        "empty": parse_item({"id": "a", "text": "   "}, 0, 10).error,
        "long": parse_item({"id": "a", "text": "x" * 11}, 0, 10).error,
        "format": parse_item({"id": "a", "text": "hi", "format": "ogg"}, 0, 10).error,
        "extra": parse_item({"id": "a", "text": "hi", "temprature": 1}, 0, 10).error,
        "seed": parse_item({"id": "a", "text": "hi", "seed": -1}, 0, 10).error,
        "type": parse_item(["not", "a", "map"], 3, 10).error,
    }
    assert "text: Field required" in reasons["missing"]
    assert "text is empty" in reasons["empty"]
    assert "11 characters (max 10)" in reasons["long"]
    assert "format" in reasons["format"] and "wav" in reasons["format"]
    assert "temprature" in reasons["extra"]
    assert "seed" in reasons["seed"]
    assert "expected an object" in reasons["type"]
    with pytest.raises(InvalidBatchError, match="must match"):
        parse_item({"id": "../etc/passwd", "text": "x"}, 0, 10)
    with pytest.raises(InvalidBatchError, match="duplicate item ids"):
        check_unique(records(["a", "b"]) + records(["c"]))


def test_submit_counts_and_malformed_items(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        recs = records(["one", "two", "", "x" * 500]) + [parse_item(None, 4, 10, parse_error="line 4: invalid JSON")]
        res = await store.submit(recs)
        assert res.created and res.added == 2 and res.invalid == 3 and res.duplicates == 0
        c = res.job.counts
        assert (c.total, c.queued, c.failed, c.succeeded) == (5, 2, 3, 0)
        assert res.job.state is JobState.QUEUED
        failed = await all_results(store, res.job.job_id)
        assert {r.item_id: r.error_type for r in failed} == {"i002": "invalid_item", "i003": "invalid_item",
                                                            "4": "invalid_item"}
        assert "invalid JSON" in next(r.error for r in failed if r.item_id == "4")
        assert await client.xlen(BatchKeys(prefix).queue) == 2  # only valid items are enqueued
        await client.aclose()
    run(main())


def test_idempotent_resubmission(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        first = await store.submit(records(["a", "b", "c"]), job_key="file-123")
        again = await store.submit(records(["a", "b", "c", "d"]), job_key="file-123")
        assert again.job.job_id == first.job.job_id and not again.created
        assert (again.added, again.duplicates) == (1, 3)
        assert again.job.counts.total == 4
        changed = records(["a", "B!"])
        conflict = await store.submit(changed, job_key="file-123")
        assert conflict.conflicts == ["i001"] and conflict.duplicates == 1 and conflict.added == 0
        assert await client.xlen(BatchKeys(prefix).queue) == 4  # each item enqueued once
        other = await store.submit(records(["a"]))  # no key: a new job
        assert other.job.job_id != first.job.job_id
        await client.aclose()
    run(main())


def test_resubmitting_after_work_does_not_redo_it(redis_server, prefix):
    from bark_serve.cluster.batch_worker import BatchWorkerLoop
    from tests.cluster.helpers import wait_finished

    async def main():
        client, store, queue = build(redis_server.url, prefix)
        synth = FakeSynth()
        worker = BatchWorkerLoop(queue, synth, max_in_flight=4, claim_timeout_s=5)
        task = asyncio.create_task(worker.run())
        job = (await store.submit(records(["a", "b", "c"]), job_key="k")).job
        await wait_finished(store, job.job_id)
        again = await store.submit(records(["a", "b", "c"]), job_key="k")
        assert again.duplicates == 3 and again.added == 0
        assert again.job.state is JobState.COMPLETED
        await asyncio.sleep(0.3)
        await worker.stop(grace_s=1)
        await task
        assert sum(synth.calls.values()) == 3
        assert len(await all_results(store, job.job_id)) == 3
        await client.aclose()
    run(main())


def test_cancel_queued_job(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        res = await store.submit(records(["a", "b", "c", ""]), job_key="ck")
        info = await store.cancel(res.job.job_id)
        assert info.state is JobState.CANCELLED
        assert (info.counts.cancelled, info.counts.queued, info.counts.failed) == (3, 0, 1)
        with pytest.raises(JobCancelled):
            await store.add_items(res.job.job_id, records(["z"]))
        # a cancelled job releases its key: resubmitting starts afresh
        fresh = await store.submit(records(["a"]), job_key="ck")
        assert fresh.created and fresh.job.job_id != res.job.job_id
        # the worker skips the cancelled job's entries without running them
        leases = await queue.claim("w1", 10)
        assert [lease.entry.job_id for lease in leases] == [fresh.job.job_id]
        states = await store.item_states(res.job.job_id)
        assert states["i000"] is ItemState.CANCELLED
        assert await store.cancel("b_" + "0" * 32) is None
        await client.aclose()
    run(main())


def test_results_cursor_and_ttl(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix, ttl=120)
        res = await store.submit(records(["a", "b", "c"]))
        jid = res.job.job_id
        leases = await queue.claim("w1", 10)
        assert [lease.attempt for lease in leases] == [1, 1, 1]
        synth = FakeSynth()
        for lease in leases:
            await queue.complete(lease, await synth(lease.batch_item()))
        page1 = await store.results(jid, count=2)
        page2 = await store.results(jid, after=page1[-1].cursor)
        assert [r.item_id for r in page1 + page2] == ["i000", "i001", "i002"]
        assert page2[0].audio == b"i002:c" and page2[0].meta["media_type"] == "audio/wav"
        assert await store.results(jid, after=page2[-1].cursor) == []
        info = await store.get(jid)
        assert info.state is JobState.COMPLETED and info.rate_items_per_s > 0 and info.eta_s is None
        for part in ("", "items", "state", "attempts", "results"):
            ttl = await client.ttl(store.keys.job(jid, part))
            assert 0 < ttl <= 120, part
        await client.aclose()
    run(main())


def test_a_lease_carries_its_jobs_owner(redis_server, prefix):
    """The worker learns whose job an item is (the tenant whose registered voices it may name), from the
    job itself, whichever owner submitted it; "" for a server without API keys."""
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        mine = await store.submit(records(["a"]), owner="tenant-a")
        shared = await store.submit(records(["b"]))
        leases = {lease.entry.job_id: lease for lease in await queue.claim("w1", 10)}
        assert leases[mine.job.job_id].owner == "tenant-a"
        assert leases[mine.job.job_id].batch_item().owner == "tenant-a"
        assert leases[shared.job.job_id].owner == "" and leases[shared.job.job_id].batch_item().owner == ""
        await client.aclose()
    run(main())
