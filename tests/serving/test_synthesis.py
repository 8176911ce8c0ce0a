"""The orchestrator's segment pipeline, on real engines behind in-process schedulers (no Ray)."""

from __future__ import annotations

import asyncio
import time
import zlib

import numpy as np
import pytest

from bark_serve.serving.scheduler import StageOutput, StageScheduler
from bark_serve.serving.synthesis import SegmentWindow, Synthesizer
from bark_serve.stages.plan import Planner, TextTooLarge
from bark_serve.stages.types import GenerationParams, InvalidRequestError

LONG = ("The first sentence is here. The second one follows it closely! Is this the third? "
        "Yes, and a fourth closes the paragraph.")


@pytest.fixture(scope="module")
def pipe_capacity() -> int:
    return 4


def make_synth(pipe, **kw):
    scheds = {}

    async def call(stage, req, priority):
        if stage not in scheds:
            scheds[stage] = StageScheduler(pipe.engines[stage], batch_wait_s=0)
        return await scheds[stage].submit(req, priority)

    window = kw.pop("max_segments_in_flight", 4)
    return Synthesizer(planner_of(pipe, **kw), pipe.spec, call, window)


def planner_of(pipe, segment_max_tokens=200, first_segment_max_tokens=None, max_text_chars=20_000,
               voice_aliases=None) -> Planner:
    """The served defaults (serving/config.py OrchestratorConfig) over the test pipeline's tokenizer and voices."""
    return Planner(pipe.text, pipe.voices, segment_max_tokens, first_segment_max_tokens, max_text_chars, voice_aliases)


@pytest.mark.parametrize("params", [GenerationParams.greedy(max_semantic_tokens=12, min_eos_p=None),
                                    GenerationParams(max_semantic_tokens=12, seed=42)], ids=["greedy", "seeded"])
def test_pipelined_segments_equal_the_sequential_long_form(pipe, params):
    synth = make_synth(pipe, segment_max_tokens=12)
    plan = synth.planner.plan(LONG, "v2/en_speaker_1", params)
    assert len(plan.segments) >= 3
    chunks = asyncio.run(synth.collect(plan))
    assert [c.index for c in chunks] == list(range(len(plan.segments)))
    ref = pipe.synthesize(LONG, "v2/en_speaker_1", params, max_segment_tokens=12)
    np.testing.assert_allclose(np.concatenate([c.audio for c in chunks]), ref.audio, atol=1e-5)


def test_segments_overlap_across_stages(pipe):
    synth = make_synth(pipe, segment_max_tokens=12)
    plan = synth.planner.plan(LONG, None, GenerationParams(max_semantic_tokens=40, seed=1))
    chunks = asyncio.run(synth.collect(plan))
    # segment 1 entered the semantic stage before segment 0 left the pipeline (codec finished)
    assert chunks[1].timings["semantic"]["started"] < chunks[0].timings["codec"]["finished"]


def test_the_first_segment_budget_makes_a_short_first_segment_and_stage_requests_carry_their_index(pipe):
    seen = []
    synth = make_synth(pipe, segment_max_tokens=24, first_segment_max_tokens=8)
    inner = synth.call

    async def call(stage, req, priority):
        seen.append((stage, req.request_id, req.segment))
        return await inner(stage, req, priority)

    synth.call = call
    plan = synth.planner.plan(LONG, None, GenerationParams.greedy(max_semantic_tokens=6, min_eos_p=None))
    assert pipe.text.count(plan.segments[0]) <= 8 < max(pipe.text.count(s) for s in plan.segments[1:])
    asyncio.run(synth.collect(plan))
    assert sorted(seen) == sorted((st, f"{plan.request_id}:{i}", i)
                                  for i in range(len(plan.segments)) for st in ("semantic", "coarse", "fine", "codec"))


def test_plan_checks_input_first(pipe):
    synth = make_synth(pipe, max_text_chars=50, voice_aliases={"alloy": "v2/en_speaker_6"})
    assert synth.planner.plan("hello", "alloy").voice.name == "v2/en_speaker_6"
    with pytest.raises(TextTooLarge):
        synth.planner.plan("x" * 51)
    with pytest.raises(InvalidRequestError, match="empty"):
        synth.planner.plan("   ")
    with pytest.raises(InvalidRequestError, match="unknown voice"):
        synth.planner.plan("hello", "nobody")


# -- the per-request window of segments in each stage --------------------------------------------------
class RecordingStages:
    """A ``call`` whose outputs are a pure function of the request, recording concurrent calls per stage.

    Most segments get a single semantic token, so the next segment carries the request's own voice
    instead of waiting for its predecessor: the case that sent every coarse call of a long text at once.
    """

    def __init__(self):
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    async def call(self, stage, req, priority):
        self.active[stage] = self.active.get(stage, 0) + 1
        self.peak[stage] = max(self.peak.get(stage, 0), self.active[stage])
        try:
            key = _digest(stage, req)
            # semantic stops after one token (fast), the later stages take longer; jitter reorders finishes
            await asyncio.sleep(STAGE_SECONDS[stage] * (1 + key % 4 / 4))
            out = _fake_output(stage, req, key)
        finally:
            self.active[stage] -= 1
        now = time.time()
        return StageOutput(out, now, now, now)


