"""All four stages in one process: the CLI's ``synth``, the parity tests and the in-process benchmark.

Each stage runs the whole list of requests through its engine, batching up to
its capacity, before the next stage starts. The served app (serving/) runs
the same engines as four deployments that overlap instead.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .coarse import CoarseEngine
from .codec import CodecEngine
from .constants import STAGES, BarkSpec
from .engine import EngineOptions, StageEngine
from .fine import FineEngine
from .plan import Plan, Planner
from .requests import stage_request
from .semantic import SemanticEngine
from .text import TextPreparer
from .types import EngineResult, GenerationParams, VoicePrompt
from .voices import VoiceLibrary
from .weights import Checkpoint

ENGINES: dict[str, type[SemanticEngine | CoarseEngine | FineEngine | CodecEngine]] = {
    "semantic": SemanticEngine, "coarse": CoarseEngine, "fine": FineEngine, "codec": CodecEngine}


@dataclass
class Generation:
    """Everything one text produced: the tokens of every stage and the waveform."""

    request_id: str
    semantic: np.ndarray  # (T_s,)
    coarse: np.ndarray  # (2, T)
    fine: np.ndarray  # (8, T)
    audio: np.ndarray  # (T * 320,) float32 at sample_rate
    sample_rate: int
    seed: int
    segment_samples: tuple[int, ...] = ()  # long form: each segment's share of ``audio``, in order

    def as_voice(self, name: str | None = None) -> VoicePrompt:
        """This generation as a history prompt (Bark's save-as-prompt)."""
        return VoicePrompt(self.semantic.astype(np.int64), self.coarse.astype(np.int64),
                           self.fine.astype(np.int64), name=name)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, result: EngineResult):
        super().__init__(f"{stage} stage failed for {result.request_id}: {result.error}")
        self.stage, self.result = stage, result


def load_engines(ckpt: Checkpoint, options: EngineOptions | dict[str, EngineOptions],
                 stages: Sequence[str] = tuple(ENGINES)) -> dict[str, StageEngine]:
    """Load the requested stage engines; each reads only its own sub-model."""
    per_stage = options if isinstance(options, dict) else {s: options for s in stages}
    return {s: ENGINES[s].from_checkpoint(ckpt, per_stage[s]) for s in stages}


