"""The orchestrator's core: pipeline the segments of a planned request through the stages.

How this works: a request is planned into segments (stages/plan.py: sentences packed up to a token
budget, each with its speaker and the history rule). Every (stage, segment) pair is one asyncio task
that waits for what it needs: its own input from the previous stage, and the history prompt from the
same speaker's previous segment (Bark's long-form recipe: segment i continues segment i-1's voice).
So segment 2 is in semantic while segment 1 is in coarse, and audio chunks stream out in order as
the codec finishes them. A multi-speaker script is split line by line; a segment waits only for its
own speaker's previous segment, so two speakers' lines can be in flight together, and the chunks
still come out in script order. Stage calls go through ``call(stage, request, priority)``: Ray Serve
handles in the app, plain schedulers in tests.

A request holds at most ``max_segments_in_flight`` calls in each stage at once
(a ``SegmentWindow`` per stage, lowest segment first). Segments usually wait
for their predecessor anyway (the history prompt), but a segment whose
predecessor produced almost no semantic tokens carries the request's own voice
instead, so without the window a long text of tiny segments would send all
its coarse/fine/codec calls at once and fill the stage queues for everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bark_serve.schema.request import SynthesisRequest
from bark_serve.stages.constants import STAGES, BarkSpec
from bark_serve.stages.longform import carries_voice
from bark_serve.stages.plan import Plan, Planner, segment_history
from bark_serve.stages.types import GenerationParams, Priority, StageRequest, VoicePrompt
from bark_serve.stages.voices import VoiceLibrary

StageCall = Callable[[str, StageRequest, Priority], Awaitable[object]]  # (stage, request, priority) -> StageOutput


@dataclass
class AudioChunk:
    index: int
    n_segments: int
    audio: np.ndarray  # float32 at sample_rate
    sample_rate: int
    timings: dict[str, dict[str, float]]  # stage -> queued_at / started / finished (epoch seconds)
    semantic_tokens: int
    line: int | None = None  # the script line this segment belongs to (None for a text request)


class SegmentWindow:
    """At most ``size`` segments of one request inside one stage at once (None: no bound).

    Waiting segments are let in lowest index first, so the segment the client
    needs next is never stuck behind later ones. ``peak`` records the most
    ever inside at once.
    """

    def __init__(self, size: int | None):
        if size is not None and size < 1:
            raise ValueError("a segment window needs size >= 1")
        self.size, self.active, self.peak = size, 0, 0
        self._waiting: list[tuple[int, int, asyncio.Future]] = []  # heap of (segment, seq, future)
        self._seq = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, index: int):
        await self._acquire(index)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, index: int) -> None:
        if self.size is None or (self.active < self.size and not self._waiting):
            self._enter()
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (index, next(self._seq), fut))
        try:
            await fut  # _release entered on our behalf before resolving it
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted, then cancelled before we ran: give it back
                self._release()
            raise

    def _enter(self) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)

    def _release(self) -> None:
        self.active -= 1
        while self._waiting and (self.size is None or self.active < self.size):
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():  # a cancelled waiter's future is done: skip it
                self._enter()
                fut.set_result(None)


class Synthesizer:
    """Streams a plan's segments through the stages; plans with its ``planner`` (stages/plan.py)."""

    def __init__(self, planner: Planner, spec: BarkSpec, call: StageCall, max_segments_in_flight: int | None = 4):
        self.planner, self.spec, self.call = planner, spec, call
        self.max_segments_in_flight = max_segments_in_flight  # per request and stage; None: unbounded
        # Planning (splitting, tokenizing, reading voices) is CPU work that grows with the text: it runs in one
        # thread (a fast tokenizer must not be used by two threads at once), so the event loop keeps serving
        # streams, heartbeats and health checks meanwhile.
        self._planner_thread: ThreadPoolExecutor | None = None

    @property
    def voices(self) -> VoiceLibrary:
        return self.planner.voices

    async def plan_async(self, text: str | None = None, voice=None, params: GenerationParams = GenerationParams(),
                         priority: Priority | str = Priority.INTERACTIVE, request_id: str | None = None,
                         script: Sequence[tuple[object, str]] | None = None,
                         own_voices: Mapping[str, VoicePrompt] | None = None) -> Plan:
        """``Planner.plan`` in this synthesizer's planning thread, off the caller's event loop."""
        if self._planner_thread is None:
            self._planner_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bark-plan")
        call = functools.partial(self.planner.plan, text, voice, params, priority, request_id, script, own_voices)
        return await asyncio.get_running_loop().run_in_executor(self._planner_thread, call)

    async def plan_request(self, req: SynthesisRequest, request_id: str | None = None,
                           own_voices: Mapping[str, VoicePrompt] | None = None) -> Plan:
        """A caller's typed request (bark_serve.schema) planned, off the event loop: the one way every path
        (HTTP, the handle, batch items) turns a request into a plan. ``own_voices``: Planner.plan's."""
        return await self.plan_async(req.text, req.voice, req.generation_params(), req.priority, request_id,
                                     req.lines(), own_voices)

    async def stream(self, plan: Plan, on_stage: Callable[[str], None] | None = None) -> AsyncIterator[AudioChunk]:
        """Audio chunks, one per segment, in order, as soon as each is decoded. ``on_stage(stage)`` is called
        each time one of the plan's segments leaves a stage (a batch item's progress)."""
        tasks: dict[tuple[str, int], asyncio.Task] = {}
        windows = {stage: SegmentWindow(self.max_segments_in_flight) for stage in STAGES}
        for i in range(len(plan.segments)):
            for stage in STAGES:
                tasks[stage, i] = asyncio.ensure_future(self._stage(stage, i, plan, tasks, windows[stage], on_stage))
        try:
            for i in range(len(plan.segments)):
                out = await tasks["codec", i]
                timings = {s: _times(tasks[s, i].result()) for s in STAGES}
                yield AudioChunk(i, len(plan.segments), out.output, self.spec.sample_rate, timings,
                                 len(tasks["semantic", i].result().output), plan.line_of(i))
        finally:
            for task in tasks.values():
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: a failure shared by the tasks after it is raised once, above

    async def collect(self, plan: Plan, on_stage: Callable[[str], None] | None = None) -> list[AudioChunk]:
        return [chunk async for chunk in self.stream(plan, on_stage)]

    # -- one (stage, segment) task ----------------------------------------------------------------
    async def _stage(self, stage: str, i: int, plan: Plan, tasks, window: SegmentWindow,
                     on_stage: Callable[[str], None] | None):
        """Segment i in ``stage``: wait for its input and its history, then call the stage."""
        if stage == "semantic":
            upstream = plan.text_ids[i]
        else:
            upstream = (await tasks[STAGES[STAGES.index(stage) - 1], i]).output
        history = await self._history(i, plan, tasks, stage) if stage != "codec" else None
        req = plan.stage_request(stage, i, upstream, history)
        async with window.slot(i):  # inputs are ready; only the call itself takes a place in the window
            out = await self.call(stage, req, plan.priority)
        if on_stage is not None:
            on_stage(stage)
        return out

    @staticmethod
    async def _history(i: int, plan: Plan, tasks, stage: str) -> VoicePrompt | None:
        """Segment i's history prompt (the plan's rule, stages/plan.py), as far as ``stage`` reads it, awaiting
        only what the rule looks at: semantic waits for the history segment's semantic tokens alone."""
        for j in plan.history_candidates(i):
            if carries_voice((await tasks["semantic", j]).output):
                break
        else:
            return plan.voices[plan.speakers[i]]
        outputs = {s: (await tasks[s, j]).output for s in STAGES[:STAGES.index(stage) + 1]}
        return segment_history(lambda s, _: outputs[s], j, stage)


def _times(out) -> dict[str, float]:
    return {"queued_at": out.queued_at, "started": out.started, "finished": out.finished}
