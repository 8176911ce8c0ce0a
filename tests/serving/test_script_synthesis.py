"""Multi-speaker scripts without Ray: the pipelined Synthesizer against the in-process pipeline, each speaker's
own voice carry-over, and different speakers' lines in flight together."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from bark_serve.serving.scheduler import StageOutput
from bark_serve.serving.synthesis import Synthesizer
from bark_serve.stages.longform import carries_voice, history_prompt, segment_seed
from bark_serve.stages.plan import TextTooLarge
from bark_serve.stages.types import GenerationParams, InvalidRequestError
from bark_serve.stages.voices import UnknownVoiceError
from tests.serving.test_synthesis import make_synth, pipe_capacity, planner_of  # noqa: F401  (pipe_capacity is a fixture)

A, B = "v2/en_speaker_1", "v2/de_speaker_3"


def carry_voice(previous, semantic, coarse, fine):
    """The next segment's history, written out here as the oracle: this output if it carries a voice."""
    return history_prompt(semantic, coarse, fine) if carries_voice(semantic) else previous
SCRIPT = [(A, "Good morning. How are you today?"), (B, "Guten Morgen, mir geht es gut."),
          (A, "That is wonderful to hear."), (B, "Danke!"), (A, "See you soon, then.")]
GREEDY = GenerationParams.greedy(max_semantic_tokens=10, min_eos_p=None)


@pytest.mark.parametrize("params", [GREEDY, GenerationParams(max_semantic_tokens=10, seed=7)], ids=["greedy", "seeded"])
def test_pipelined_script_equals_the_in_process_script(pipe, params):
    synth = make_synth(pipe, segment_max_tokens=8)
    plan = synth.planner.plan(None, None, params, script=SCRIPT)
    assert len(plan.segments) > len(SCRIPT)  # long lines were split too
    assert len(plan.voices) == 2 and plan.speakers[0] == 0 and set(plan.speakers) == {0, 1}
    text_plan = synth.planner.plan("Just a text.", A, params)

    async def both():  # the in-process schedulers belong to one event loop
        return await synth.collect(plan), await synth.collect(text_plan)

    chunks, text_chunks = asyncio.run(both())
    assert [c.index for c in chunks] == list(range(len(plan.segments)))  # script order
    lines = [c.line for c in chunks]  # each chunk names its script line: every line, in order, split ones repeated
    assert sorted(set(lines)) == list(range(len(SCRIPT))) and lines == sorted(lines)
    assert all(text in SCRIPT[n][1] for text, n in zip(plan.segments, lines))
    assert all(c.line is None for c in text_chunks)  # a text request's chunks name no line
    ref = pipe.synthesize_script(SCRIPT, params, max_segment_tokens=8)
    np.testing.assert_allclose(np.concatenate([c.audio for c in chunks]), ref.audio, atol=1e-5)


def test_a_speaker_continues_its_own_previous_line_not_the_other_speakers(pipe):
    """[A1, B1, A2]: A2's history is A1's output. References from single generations (no script code), and
    A's lines alone as one long text of A's: A's parts of the script are that text's audio."""
    lines = [(A, "The first line."), (B, "Ein zweiter Satz."), (A, "The third line.")]
    m = max(pipe.text.count(t) for _, t in lines)
    assert pipe.text.count(f"{lines[0][1]} {lines[2][1]}") > m  # so A's long text splits at the same place
    got = pipe.synthesize_script(lines, GREEDY, max_segment_tokens=m)

    def one(text, voice, i):
        return pipe.generate(text, voice, GenerationParams.greedy(max_semantic_tokens=10, min_eos_p=None,
                                                                  seed=segment_seed(0, i)))[0]

    a1 = one(lines[0][1], pipe.voices.resolve(A), 0)
    b1 = one(lines[1][1], pipe.voices.resolve(B), 1)
    own = one(lines[2][1], carry_voice(pipe.voices.resolve(A), a1.semantic, a1.coarse, a1.fine), 2)
    others = one(lines[2][1], carry_voice(pipe.voices.resolve(B), b1.semantic, b1.coarse, b1.fine), 2)
    np.testing.assert_allclose(got.audio, np.concatenate([a1.audio, b1.audio, own.audio]), atol=1e-5)
    assert own.audio.shape != others.audio.shape or not np.allclose(own.audio, others.audio, atol=1e-3)
    a_alone = pipe.synthesize(f"{lines[0][1]} {lines[2][1]}", A, GREEDY, max_segment_tokens=m).audio
    cut = len(a1.audio)
    np.testing.assert_allclose(got.audio, np.concatenate([a_alone[:cut], b1.audio, a_alone[cut:]]), atol=1e-5)