class BarkPipeline:
    def __init__(self, text: TextPreparer, voices: VoiceLibrary, engines: dict[str, StageEngine], spec: BarkSpec):
        self.text, self.voices, self.engines, self.spec = text, voices, engines, spec

    @classmethod
    def from_pretrained(cls, model: str, options: EngineOptions | dict[str, EngineOptions] = EngineOptions(),
                        preset_dirs: Sequence[str] = (), allow_voice_paths: bool = True) -> "BarkPipeline":
        ckpt = Checkpoint.open(model)
        voices = VoiceLibrary(ckpt.spec, ckpt, list(preset_dirs), allow_paths=allow_voice_paths)
        return cls(TextPreparer.from_checkpoint(ckpt), voices, load_engines(ckpt, options), ckpt.spec)

    def generate(self, texts: str | Sequence[str], voices=None,
                 params: GenerationParams | Sequence[GenerationParams] = GenerationParams(),
                 on_step=None, longest_first: bool = True) -> list[Generation]:
        """Synthesize each text (one generation each: split long text first). Voices/params: one or one per text.

        ``on_step(stage_name)`` is called after every engine step (progress display). Each stage admits
        the longest requests first unless ``longest_first`` is False (``StageEngine.run``).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = len(texts)
        voices = list(voices) if isinstance(voices, (list, tuple)) else [voices] * n
        params = [params] * n if isinstance(params, GenerationParams) else list(params)
        if len(voices) != n or len(params) != n:
            raise ValueError("voices and params must be one value or one per text")
        prompts = [self.voices.resolve(v) for v in voices]
        seeds = [p.seed if p.seed is not None else secrets.randbits(62) for p in params]
        ids = [f"r{i}" for i in range(n)]
        outputs: list[list[np.ndarray]] = [[self.text.encode(t) for t in texts]]
        for stage in STAGES:
            outputs.append(self._run(stage, on_step, [
                stage_request(stage, ids[i], outputs[-1][i], prompts[i], params[i], seeds[i]) for i in range(n)],
                longest_first))
        _, sem, coarse, fine, audio = outputs
        return [Generation(ids[i], sem[i], coarse[i], fine[i], audio[i], self.spec.sample_rate, seeds[i])
                for i in range(n)]

    def _run(self, stage: str, on_step, requests: list, longest_first: bool = True) -> list[np.ndarray]:
        outputs = []
        step = None if on_step is None else (lambda: on_step(stage))
        for res in self.engines[stage].run(requests, step, longest_first):
            if not res.ok:
                raise StageFailed(stage, res)
            assert res.output is not None, "an engine's ok result carries its output"
            outputs.append(res.output)
        return outputs

    def planner(self, max_segment_tokens: int | None = None) -> Planner:
        """This pipeline's planner (stages/plan.py): segments of ``max_segment_tokens`` (default: the model's)."""
        return Planner(self.text, self.voices, max_segment_tokens)

    def synthesize(self, text: str, voice=None, params: GenerationParams = GenerationParams(),
                   max_segment_tokens: int | None = None, on_segment=None, on_step=None,
                   own_voices: Mapping[str, VoicePrompt] | None = None) -> Generation:
        """Any length of text: split into segments, each continuing the previous one's voice.

        The tokens of all segments are concatenated (so ``as_voice`` saves the whole generation)
        and so is the audio. Progress: ``on_segment(i, n)`` is called before the first
        segment (i=0) and after each one, ``on_step(stage_name)`` after every engine step.
        ``own_voices``: registered voices by name (Planner.plan's).
        """
        plan = self.planner(max_segment_tokens).plan(text, voice, params, own_voices=own_voices)
        return self.run_plan(plan, on_segment, on_step)

    def synthesize_script(self, lines: Sequence[tuple[object, str]], params: GenerationParams = GenerationParams(),
                          max_segment_tokens: int | None = None, on_segment=None, on_step=None,
                          own_voices: Mapping[str, VoicePrompt] | None = None) -> Generation:
        """A multi-speaker script of (voice, text) lines, in order. Each line is split like a text; each
        speaker (lines with an equal voice) continues its own previous segment's voice, not another's."""
        plan = self.planner(max_segment_tokens).plan(None, None, params, script=list(lines), own_voices=own_voices)
        return self.run_plan(plan, on_segment, on_step)

    def run_plan(self, plan: Plan, on_segment=None, on_step=None) -> Generation:
        """A plan's segments one after the other through all four stages (segment i gets ``plan.seed_of(i)``
        and the plan's history rule, as in the served pipeline)."""
        outputs: dict[str, list[np.ndarray]] = {s: [] for s in STAGES}
        if on_segment is not None:
            on_segment(0, plan.n_segments)
        for i in range(plan.n_segments):
            history = plan.history_prompt(i, "fine", lambda s, j: outputs[s][j])  # every stage reads its part
            upstream = plan.text_ids[i]
            for stage in STAGES:
                upstream = self._run(stage, on_step, [plan.stage_request(stage, i, upstream, history)])[0]
                outputs[stage].append(upstream)
            if on_segment is not None:
                on_segment(i + 1, plan.n_segments)
        return Generation(plan.request_id, np.concatenate(outputs["semantic"]),
                          np.concatenate(outputs["coarse"], axis=1), np.concatenate(outputs["fine"], axis=1),
                          np.concatenate(outputs["codec"]), self.spec.sample_rate, plan.seed,
                          tuple(len(a) for a in outputs["codec"]))
