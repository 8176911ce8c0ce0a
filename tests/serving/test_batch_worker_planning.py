"""The batch worker plans an item off its event loop (issue 25): heartbeats, claims and other items' stage
calls share that loop, and planning a 20k-character item is CPU work that grows with the text.

Real BatchWorker code (the deployment's class, without Ray) on real engines behind in-process schedulers.
"""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
import soundfile as sf

from bark_serve.cluster.batch_types import BatchItem
from bark_serve.cluster.batch_worker import BatchWorkerLoop
from bark_serve.serving.batch_app import BatchWorker
from bark_serve.serving.config import BarkConfig
from bark_serve.serving.scheduler import StageScheduler
from bark_serve.serving.synthesis import Synthesizer
from bark_serve.stages.constants import STAGES
from bark_serve.stages.plan import Planner


@pytest.fixture(scope="module")
def pipe_capacity() -> int:
    return 4


def _worker(pipe, tiny_ckpt) -> BatchWorker:
    scheds: dict[str, StageScheduler] = {}

    async def call(stage, req, priority):
        if stage not in scheds:
            scheds[stage] = StageScheduler(pipe.engines[stage], batch_wait_s=0)
        return await scheds[stage].submit(req, priority)

    # the deployment's own class, without Ray or Redis (and without Serve's async shutdown hook: no loop to stop)
    cls = type("InProcessBatchWorker", (BatchWorker.func_or_class,), {"__del__": lambda self: None})
    worker = object.__new__(cls)
    worker.cfg = BarkConfig(model=str(tiny_ckpt))
    worker.synth = Synthesizer(Planner(pipe.text, pipe.voices, 200, None, 20_000), pipe.spec, call)
    worker.loop = BatchWorkerLoop(None, worker.synthesize)  # only its report_stage is used here
    return worker


def test_an_item_is_planned_in_the_planning_thread_not_on_the_workers_loop(pipe, tiny_ckpt):
    worker = _worker(pipe, tiny_ckpt)
    planned_on: list[str] = []
    plan = worker.synth.planner.plan

    def recording_plan(*args, **kwargs):
        planned_on.append(threading.current_thread().name)
        return plan(*args, **kwargs)

    worker.synth.planner.plan = recording_plan
    reports: list[tuple] = []
    worker.loop.report_stage = lambda *report: reports.append(report)
    item = BatchItem(job_id="job1", item_id="a", text="Hello there. A short item.", voice=None, seed=7,
                     format="wav", options={"max_semantic_tokens": 8})

    async def run():
        loop_thread = threading.current_thread().name
        return loop_thread, await worker.synthesize(item)

    loop_thread, result = asyncio.run(run())
    assert planned_on and all(name.startswith("bark-plan") for name in planned_on), planned_on
    assert loop_thread not in planned_on
    audio, sr = sf.read(io.BytesIO(result.audio))
    assert sr == result.sample_rate and len(audio) > 0
    # the item's progress, from its segments leaving each stage (Synthesizer.stream's on_stage): every stage
    # passed once, in order, and the item ends in none
    assert sum((passed for *_, passed in reports), []) == list(STAGES), reports
    assert reports[0] == ("job1", "a", "semantic", []) and reports[-1][2] is None
