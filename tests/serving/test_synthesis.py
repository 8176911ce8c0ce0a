"""The orchestrator's segment pipeline, on real engines behind in-process schedulers (no Ray)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bark_serve.serving.scheduler import StageScheduler
from bark_serve.serving.synthesis import Synthesizer, TextTooLarge
from bark_serve.stages.engine import EngineOptions
from bark_serve.stages.pipeline import BarkPipeline
from bark_serve.stages.types import GenerationParams, InvalidRequestError

LONG = ("The first sentence is here. The second one follows it closely! Is this the third? "
        "Yes, and a fourth closes the paragraph.")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=4))


def make_synth(pipe, **kw):
    scheds = {}

    async def call(stage, req, priority):
        if stage not in scheds:
            scheds[stage] = StageScheduler(pipe.engines[stage], batch_wait_s=0)
        return await scheds[stage].submit(req, priority)

    return Synthesizer(pipe.text, pipe.voices, pipe.spec, call, **kw)


@pytest.mark.parametrize("params", [GenerationParams.greedy(max_semantic_tokens=12, min_eos_p=None),
                                    GenerationParams(max_semantic_tokens=12, seed=42)], ids=["greedy", "seeded"])
def test_pipelined_segments_equal_the_sequential_long_form(pipe, params):
    synth = make_synth(pipe, segment_max_tokens=12)
    plan = synth.plan(LONG, "v2/en_speaker_1", params)
    assert len(plan.segments) >= 3
    chunks = asyncio.run(synth.collect(plan))
    assert [c.index for c in chunks] == list(range(len(plan.segments)))
    ref = pipe.synthesize(LONG, "v2/en_speaker_1", params, max_segment_tokens=12)
    np.testing.assert_allclose(np.concatenate([c.audio for c in chunks]), ref.audio, atol=1e-5)


def test_segments_overlap_across_stages(pipe):
    synth = make_synth(pipe, segment_max_tokens=12)
    plan = synth.plan(LONG, None, GenerationParams(max_semantic_tokens=40, seed=1))
    chunks = asyncio.run(synth.collect(plan))
    # segment 1 entered the semantic stage before segment 0 left the pipeline (codec finished)
    assert chunks[1].timings["semantic"]["started"] < chunks[0].timings["codec"]["finished"]


def test_plan_checks_input_first(pipe):
    synth = make_synth(pipe, max_text_chars=50, voice_aliases={"alloy": "v2/en_speaker_6"})
    assert synth.plan("hello", "alloy").voice.name == "v2/en_speaker_6"
    with pytest.raises(TextTooLarge):
        synth.plan("x" * 51)
    with pytest.raises(InvalidRequestError, match="empty"):
        synth.plan("   ")
    with pytest.raises(InvalidRequestError, match="unknown voice"):
        synth.plan("hello", "nobody")
