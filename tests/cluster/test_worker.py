"""BatchWorkerLoop on a real redis-server with a fake synthesize: exactly once, retries, cancel, leases."""

from __future__ import annotations

import asyncio
from collections import Counter

from bark_serve.cluster.batch_types import ErrorType, ItemState, JobState
from bark_serve.cluster.batch_worker import BatchWorkerLoop
from bark_serve.cluster.queue import Outcome
from tests.cluster.helpers import FakeSynth, all_results, build, expected_audio, records, wait_finished


def run(coro):
    return asyncio.run(coro)


async def start_workers(url, prefix, n, synth, **kw):
    loops, tasks, clients = [], [], []
    for i in range(n):
        client, _, queue = build(url, prefix, max_attempts=kw.get("max_attempts", 3))
        loop = BatchWorkerLoop(queue, synth, max_in_flight=kw.get("max_in_flight", 4),
                               claim_timeout_s=kw.get("claim_timeout_s", 5.0), consumer=f"w{i}")
        loops.append(loop)
        clients.append(client)
        tasks.append(asyncio.create_task(loop.run()))
    return loops, tasks, clients


async def stop_all(loops, tasks, clients):
    for loop in loops:
        await loop.stop(grace_s=0.5)
    await asyncio.gather(*tasks)
    for c in clients:
        await c.aclose()


def test_job_completes_with_every_item_exactly_once(redis_server, prefix):
    texts = [f"sentence {n}" for n in range(56)] + ["FLAKY once", "BROKEN always", "INVALID voice", ""]

    async def main():
        client, store, queue = build(redis_server.url, prefix)
        synth = FakeSynth(delay_s=0.01)
        loops, tasks, clients = await start_workers(redis_server.url, prefix, 2, synth, max_in_flight=4)
        job = (await store.submit(records(texts))).job
        info = await wait_finished(store, job.job_id)
        results = await all_results(store, job.job_id)
        await stop_all(loops, tasks, clients)

        ids = [r.item_id for r in results]
        assert len(ids) == len(set(ids)) == len(texts)  # every item exactly once in the results
        by_id = {r.item_id: r for r in results}
        for n, text in enumerate(texts[:56]):
            r = by_id[f"i{n:03d}"]
            assert r.state is ItemState.SUCCEEDED and r.audio == expected_audio(f"i{n:03d}", text)
            assert r.meta["sample_rate"] == 24000 and r.meta["format"] == "wav" and r.meta["index"] == n
        assert by_id["i056"].state is ItemState.SUCCEEDED and by_id["i056"].attempts == 2  # FLAKY: retried
        assert by_id["i057"].error_type == "synthesis_error" and by_id["i057"].attempts == 3
        assert "stage keeps failing" in by_id["i057"].error
        assert by_id["i058"].error_type == "invalid_item" and "unknown voice" in by_id["i058"].error
        assert by_id["i059"].error_type == "invalid_item" and "text is empty" in by_id["i059"].error

        calls = Counter(synth.calls)
        assert all(calls[f"i{n:03d}"] == 1 for n in range(56))
        assert (calls["i056"], calls["i057"], calls["i058"], calls["i059"]) == (2, 3, 1, 0)
        assert synth.max_active <= 8 and synth.priorities == {"batch"}
        assert sum(loop.stats.succeeded for loop in loops) == 57
        c = info.counts
        assert info.state is JobState.COMPLETED and (c.succeeded, c.failed, c.queued, c.running) == (57, 3, 0, 0)
        dead = await queue.dead_letters()
        assert [(d["job"], d["item"]) for d in dead] == [(job.job_id, "i057")]
        assert await queue.backlog() == (0, 0)  # acked entries are deleted
        await client.aclose()
    run(main())


