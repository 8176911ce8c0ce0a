"""One request, planned once: text or script -> lines -> speakers and voices -> segments, and the history rule.

Every path that synthesizes plans here and nowhere else: the served orchestrator
(serving/synthesis.py), batch items (through the orchestrator), ``bark-serve dataset`` rows
(offline/rows.py, offline/stage_run.py) and the in-process pipeline (stages/pipeline.py, ``synth``).
Planning is pure: it splits and tokenizes the text and reads the voices; no Ray, no engine.

The history rule (Bark's long-form recipe, per speaker): segment i continues the voice of the
nearest earlier segment *of its own speaker* whose semantic output carries a voice
(``longform.carries_voice``); when there is none it takes its speaker's own voice. A stage reads
only its part of a history prompt, so the semantic stage of segment i waits only for the history
segment's semantic tokens (``Plan.history_prompt`` with the stage).
"""

from __future__ import annotations

import functools
import secrets
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .longform import carries_voice, history_prompt, previous_of_speaker, segment_seed, split_script
from .requests import stage_request
from .text import TextPreparer
from .types import GenerationParams, InvalidRequestError, Priority, StageRequest, VoicePrompt
from .voices import VoiceLibrary

Line = tuple[object, str]  # (voice: a name, an inline prompt or None, text)


class TextTooLarge(InvalidRequestError):
    """More characters than the server accepts in one request (HTTP 413)."""


@dataclass(frozen=True)
class Plan:
    """A request, ready for the stages: its segments' text ids, who speaks each, and the voices."""

    request_id: str
    segments: tuple[str, ...]
    text_ids: tuple[np.ndarray, ...]
    voices: tuple[VoicePrompt | None, ...]  # one per speaker (a text request has one)
    speakers: tuple[int, ...]  # each segment's speaker, an index into ``voices``
    params: GenerationParams
    seed: int
    priority: Priority = Priority.INTERACTIVE
    lines: tuple[int, ...] = ()  # a script's: each segment's line (0-based); empty for a text request

    def __post_init__(self):
        n = len(self.text_ids)
        if len(self.speakers) != n or any(part and len(part) != n for part in (self.segments, self.lines)):
            raise ValueError("a plan needs one text, speaker and line per segment")
        if any(not 0 <= s < len(self.voices) for s in self.speakers):
            raise ValueError("a segment's speaker is not one of the plan's voices")

    @property
    def n_segments(self) -> int:
        return len(self.text_ids)

    @property
    def voice(self) -> VoicePrompt | None:
        """The first speaker's voice (the only one of a text request)."""
        return self.voices[0]

    @functools.cached_property  # a frozen dataclass's __dict__ still takes it: computed once per plan
    def previous(self) -> tuple[int | None, ...]:
        """Each segment's speaker's previous segment (None for the speaker's first)."""
        return tuple(previous_of_speaker(self.speakers))

    def line_of(self, i: int) -> int | None:
        return self.lines[i] if self.lines else None

    def seed_of(self, i: int) -> int:
        return segment_seed(self.seed, i)

    # -- the history rule ------------------------------------------------------------------------
    def history_candidates(self, i: int) -> Iterator[int]:
        """Segment i's possible history segments, nearest first: its own speaker's earlier segments.
        The history segment is the first of them whose semantic output ``carries_voice``."""
        previous = self.previous
        j = previous[i]
        while j is not None:  # a loop, not recursion: a script of a thousand near-silent lines walks far
            yield j
            j = previous[j]

    def history_segment(self, i: int, semantic: Callable[[int], np.ndarray]) -> int | None:
        """The segment whose output is segment i's history (None: its speaker's own voice);
        ``semantic(j)`` is segment j's semantic output."""
        return next((j for j in self.history_candidates(i) if carries_voice(semantic(j))), None)

    def history_prompt(self, i: int, stage: str, output: Callable[[str, int], np.ndarray]) -> VoicePrompt | None:
        """Segment i's history prompt as far as ``stage`` reads it; ``output(stage, j)`` is segment j's
        output of an earlier-or-same stage (only the parts ``stage`` reads are asked for)."""
        if stage == "codec":
            return None
        j = self.history_segment(i, lambda k: output("semantic", k))
        if j is None:
            return self.voices[self.speakers[i]]
        return segment_history(output, j, stage)

    def stage_request(self, stage: str, i: int, upstream: np.ndarray, history: VoicePrompt | None,
                      request_id: str | None = None) -> StageRequest:
        """Segment i's request to ``stage``: the one place a plan's segment meets ``stage_request``."""
        return stage_request(stage, request_id or f"{self.request_id}:{i}", upstream, history, self.params,
                             self.seed_of(i), segment=i)