STAGE_SECONDS = {"semantic": 0.0, "coarse": 0.02, "fine": 0.004, "codec": 0.002}


def _digest(stage, req) -> int:
    """A checksum of everything the request carries (history prompt included)."""
    parts = [stage.encode(), str(getattr(req, "seed", 0)).encode()]
    for name in ("text_ids", "semantic_tokens", "coarse_codes", "fine_codes"):
        if getattr(req, name, None) is not None:
            parts.append(np.ascontiguousarray(getattr(req, name)).tobytes())
    voice = getattr(req, "voice", None)
    if voice is not None:
        parts += [np.ascontiguousarray(a).tobytes() for a in (voice.semantic, voice.coarse, voice.fine)]
    return zlib.crc32(b"|".join(parts))


def _fake_output(stage, req, key):
    rng = np.random.default_rng(key)
    if stage == "semantic":
        segment = int(req.request_id.rsplit(":", 1)[1])
        return rng.integers(0, 100, size=5 if segment % 10 == 0 else 1)
    if stage == "coarse":
        return rng.integers(0, 100, size=(2, 3 * len(req.semantic_tokens)))
    if stage == "fine":
        return rng.integers(0, 100, size=(8, req.coarse_codes.shape[1]))
    return rng.standard_normal(req.fine_codes.shape[1] * 4).astype(np.float32)


def test_a_request_holds_at_most_the_window_in_each_stage(pipe):
    text = " ".join(f"Line {i} is here." for i in range(100))

    def run(window):
        stages = RecordingStages()
        synth = Synthesizer(planner_of(pipe, segment_max_tokens=8), pipe.spec, stages.call, window)
        plan = synth.planner.plan(text, "v2/en_speaker_1", GenerationParams(seed=7), request_id="r")
        assert len(plan.segments) == 100
        return asyncio.run(synth.collect(plan)), stages.peak

    bounded, peak = run(4)
    unbounded, flood = run(None)
    print(f"max calls in flight per stage: window 4 {peak}, unbounded {flood}")
    assert max(peak.values()) <= 4 and peak["coarse"] == 4  # bounded, yet still concurrent (semantic is
    # sequential by nature: each segment's text prompt waits for its predecessor's semantic tokens)
    assert flood["coarse"] > 8  # without the window the coarse calls pile up as fast as semantic ends
    assert [c.index for c in bounded] == list(range(100))
    for a, b in zip(bounded, unbounded):
        np.testing.assert_array_equal(a.audio, b.audio)


def test_the_window_lets_the_lowest_segment_in_first_and_survives_cancellation():
    async def scenario():
        window = SegmentWindow(1)
        order = []

        async def enter(i, hold):
            async with window.slot(i):
                order.append(i)
                await hold.wait()

        hold = asyncio.Event()
        first = asyncio.ensure_future(enter(0, hold))
        await asyncio.sleep(0)
        late = [asyncio.ensure_future(enter(i, hold)) for i in (5, 3, 4)]
        await asyncio.sleep(0)
        late[2].cancel()  # segment 4 gives up while waiting: its turn must not be lost
        hold.set()
        await asyncio.gather(first, *late, return_exceptions=True)
        return order, window.active, window.peak

    order, active, peak = asyncio.run(scenario())
    assert order == [0, 3, 5] and active == 0 and peak == 1


def test_the_history_walk_over_thousands_of_near_silent_segments_does_not_recurse(pipe):
    """Each segment too short to carry the voice: the walk back reaches the speaker's own voice, past
    Python's recursion limit."""
    from bark_serve.stages.plan import Plan
    from bark_serve.stages.types import Priority

    n = 3000
    synth = make_synth(pipe)
    voice = pipe.voices.resolve("v2/en_speaker_1")
    plan = Plan("r", ("x",) * n, (np.zeros(1, np.int64),) * n, (voice,), (0,) * n, GenerationParams(), 0,
                Priority.INTERACTIVE)
    assert plan.previous == (None, *range(n - 1))

    async def walk():
        loop = asyncio.get_running_loop()
        tasks = {}
        for i in range(n):
            tasks["semantic", i] = done = loop.create_future()
            done.set_result(StageOutput(np.zeros(1, np.int64), 0.0, 0.0, 0.0))  # 1 token: carries no voice
        return await synth._history(n - 1, plan, tasks, "coarse")

    assert asyncio.run(walk()) is voice