def test_max_in_flight_bounds_one_worker(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        synth = FakeSynth(delay_s=0.03)
        loops, tasks, clients = await start_workers(redis_server.url, prefix, 1, synth, max_in_flight=3)
        job = (await store.submit(records([f"t{n}" for n in range(20)]))).job
        await wait_finished(store, job.job_id)
        await stop_all(loops, tasks, clients)
        assert synth.max_active == 3
        await client.aclose()
    run(main())


def test_cancel_stops_remaining_items(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        synth = FakeSynth(delay_s=0.1)
        loops, tasks, clients = await start_workers(redis_server.url, prefix, 1, synth, max_in_flight=2,
                                                    claim_timeout_s=0.6)
        job = (await store.submit(records([f"t{n}" for n in range(60)]))).job
        while (await store.get(job.job_id)).counts.succeeded < 4:
            await asyncio.sleep(0.02)
        info = await store.cancel(job.job_id)
        assert info.state is JobState.CANCELLED
        written = len(await all_results(store, job.job_id))
        calls = sum(synth.calls.values())
        await asyncio.sleep(0.8)  # a few claim/heartbeat cycles
        assert len(await all_results(store, job.job_id)) == written  # in-flight results were discarded
        assert sum(synth.calls.values()) == calls  # no queued item started after the cancel
        assert calls < 12
        final = await store.get(job.job_id)
        c = final.counts
        assert final.state is JobState.CANCELLED and c.succeeded + c.cancelled == 60 and c.running == 0
        assert await queue.backlog() == (0, 0)  # the cancelled job's entries were skipped and acked
        await stop_all(loops, tasks, clients)
        await client.aclose()
    run(main())


def test_heartbeat_keeps_a_slow_item_from_being_taken_over(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        synth = FakeSynth(delay_s=0.01, slow_s=1.5)
        loops, tasks, clients = await start_workers(redis_server.url, prefix, 2, synth, max_in_flight=2,
                                                    claim_timeout_s=0.5)
        job = (await store.submit(records(["SLOW one", "quick"]))).job
        await wait_finished(store, job.job_id)
        await stop_all(loops, tasks, clients)
        assert synth.calls["i000"] == 1  # held 3x longer than claim_timeout_s, never reclaimed
        await client.aclose()
    run(main())


def test_late_duplicate_cannot_write_twice(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        job = (await store.submit(records(["a", "b"]))).job
        first = await queue.claim("w1", 2)
        _, taken = await queue.reclaim("w2", 2, min_idle_ms=0)  # as if w1 had gone silent
        assert [lease.attempt for lease in taken] == [2, 2]
        synth = FakeSynth()
        # item a: the stale holder finishes first (its result wins), the new holder's is discarded
        assert await queue.complete(first[0], await synth(first[0].batch_item())) is Outcome.OK
        assert await queue.complete(taken[0], await synth(taken[0].batch_item())) is Outcome.DUPLICATE
        # item b: the stale holder's failure must not requeue an item someone else holds
        assert await queue.fail(first[1], "boom", ErrorType.SYNTHESIS_ERROR, retry=True) is Outcome.STALE
        assert await queue.complete(taken[1], await synth(taken[1].batch_item())) is Outcome.OK
        results = await all_results(store, job.job_id)
        assert sorted(r.item_id for r in results) == ["i000", "i001"]
        assert (await store.get(job.job_id)).counts.succeeded == 2
        await client.aclose()
    run(main())


def test_lost_workers_poison_item_is_dead_lettered(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix, max_attempts=2)
        job = (await store.submit(records(["crashes its worker"]))).job
        assert len(await queue.claim("w1", 1)) == 1
        assert len((await queue.reclaim("w2", 1, min_idle_ms=0))[1]) == 1
        assert (await queue.reclaim("w3", 1, min_idle_ms=0))[1] == []  # third delivery > max_attempts
        [r] = await all_results(store, job.job_id)
        assert r.state is ItemState.FAILED and r.error_type == "worker_lost" and r.attempts == 2
        assert (await queue.dead_letters())[0]["item"] == "i000"
        assert await queue.backlog() == (0, 0)
        await client.aclose()
    run(main())


def test_stop_releases_in_flight_items(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        slow = FakeSynth(slow_s=30)
        loops, tasks, clients = await start_workers(redis_server.url, prefix, 1, slow, max_in_flight=2)
        job = (await store.submit(records(["SLOW a", "SLOW b"]))).job
        while slow.active < 2:
            await asyncio.sleep(0.02)
        await stop_all(loops, tasks, clients)  # grace 0.5 s < 30 s: both are given back
        info = await store.get(job.job_id)
        assert (info.counts.queued, info.counts.running) == (2, 0)
        fast = FakeSynth(slow_s=0.01)
        loops, tasks, clients = await start_workers(redis_server.url, prefix, 1, fast)
        await wait_finished(store, job.job_id)
        await stop_all(loops, tasks, clients)
        assert all(r.attempts == 1 for r in await all_results(store, job.job_id))  # a release is no attempt
        await client.aclose()
    run(main())


def test_results_dir_keeps_audio_on_disk(redis_server, prefix, tmp_path):
    async def main():
        client, store, queue = build(redis_server.url, prefix, results_dir=str(tmp_path))
        job = (await store.submit(records(["a"]))).job
        [lease] = await queue.claim("w1", 1)
        _, [again] = await queue.reclaim("w2", 1, min_idle_ms=0)
        synth = FakeSynth()
        assert await queue.complete(lease, await synth(lease.batch_item())) is Outcome.OK
        assert await queue.complete(again, await synth(again.batch_item())) is Outcome.DUPLICATE
        [r] = await all_results(store, job.job_id)
        assert r.audio is None and open(r.path, "rb").read() == b"i000:a"
        files = [p.name for p in (tmp_path / prefix / job.job_id).iterdir()]
        assert files == ["i000.a1.wav"]  # the loser's file is gone
        await client.aclose()
    run(main())


def test_item_timeout_and_bad_return_are_retried_then_failed(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix, max_attempts=2)
        synth = FakeSynth(slow_s=5.0)

        async def synthesize(item):
            if item.text == "returns nothing":
                return None
            return await synth(item)

        worker = BatchWorkerLoop(queue, synthesize, max_in_flight=4, claim_timeout_s=5, item_timeout_s=0.2)
        task = asyncio.create_task(worker.run())
        job = (await store.submit(records(["SLOW forever", "returns nothing", "fine"]))).job
        await wait_finished(store, job.job_id)
        await worker.stop(grace_s=0.5)
        await task
        by_id = {r.item_id: r for r in await all_results(store, job.job_id)}
        assert by_id["i000"].error.startswith("TimeoutError") and by_id["i000"].attempts == 2
        assert "expected SynthesisResult" in by_id["i001"].error and by_id["i001"].attempts == 2
        assert by_id["i002"].state is ItemState.SUCCEEDED
        await client.aclose()
    run(main())


def test_prune_drops_only_idle_consumers_holding_nothing(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        await store.submit(records(["a"]))
        await queue.claim("holder", 1)
        await client.xgroup_createconsumer(queue.keys.queue, queue.keys.group, "ghost")  # a dead worker's name
        assert await queue.prune_consumers(min_idle_ms=0) == 1
        names = [c["name"] for c in await client.xinfo_consumers(queue.keys.queue, queue.keys.group)]
        assert names == [b"holder"]
        await client.aclose()
    run(main())
