"""Test helpers: a fake ``synthesize`` (the model is beside the point here), store/queue builders, waiting."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import redis
import redis.asyncio as aioredis

from bark_serve.cluster.batch_types import (
    MEDIA_TYPES,
    BatchItem,
    BatchKeys,
    ItemRecord,
    JobState,
    SynthesisResult,
    parse_item,
)
from bark_serve.cluster.jobs import JobInfo, JobStore
from bark_serve.cluster.queue import WorkQueue
from bark_serve.stages.types import InvalidRequestError


class FakeSynth:
    """Returns ``<id>:<text>`` as audio. Text prefixes steer it: INVALID (InvalidRequestError),
    FLAKY (fails its first attempt), BROKEN (always fails), SLOW (takes ``slow_s``)."""

    def __init__(self, delay_s: float = 0.005, slow_s: float = 1.0):
        self.delay_s = delay_s
        self.slow_s = slow_s
        self.calls: Counter = Counter()
        self.priorities: set[str] = set()
        self.active = 0
        self.max_active = 0

    async def __call__(self, item: BatchItem) -> SynthesisResult:
        self.calls[item.item_id] += 1
        self.priorities.add(item.priority)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.slow_s if item.text.startswith("SLOW") else self.delay_s)
        finally:
            self.active -= 1
        if item.text.startswith("INVALID"):
            raise InvalidRequestError(f"unknown voice {item.voice!r}")
        if item.text.startswith("FLAKY") and item.attempt == 1:
            raise RuntimeError("transient stage error")
        if item.text.startswith("BROKEN"):
            raise RuntimeError("stage keeps failing")
        return SynthesisResult(audio=expected_audio(item.item_id, item.text), sample_rate=24000, duration_s=0.25,
                               media_type=MEDIA_TYPES[item.format], timings={"fake_s": self.delay_s})


def expected_audio(item_id: str, text: str) -> bytes:
    return f"{item_id}:{text}".encode()


def records(texts: list[str], max_text_chars: int = 200) -> list[ItemRecord]:
    return [parse_item({"id": f"i{n:03d}", "text": t}, n, max_text_chars) for n, t in enumerate(texts)]


def build(url: str, prefix: str, *, max_attempts: int = 3, ttl: int = 3600, results_dir: str | None = None):
    """(client, store, queue) on their own asyncio client; create inside the running loop."""
    client = aioredis.Redis.from_url(url, socket_timeout=10)
    keys = BatchKeys(prefix)
    store = JobStore(client, keys=keys, result_ttl_s=ttl)
    queue = WorkQueue(client, keys=keys, max_attempts=max_attempts, result_ttl_s=ttl, results_dir=results_dir)
    return client, store, queue


async def wait_finished(store: JobStore, job_id: str, timeout_s: float = 30.0) -> JobInfo:
    """Poll until the job is completed or cancelled (and nothing is running)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = await store.get(job_id)
        except redis.exceptions.ConnectionError:  # a test that restarts Redis
            info = None
        if info and info.state in (JobState.COMPLETED, JobState.CANCELLED):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not finished in {timeout_s}s: {info}")
        await asyncio.sleep(0.05)


async def all_results(store: JobStore, job_id: str) -> list:
    out, cursor = [], "0"
    while True:
        page = await store.results(job_id, after=cursor, count=37)  # odd page size exercises the cursor
        if not page:
            return out
        out += page
        cursor = page[-1].cursor


async def drain(url: str, prefix: str, job_id: str, synth: FakeSynth | None = None, results_dir: str | None = None,
                **worker_kw) -> JobInfo:
    """Run one worker loop until the job is finished."""
    from bark_serve.cluster.batch_worker import BatchWorkerLoop

    client, store, queue = build(url, prefix, results_dir=results_dir)
    worker = BatchWorkerLoop(queue, synth or FakeSynth(), max_in_flight=4, claim_timeout_s=5, **worker_kw)
    task = asyncio.create_task(worker.run())
    try:
        return await wait_finished(store, job_id)
    finally:
        await worker.stop(grace_s=1)
        await task
        await client.aclose()
