"""Durability: a SIGKILLed worker's items are taken over; a Redis restart (AOF) mid-job loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from bark_serve.cluster.batch_types import BatchKeys, ItemState, JobState
from bark_serve.cluster.batch_worker import BatchWorkerLoop
from tests.cluster.helpers import FakeSynth, all_results, build, expected_audio, records, wait_finished

REPO = Path(__file__).resolve().parents[2]


def spawn_worker(url: str, prefix: str, name: str, claim_timeout_s: float = 1.0, delay_s: float = 0.05):
    proc = subprocess.Popen([sys.executable, "-m", "tests.cluster.worker_proc", url, prefix, name,
                             str(claim_timeout_s), str(delay_s)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def check_exactly_once(results, texts):
    ids = [r.item_id for r in results]
    assert len(ids) == len(set(ids)) == len(texts)
    for r in results:
        n = int(r.item_id[1:])
        assert r.state is ItemState.SUCCEEDED and r.audio == expected_audio(r.item_id, texts[n])


def test_killed_worker_items_are_taken_over(redis_server, prefix):
    texts = [f"line {n}" for n in range(60)]
    keys = BatchKeys(prefix)
    sync = redis.Redis.from_url(redis_server.url)

    async def submit():
        client, store, _ = build(redis_server.url, prefix)
        job = (await store.submit(records(texts))).job
        await client.aclose()
        return job.job_id

    victim = spawn_worker(redis_server.url, prefix, "victim")
    survivor = spawn_worker(redis_server.url, prefix, "survivor")
    try:
        job_id = asyncio.run(submit())
        deadline = time.monotonic() + 20
        held: list = []
        while not held:  # wait until the victim holds items (and has done some work)
            assert time.monotonic() < deadline, "the victim never held an item"
            done = int(sync.hget(keys.job(job_id), "succeeded") or 0)
            pending = sync.xpending_range(keys.queue, keys.group, "-", "+", 10, consumername="victim")
            held = [p["message_id"] for p in pending] if done >= 5 else []
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait()

        async def finish():
            client, store, _ = build(redis_server.url, prefix)
            info = await wait_finished(store, job_id, timeout_s=30)
            results = await all_results(store, job_id)
            await client.aclose()
            return info, results

        info, results = asyncio.run(finish())
        assert info.state is JobState.COMPLETED and info.counts.succeeded == 60
        check_exactly_once(results, texts)
        assert any(r.attempts == 2 for r in results)  # the victim's items were re-run by the survivor
        assert sync.xlen(keys.queue) == 0
    finally:
        for p in (victim, survivor):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)
        sync.close()
    assert survivor.returncode == 0  # SIGTERM stops it cleanly


def test_redis_restart_mid_job_resumes(own_redis):
    texts = [f"line {n}" for n in range(80)]
    prefix = "restart"

    async def main():
        client, store, queue = build(own_redis.url, prefix)
        synth = FakeSynth(delay_s=0.05)
        worker = BatchWorkerLoop(queue, synth, max_in_flight=4, claim_timeout_s=2.0)
        task = asyncio.create_task(worker.run())
        job = (await store.submit(records(texts))).job
        while (await store.get(job.job_id)).counts.succeeded < 10:
            await asyncio.sleep(0.02)
        # SIGTERM: Redis writes its AOF and exits; down for 2 s (longer than redis-py's own retries, so the
        # worker must see the outage), then back up
        await asyncio.to_thread(own_redis.restart, down_s=2.0)
        info = await wait_finished(store, job.job_id, timeout_s=40)
        results = await all_results(store, job.job_id)
        await worker.stop(grace_s=1)
        await task
        await client.aclose()
        return info, results, worker.stats

    info, results, stats = asyncio.run(main())
    assert info.state is JobState.COMPLETED and info.counts.succeeded == 80
    check_exactly_once(results, texts)
    assert stats.redis_errors > 0  # the worker did see the outage, and rode it out
