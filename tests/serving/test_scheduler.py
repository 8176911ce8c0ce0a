"""The stage batching loop, without Ray: priorities, joins, isolation of failures, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
import types

import numpy as np
import pytest

from bark_serve.serving.scheduler import QueueFull, ReplicaPoisoned, StageError, StageScheduler
from bark_serve.stages.engine import EngineOptions
from bark_serve.stages.pipeline import BarkPipeline
from bark_serve.stages.types import EngineResult, InvalidRequestError, SamplingParams, SemanticRequest


class CountingEngine:
    """A fake engine: each request needs ``n`` steps; records admission order and batch sizes."""

    name = "fake"

    def __init__(self, capacity=2, fail_step_when=None):
        self.capacity, self.held, self.admitted, self.batches = capacity, {}, [], []
        self.fail_step_when = fail_step_when
        self.last_step = {}

    @property
    def num_active(self):
        return len(self.held)

    @property
    def free(self):
        return self.capacity - len(self.held)

    def admit(self, req):
        if req.n < 0:
            raise InvalidRequestError("n must be >= 0")
        self.held[req.request_id] = req.n
        self.admitted.append(req.request_id)

    def cancel(self, rid):
        return self.held.pop(rid, None) is not None

    def step(self):
        time.sleep(0.002)  # a step takes time, as a model forward does (it runs in a worker thread)
        self.batches.append(sorted(self.held))
        if self.fail_step_when and self.fail_step_when in self.held:
            raise RuntimeError("boom")
        done = []
        for rid in list(self.held):
            self.held[rid] -= 1
            if self.held[rid] <= 0:
                done.append(EngineResult(rid, output=rid.upper()))
                del self.held[rid]
        self.last_step = {"batch": len(self.batches[-1]), "tokens": len(self.batches[-1]), "step_s": 0.0}
        return done


class Req:
    def __init__(self, rid, n=1, segment=0):
        self.request_id, self.n, self.segment = rid, n, segment


def run(coro):
    return asyncio.run(coro)


def test_interactive_requests_go_before_batch_requests():
    async def main():
        eng = CountingEngine(capacity=1)
        sched = StageScheduler(eng, batch_wait_s=0.01)
        tasks = [asyncio.create_task(sched.submit(Req(f"b{i}", 1), "batch")) for i in range(3)]
        tasks += [asyncio.create_task(sched.submit(Req(f"i{i}", 1), "interactive")) for i in range(2)]
        outs = await asyncio.gather(*tasks)
        await sched.stop()
        return eng.admitted, [o.output for o in outs]

    admitted, outputs = run(main())
    assert admitted[:2] == ["i0", "i1"] and admitted[2:] == ["b0", "b1", "b2"]
    assert outputs == ["B0", "B1", "B2", "I0", "I1"]


def test_first_segments_go_before_later_segments_of_other_requests():
    """Segment-aware priority: a new request's first segment overtakes queued later segments of long texts
    (so it hears audio early), but never overtakes interactive work when it is batch work."""
    async def main():
        eng = CountingEngine(capacity=1)
        sched = StageScheduler(eng, batch_wait_s=0.01)
        tasks = [asyncio.create_task(sched.submit(Req(f"long:{i}", 1, segment=i), "interactive")) for i in (3, 4, 5)]
        tasks.append(asyncio.create_task(sched.submit(Req("batch:0", 1, segment=0), "batch")))
        tasks.append(asyncio.create_task(sched.submit(Req("new:0", 1, segment=0), "interactive")))
        tasks.append(asyncio.create_task(sched.submit(Req("other:1", 1, segment=1), "interactive")))
        tasks.append(asyncio.create_task(sched.submit(Req("odd", 1, segment="x"), "interactive")))  # not an int: 0
        await asyncio.gather(*tasks)
        await sched.stop()
        return eng.admitted

    assert run(main()) == ["new:0", "odd", "other:1", "long:3", "long:4", "long:5", "batch:0"]


def test_requests_join_between_steps_and_timestamps_are_ordered():
    async def main():
        eng = CountingEngine(capacity=4)
        sched = StageScheduler(eng, batch_wait_s=0)
        first = asyncio.create_task(sched.submit(Req("a", 100)))
        await asyncio.sleep(0.05)
        second = await sched.submit(Req("b", 1))
        return eng.batches, await first, second

    batches, a, b = run(main())
    assert ["a"] in batches and ["a", "b"] in batches  # b joined while a was running
    assert a.queued_at <= a.started <= a.finished and b.finished <= a.finished


def test_a_bad_request_fails_alone_and_a_failed_step_spares_the_loop():
    async def main():
        eng = CountingEngine(capacity=4, fail_step_when="boom")
        sched = StageScheduler(eng, batch_wait_s=0.01)
        bad = asyncio.create_task(sched.submit(Req("bad", -1)))
        good = asyncio.create_task(sched.submit(Req("good", 2)))
        with pytest.raises(InvalidRequestError):
            await bad
        assert (await good).output == "GOOD"
        with pytest.raises(StageError, match="boom"):
            await sched.submit(Req("boom", 1))
        eng.fail_step_when = None
        after = await sched.submit(Req("after", 1))
        return after.output, sched.alive

    assert run(main()) == ("AFTER", True)


def test_queue_limit_and_cancellation():
    async def main():
        eng = CountingEngine(capacity=1)
        sched = StageScheduler(eng, max_queue=2, batch_wait_s=0)
        long = asyncio.create_task(sched.submit(Req("long", 10_000)))
        await asyncio.sleep(0.02)
        waiting = [asyncio.create_task(sched.submit(Req(f"w{i}", 1))) for i in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await sched.submit(Req("over", 1))
        long.cancel()  # the caller went away: the engine drops it at the next step boundary
        outs = await asyncio.gather(*waiting)
        return eng.held, [o.output for o in outs]

    held, outs = run(main())
    assert "long" not in held and outs == ["W0", "W1"]


def test_real_engine_continuous_batching_through_the_scheduler(tiny_ckpt):
    pipe = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=3))
    eng = pipe.engines["semantic"]
    reqs = [SemanticRequest(f"r{i}", pipe.text.encode(t), None, SamplingParams(0.8), None, n, seed=i)
            for i, (t, n) in enumerate([("Hello there.", 30), ("Another one here.", 12), ("Third!", 20),
                                        ("Fourth, queued.", 9)])]
    alone = {r.request_id: eng.run([r])[0].output for r in reqs}
    main_thread = threading.get_ident()

    async def main():
        sched = StageScheduler(eng, batch_wait_s=0)
        tasks = []
        for r in reqs:
            tasks.append(asyncio.create_task(sched.submit(r)))
            await asyncio.sleep(0.01)  # arrive while the others decode
        outs = await asyncio.gather(*tasks)
        await sched.stop()
        return outs

    outs = run(main())
    assert threading.get_ident() == main_thread
    for r, o in zip(reqs, outs):
        np.testing.assert_array_equal(o.output, alone[r.request_id])


def test_an_isolated_request_runs_alone_and_in_its_turn():
    """A retried crash suspect (serving/stage_calls.py) waits for the engine to empty, then runs alone."""

    async def main():
        eng = CountingEngine(capacity=4)
        sched = StageScheduler(eng, batch_wait_s=0.01)
        first = [asyncio.create_task(sched.submit(Req(f"a{i}", 3))) for i in range(2)]
        await asyncio.sleep(0.02)  # a0, a1 are in the engine
        alone = asyncio.create_task(sched.submit(Req("s", 2), isolated=True))
        await asyncio.sleep(0.001)
        later = [asyncio.create_task(sched.submit(Req(f"b{i}", 1))) for i in range(2)]
        outs = await asyncio.gather(*first, alone, *later)
        await sched.stop()
        return eng.batches, [o.output for o in outs]

    batches, outputs = run(main())
    assert outputs == ["A0", "A1", "S", "B0", "B1"]
    with_s = [b for b in batches if "s" in b]
    assert with_s == [["s"], ["s"]]  # alone, for both of its steps
    first_s = batches.index(["s"])
    assert all("b0" not in b and "b1" not in b for b in batches[:first_s])  # nothing jumped ahead of it
    assert ["b0", "b1"] in batches[first_s + 2:]


class StickyCudaError(CountingEngine):
    """A fake engine whose device broke: every step raises as a sticky CUDA error does. Records the step thread."""

    def __init__(self, capacity=1):
        super().__init__(capacity)
        self.step_threads = set()

    def step(self):
        self.step_threads.add(threading.get_ident())
        time.sleep(0.002)
        raise RuntimeError("CUDA error: device-side assert triggered")


def test_a_failed_step_on_an_unusable_device_poisons_the_replica():
    """A sticky CUDA error fails every later step and admit of the process. After a failed step the scheduler
    probes the device in the step thread; if the probe fails too it admits nothing more: the requests waiting
    and those that come later fail at once with ReplicaPoisoned (a StageError that the stage calls retry and
    the API answers 503 + Retry-After), and the replica's health check fails, so Serve replaces it. Before,
    the replica failed every request ("could not admit") and stayed healthy."""
    from bark_serve.serving.stage_server import StageServer

    async def main():
        probed = []

        def probe():
            probed.append(threading.get_ident())
            raise RuntimeError("CUDA error: device-side assert triggered")

        eng = StickyCudaError(capacity=1)
        sched = StageScheduler(eng, batch_wait_s=0.01, probe=probe)
        server = types.SimpleNamespace(stage="fake", scheduler=sched)
        await StageServer.func_or_class.check_health(server)  # healthy until the device breaks
        held = asyncio.create_task(sched.submit(Req("held", 3)))
        queued = asyncio.create_task(sched.submit(Req("queued", 1)))  # capacity 1: it waits its turn
        with pytest.raises(StageError, match="device-side assert") as failed:
            await held
        assert not isinstance(failed.value, ReplicaPoisoned)  # it was in the step that broke: not retried
        with pytest.raises(ReplicaPoisoned):
            await queued
        with pytest.raises(ReplicaPoisoned, match="unusable"):
            await sched.submit(Req("later", 1))
        with pytest.raises(RuntimeError, match="device unusable"):
            await StageServer.func_or_class.check_health(server)
        assert not await StageServer.func_or_class.ready(server)
        await sched.stop()
        return eng, probed

    eng, probed = run(main())
    assert eng.admitted == ["held"] and len(probed) == 1 and set(probed) == eng.step_threads


def test_a_failed_step_on_a_working_device_only_fails_its_requests():
    async def main():
        probed = []
        eng = CountingEngine(capacity=4, fail_step_when="boom")
        sched = StageScheduler(eng, batch_wait_s=0.01, probe=lambda: probed.append(True))
        with pytest.raises(StageError, match="boom"):
            await sched.submit(Req("boom", 1))
        after = await sched.submit(Req("after", 1))
        await sched.stop()
        return probed, after.output, sched.poisoned

    assert run(main()) == ([True], "AFTER", None)


def test_the_device_probe_runs_on_cuda_only(monkeypatch):
    """Engines probe their device with a sync and a tiny op, which raises after a sticky CUDA error; on CPU
    there is nothing to probe."""
    import torch

    from bark_serve.stages.engine import StageEngine

    def broken(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    StageEngine.probe_device(types.SimpleNamespace(device=torch.device("cpu")))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        StageEngine.probe_device(types.SimpleNamespace(device=torch.device("cuda")))


def test_a_poisoned_replicas_refusal_is_retried_and_answered_503():
    """The stage call sends a refused request again (not isolated: it ran nowhere); if the retries meet the
    poisoned replica every time, the client gets 503 with Retry-After, not a 500."""
    from bark_serve.serving.errors import to_api_error
    from bark_serve.serving.stage_calls import retrying_call

    calls = []

    class Run:
        def __init__(self, refusals):
            self.refusals = refusals

        async def remote(self, request, priority, isolated):
            calls.append(isolated)
            if len(calls) <= self.refusals:
                raise ReplicaPoisoned("fake replica's device is unusable")
            return "ok"

    def handles(refusals):
        calls.clear()
        return {"fake": types.SimpleNamespace(run=Run(refusals))}

    req = Req("r")
    assert run(retrying_call(handles(1), backoff_s=(0.0,))("fake", req, "interactive")) == "ok"
    assert calls == [False, False]
    with pytest.raises(ReplicaPoisoned) as refused:
        run(retrying_call(handles(5), retries=2, backoff_s=(0.0,))("fake", req, "interactive"))
    assert calls == [False, False, False]
    answer = to_api_error(refused.value, retry_after=3)
    assert answer.status == 503 and answer.retry_after == 3
