"""The orchestrator's core: validate, split, and pipeline the segments of a request through the stages.

How this works: a request becomes segments (sentences packed up to a token
budget). Every (stage, segment) pair is one asyncio task that waits for what
it needs: its own input from the previous stage, and the history prompt from
the same speaker's previous segment (Bark's long-form recipe: segment i
continues segment i-1's voice). So segment 2 is in semantic while segment 1
is in coarse, and audio chunks stream out in order as the codec finishes
them. A multi-speaker script is split line by line; a segment waits only for
its own speaker's previous segment, so two speakers' lines can be in flight
together, and the chunks still come out in script order. Stage calls go
through ``call(stage, request, priority)``: Ray Serve handles in the app, plain
schedulers in tests.

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
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bark_serve.stages.constants import STAGES, BarkSpec
from bark_serve.stages.longform import (
    carries_voice,
    history_prompt,
    previous_of_speaker,
    segment_seed,
    split_script,
)
from bark_serve.stages.requests import stage_request
from bark_serve.stages.text import TextPreparer
from bark_serve.stages.types import GenerationParams, InvalidRequestError, Priority, StageRequest, VoicePrompt
from bark_serve.stages.voices import VoiceLibrary

StageCall = Callable[[str, StageRequest, Priority], Awaitable[object]]  # (stage, request, priority) -> StageOutput


class TextTooLarge(InvalidRequestError):
    """More characters than the server accepts in one request (HTTP 413)."""


@dataclass(frozen=True)
class Plan:
    request_id: str
    segments: tuple[str, ...]
    text_ids: tuple[np.ndarray, ...]
    voices: tuple[VoicePrompt | None, ...]  # one per speaker (a text request has one)
    speakers: tuple[int, ...]  # each segment's speaker, an index into ``voices``
    previous: tuple[int | None, ...]  # each segment's history segment: its speaker's previous one
    params: GenerationParams
    seed: int
    priority: Priority
    lines: tuple[int, ...] = ()  # a script's: each segment's line (0-based); empty for a text request

    @property
    def voice(self) -> VoicePrompt | None:
        """The first speaker's voice (the only one of a text request)."""
        return self.voices[0]


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
    def __init__(self, text: TextPreparer, voices: VoiceLibrary, spec: BarkSpec, call: StageCall,
                 segment_max_tokens: int = 200, max_text_chars: int = 20_000,
                 voice_aliases: Mapping[str, str] | None = None, max_segments_in_flight: int | None = 4,
                 first_segment_max_tokens: int | None = None):
        self.text, self.voices, self.spec, self.call = text, voices, spec, call
        self.max_segments_in_flight = max_segments_in_flight  # per request and stage; None: unbounded
        self.segment_max_tokens = min(segment_max_tokens, text.max_tokens)
        self.first_segment_max_tokens = first_segment_max_tokens  # None: the first segment is like the others
        self.max_text_chars = max_text_chars
        self.aliases = dict(voice_aliases or {})
        # Planning (splitting, tokenizing, reading voices) is CPU work that grows with the text: callers on an
        # event loop use plan_async, which runs it in one thread (a fast tokenizer must not be used by two
        # threads at once), so the loop keeps serving streams, heartbeats and health checks meanwhile.
        self._planner: ThreadPoolExecutor | None = None

    def resolve_voice(self, voice) -> VoicePrompt | None:
        if isinstance(voice, str):
            voice = self.aliases.get(voice, voice)
        return self.voices.resolve(voice)

    def plan(self, text: str | None, voice=None, params: GenerationParams = GenerationParams(),
             priority: Priority | str = Priority.INTERACTIVE, request_id: str | None = None,
             script: Sequence[tuple[object, str]] | None = None) -> Plan:
        """Check everything a request carries before any stage sees it; raises InvalidRequestError.

        ``script``: (voice, text) lines instead of ``text`` and ``voice``; their characters together
        count against ``max_text_chars``.
        """
        lines = self._lines(text, voice, script)
        chars = sum(len(t) for _, t in lines)
        if chars > self.max_text_chars:
            raise TextTooLarge(f"input has {chars} characters; this server accepts at most {self.max_text_chars}")
        speakers, segments = split_script(lines, self.text.count, self.segment_max_tokens,
                                          self.first_segment_max_tokens, self.aliases)
        voices = tuple(self.resolve_voice(v) for v in speakers)
        ids = tuple(self.text.encode(s.text) for s in segments)
        who = tuple(s.speaker for s in segments)
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        return Plan(request_id or uuid.uuid4().hex, tuple(s.text for s in segments), ids, voices, who,
                    tuple(previous_of_speaker(who)), params, seed, Priority(priority),
                    tuple(s.line for s in segments) if script is not None else ())

    async def plan_async(self, text: str | None, voice=None, params: GenerationParams = GenerationParams(),
                         priority: Priority | str = Priority.INTERACTIVE, request_id: str | None = None,
                         script: Sequence[tuple[object, str]] | None = None) -> Plan:
        """:meth:`plan` in this synthesizer's planning thread, off the caller's event loop."""
        if self._planner is None:
            self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bark-plan")
        call = functools.partial(self.plan, text, voice, params, priority, request_id, script)
        return await asyncio.get_running_loop().run_in_executor(self._planner, call)

    @staticmethod
    def _lines(text, voice, script) -> list[tuple[object, str]]:
        if script is None:
            if not isinstance(text, str) or not text.strip():
                raise InvalidRequestError("input text is empty")
            return [(voice, text)]
        if text is not None or voice is not None:
            raise InvalidRequestError("a script names each line's voice: send no text or voice with it")
        if not script:
            raise InvalidRequestError("the script has no lines")
        for n, line in enumerate(script):
            if not (isinstance(line, tuple) and len(line) == 2 and isinstance(line[1], str)):
                raise InvalidRequestError(f"script line {n}: expected a (voice, text) pair")
            if not line[1].strip():
                raise InvalidRequestError(f"script line {n}: text is empty")
        return list(script)

    async def stream(self, plan: Plan) -> AsyncIterator[AudioChunk]:
        """Audio chunks, one per segment, in order, as soon as each is decoded."""
        tasks: dict[tuple[str, int], asyncio.Task] = {}
        windows = {stage: SegmentWindow(self.max_segments_in_flight) for stage in STAGES}
        for i in range(len(plan.segments)):
            for stage in STAGES:
                tasks[stage, i] = asyncio.ensure_future(self._stage(stage, i, plan, tasks, windows[stage]))
        try:
            for i in range(len(plan.segments)):
                out = await tasks["codec", i]
                timings = {s: _times(tasks[s, i].result()) for s in STAGES}
                yield AudioChunk(i, len(plan.segments), out.output, self.spec.sample_rate, timings,
                                 len(tasks["semantic", i].result().output), plan.lines[i] if plan.lines else None)
        finally:
            for task in tasks.values():
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: a failure shared by the tasks after it is raised once, above

    async def collect(self, plan: Plan) -> list[AudioChunk]:
        return [chunk async for chunk in self.stream(plan)]

    # -- one (stage, segment) task ----------------------------------------------------------------
    async def _stage(self, stage: str, i: int, plan: Plan, tasks, window: SegmentWindow):
        """Segment i in ``stage``: wait for its input and its history, then call the stage."""
        if stage == "semantic":
            upstream = plan.text_ids[i]
        else:
            upstream = (await tasks[STAGES[STAGES.index(stage) - 1], i]).output
        history = await self._history(i, plan, tasks, stage) if stage != "codec" else None
        req = stage_request(stage, f"{plan.request_id}:{i}", upstream, history, plan.params,
                            segment_seed(plan.seed, i), segment=i)
        async with window.slot(i):  # inputs are ready; only the call itself takes a place in the window
            return await self.call(stage, req, plan.priority)

    async def _history(self, i: int, plan: Plan, tasks, stage: str) -> VoicePrompt | None:
        """Segment i's history prompt (stages/longform.py's rule), as far as ``stage`` reads it: semantic
        needs only the history segment's semantic tokens, so it need not wait for its coarse and fine.
        The history segment is the same speaker's previous one, never another speaker's."""
        prev = plan.previous[i]
        while prev is not None:  # a loop, not recursion: a script of a thousand near-silent lines walks far
            sem = (await tasks["semantic", prev]).output
            if carries_voice(sem):
                break
            prev = plan.previous[prev]
        if prev is None:
            return plan.voices[plan.speakers[i]]
        coarse = (await tasks["coarse", prev]).output if stage in ("coarse", "fine") else None
        fine = (await tasks["fine", prev]).output if stage == "fine" else None
        return history_prompt(sem, coarse, fine)


def _times(out) -> dict[str, float]:
    return {"queued_at": out.queued_at, "started": out.started, "finished": out.finished}