def segment_history(output: Callable[[str, int], np.ndarray], j: int, stage: str) -> VoicePrompt:
    """Segment j's output as a history prompt, with the parts ``stage`` reads."""
    coarse = output("coarse", j) if stage in ("coarse", "fine") else None
    fine = output("fine", j) if stage == "fine" else None
    return history_prompt(output("semantic", j), coarse, fine)


def request_lines(text: str | None, voice=None, script: Sequence[Line] | None = None) -> list[Line]:
    """A text (with its voice) or a script as (voice, text) lines; raises InvalidRequestError."""
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


class Planner:
    """Plans requests against one checkpoint's tokenizer and voices, with the server's limits.

    ``segment_max_tokens`` bounds each segment (at most the model's 256), ``first_segment_max_tokens``
    the first one (its audio comes sooner), ``max_text_chars`` a request's characters (None: no bound);
    ``aliases`` map voice names (alloy, ...) to presets. Not thread-safe: a fast tokenizer must not be
    used by two threads at once (the orchestrator plans on one thread).
    """

    def __init__(self, text: TextPreparer, voices: VoiceLibrary, segment_max_tokens: int | None = None,
                 first_segment_max_tokens: int | None = None, max_text_chars: int | None = None,
                 aliases: Mapping[str, str] | None = None):
        self.text, self.voices = text, voices
        self.segment_max_tokens = min(segment_max_tokens or text.max_tokens, text.max_tokens)
        self.first_segment_max_tokens = first_segment_max_tokens
        self.max_text_chars = max_text_chars
        self.aliases = dict(aliases or {})

    def resolve_voice(self, voice, own_voices: Mapping[str, VoicePrompt] | None = None) -> VoicePrompt | None:
        """A voice as a request names it: one of the caller's own (registered, cloned) voices by name or id,
        an alias, a preset, an .npz path where allowed, or arrays."""
        if isinstance(voice, str):
            if own_voices and voice in own_voices:
                return own_voices[voice]
            voice = self.aliases.get(voice, voice)
        return self.voices.resolve(voice)

    def plan(self, text: str | None = None, voice=None, params: GenerationParams = GenerationParams(),
             priority: Priority | str = Priority.INTERACTIVE, request_id: str | None = None,
             script: Sequence[Line] | None = None, own_voices: Mapping[str, VoicePrompt] | None = None) -> Plan:
        """Check everything a request carries before any stage sees it; raises InvalidRequestError.

        ``script``: (voice, text) lines instead of ``text`` and ``voice``; their characters together
        count against ``max_text_chars``. The seed is ``params.seed``, or drawn here. ``own_voices``: the
        caller's registered voices the request names (by name or id), read by the caller from its store
        (a registered name never shadows a preset or an alias, so it is looked up first).
        """
        lines = request_lines(text, voice, script)
        chars = sum(len(t) for _, t in lines)
        if self.max_text_chars is not None and chars > self.max_text_chars:
            raise TextTooLarge(f"input has {chars} characters; this server accepts at most {self.max_text_chars}")
        speakers, segments = split_script(lines, self.text.count, self.segment_max_tokens,
                                          self.first_segment_max_tokens, self.aliases)
        voices = tuple(self.resolve_voice(v, own_voices) for v in speakers)
        ids = tuple(self.text.encode(s.text) for s in segments)
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        return Plan(request_id or uuid.uuid4().hex, tuple(s.text for s in segments), ids, voices,
                    tuple(s.speaker for s in segments), params, seed, Priority(priority),
                    tuple(s.line for s in segments) if script is not None else ())
