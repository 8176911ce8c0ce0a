"""Batch progress at stage granularity, stage-rate ETA, item timeouts, retry logs, JSON-typed results."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np

from bark_serve.cluster.batch_types import MEDIA_TYPES, BatchItem, JobState, SynthesisResult
from bark_serve.cluster.batch_worker import BatchWorkerLoop
from bark_serve.cluster.jobs import JobCounts, stage_eta
from bark_serve.cluster.queue import _plain_timings
from bark_serve.serving.batch_app import ItemProgress
from bark_serve.stages.constants import STAGES
from tests.cluster.helpers import FakeSynth, all_results, build, records, wait_finished


class StagedSynth:
    """Walks each item through the four stages (reporting them like the BatchWorker does); items wait in
    ``fine`` until ``release`` is set."""

    def __init__(self):
        self.loop: BatchWorkerLoop | None = None
        self.release = asyncio.Event()

    async def __call__(self, item: BatchItem) -> SynthesisResult:
        progress = ItemProgress(1, lambda stage, passed: self.loop.report_stage(item.job_id, item.item_id,
                                                                                stage, passed))
        for stage in STAGES:
            if stage == "fine":
                await self.release.wait()
            await asyncio.sleep(0.01)
            progress.finished(stage)
        timings = {"seed": 2**40 + 1, "stages_s": {s: np.float32(0.25) for s in STAGES}}
        return SynthesisResult(audio=b"x", sample_rate=24000, duration_s=0.1, media_type=MEDIA_TYPES["wav"],
                               timings=timings)


async def _wait_for(predicate, store, job_id, timeout_s=10.0):
    for _ in range(int(timeout_s / 0.05)):
        info = await store.get(job_id)
        if predicate(info):
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached: {info}")


def test_status_shows_items_per_stage_rates_and_eta(redis_server, prefix):
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        synth = StagedSynth()
        loop = BatchWorkerLoop(queue, synth, max_in_flight=3, claim_timeout_s=5.0, consumer="w")
        synth.loop = loop
        task = asyncio.create_task(loop.run())
        job = (await store.submit(records([f"t{n}" for n in range(5)]))).job
        info = await _wait_for(lambda i: i.stages.get("fine") == 3, store, job.job_id)
        assert info.state is JobState.RUNNING and info.stages == {"semantic": 0, "coarse": 0, "fine": 3, "codec": 0}
        assert info.stage_rates["semantic"] > 0 and info.stage_rates["fine"] == 0
        assert info.eta_s is None  # fine has passed nothing yet: no rate to go by
        assert info.to_dict()["stages"]["fine"] == 3
        synth.release.set()
        done = await wait_finished(store, job.job_id)
        assert done.stages == {} and done.counts.succeeded == 5
        assert all(done.stage_rates[s] > 0 for s in STAGES)
        results = await all_results(store, job.job_id)
        timings = results[0].meta["timings"]  # plain JSON types, not a repr string and a float seed
        assert timings["seed"] == 2**40 + 1 and isinstance(timings["seed"], int)
        assert timings["stages_s"] == {s: 0.25 for s in STAGES}
        json.dumps(results[0].meta)
        await loop.stop(0.5)
        await task
        await client.aclose()
    asyncio.run(main())


def test_stage_eta_is_set_by_the_slowest_stage():
    counts = JobCounts(total=20, queued=10, running=4, succeeded=6)
    stages = {"semantic": 1, "coarse": 1, "fine": 2, "codec": 0}
    rates = {"semantic": 4.0, "coarse": 2.0, "fine": 0.5, "codec": 1.0}
    # fine still has to see the 10 queued items and the 4 running ones not past it: 14 / 0.5
    assert stage_eta(counts, stages, rates) == 28.0
    assert stage_eta(counts, stages, {**rates, "codec": 0.0}) is None


def test_item_timeout_fails_with_its_reason_and_each_retry_is_logged(redis_server, prefix, caplog):
    async def main():
        client, store, queue = build(redis_server.url, prefix, max_attempts=2)
        synth = FakeSynth(slow_s=1.0)
        loop = BatchWorkerLoop(queue, synth, max_in_flight=2, claim_timeout_s=5.0, item_timeout_s=0.2,
                               consumer="w")
        task = asyncio.create_task(loop.run())
        job = (await store.submit(records(["SLOW one", "FLAKY two"]))).job
        await wait_finished(store, job.job_id)
        by_id = {r.item_id: r for r in await all_results(store, job.job_id)}
        await loop.stop(0.5)
        await task
        await client.aclose()
        return by_id

    with caplog.at_level(logging.WARNING, logger="bark.batch.queue"):
        by_id = asyncio.run(main())
    assert by_id["i000"].attempts == 2 and "batch.item_timeout_s (0.2 s)" in by_id["i000"].error
    assert by_id["i001"].attempts == 2 and by_id["i001"].error is None
    logs = [r.getMessage() for r in caplog.records]
    assert any("i000: attempt 1 of 2 failed, retrying" in m and "item_timeout_s" in m for m in logs)
    assert any("i001: attempt 1 of 2 failed, retrying: RuntimeError: transient stage error" in m for m in logs)
    assert any("i000: failed after attempt 2 of 2" in m for m in logs)


def test_no_item_timeout_by_default(redis_server, prefix):
    """Without batch.item_timeout_s a slow item runs to the end (heartbeats keep it)."""
    async def main():
        client, store, queue = build(redis_server.url, prefix)
        loop = BatchWorkerLoop(queue, FakeSynth(slow_s=1.5), max_in_flight=1, claim_timeout_s=0.9, consumer="w")
        task = asyncio.create_task(loop.run())
        job = (await store.submit(records(["SLOW item"]))).job
        info = await wait_finished(store, job.job_id)
        await loop.stop(0.5)
        await task
        await client.aclose()
        return info, loop.item_timeout_s

    info, timeout = asyncio.run(main())
    assert timeout is None and info.counts.succeeded == 1


def test_plain_timings_keeps_json_types():
    out = _plain_timings({"seed": 7, "stages_s": {"semantic": np.float64(1.5)}, "n": np.int64(3), "x": object()})
    assert out["seed"] == 7 and isinstance(out["seed"], int)
    assert out["stages_s"] == {"semantic": 1.5} and out["n"] == 3 and isinstance(out["n"], int)
    assert isinstance(out["x"], str)


def test_batch_worker_uses_only_the_batch_item_timeout():
    """The interactive request_timeout_s never bounds a batch item (BatchWorker reads batch.item_timeout_s)."""
    import inspect

    from bark_serve.serving import batch_app

    src = inspect.getsource(batch_app).replace("the interactive request_timeout_s", "")
    assert "request_timeout_s" not in src and "item_timeout_s=bcfg.item_timeout_s" in src