def test_the_served_script_keeps_each_speakers_history(pipe):
    lines = [(A, "The first line."), (B, "Ein zweiter Satz."), (A, "The third line.")]
    synth = make_synth(pipe, segment_max_tokens=24)
    plan = synth.planner.plan(None, None, GREEDY, script=lines)
    assert plan.previous == (None, None, 0)
    served = np.concatenate([c.audio for c in asyncio.run(synth.collect(plan))])
    np.testing.assert_allclose(served, pipe.synthesize_script(lines, GREEDY, max_segment_tokens=24).audio, atol=1e-5)


def test_aliases_and_names_of_one_preset_are_one_speaker(pipe):
    synth = make_synth(pipe, voice_aliases={"alloy": "v2/en_speaker_6"})
    plan = synth.planner.plan(None, None, GREEDY, script=[("alloy", "One."), ("v2/en_speaker_6", "Two."), (B, "Drei.")])
    assert plan.speakers == (0, 0, 1) and plan.previous == (None, 0, None)
    assert plan.voices[0].name == "v2/en_speaker_6" and plan.voices[1].name == B


@pytest.mark.parametrize("script,error,match", [
    ([], InvalidRequestError, "no lines"),
    ([(A, "fine"), (B, "   ")], InvalidRequestError, "script line 1: text is empty"),
    ([(A, "fine"), ("nobody", "hi")], UnknownVoiceError, "unknown voice 'nobody'"),
    ([(A, "x" * 30), (B, "y" * 30)], TextTooLarge, "60 characters"),
    ([(A, 5)], InvalidRequestError, "line 0: expected a"),
    (["hello"], InvalidRequestError, "line 0: expected a"),
])
def test_plan_checks_every_line_first(pipe, script, error, match):
    synth = make_synth(pipe, max_text_chars=50)
    with pytest.raises(error, match=match):
        synth.planner.plan(None, None, GREEDY, script=script)
    with pytest.raises(InvalidRequestError, match="send no text or voice"):
        synth.planner.plan("hello", None, GREEDY, script=[(A, "hi")])


class SlowSemantic:
    """A ``call`` with fixed outputs (5 semantic tokens: every segment carries its voice) that records how
    many semantic calls run at once."""

    def __init__(self):
        self.active = self.peak = 0

    async def call(self, stage, req, priority):
        if stage == "semantic":
            self.active += 1
            self.peak = max(self.peak, self.active)
            await asyncio.sleep(0.05)
            self.active -= 1
            out = np.arange(5)
        elif stage == "coarse":
            out = np.zeros((2, 15), np.int64)
        elif stage == "fine":
            out = np.zeros((8, 15), np.int64)
        else:
            out = np.zeros(15 * 320, np.float32)
        now = time.time()
        return StageOutput(out, now, now, now)


def test_different_speakers_lines_are_in_flight_together_one_speakers_are_not(pipe):
    def peak(max_tokens, **request):
        stages = SlowSemantic()
        synth = Synthesizer(planner_of(pipe, segment_max_tokens=max_tokens), pipe.spec, stages.call, 4)
        chunks = asyncio.run(synth.collect(synth.planner.plan(params=GREEDY, **request)))
        assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) == len(lines)
        return stages.peak

    lines = [(f"v2/en_speaker_{n}", f"Here is line number {n}.") for n in (0, 1, 2, 3, 6, 9)]
    m = max(pipe.text.count(t) for _, t in lines)
    one_speaker = " ".join(t for _, t in lines)
    assert peak(text=one_speaker, voice=A, script=None, max_tokens=m) == 1  # each waits for its predecessor
    assert peak(text=None, script=lines, max_tokens=m) == 4  # six first lines at once, bounded by the window
