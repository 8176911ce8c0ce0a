"""One stage over one batch of rows: continuous batching inside a ``map_batches`` call.

Every pending row's segments go through the stage's engine (``stages/``: the same engines and the
same ``stage_request`` builder as the served app and the in-process pipeline). Bark's history rule
(stages/longform.py) makes segment i+1 of a row need, in stage s, only stage <= s outputs of
segment i: so within one stage a row's segments run in order (segment i+1 is admitted when
segment i finishes here), while segments of different rows batch together. The codec needs no
history: all segments of all rows are admitted at once, as far as the engine holds them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from bark_serve.stages.constants import STAGES
from bark_serve.stages.engine import StageEngine
from bark_serve.stages.longform import carries_voice, history_prompt, segment_seed
from bark_serve.stages.requests import stage_request
from bark_serve.stages.types import GenerationParams, InvalidRequestError, VoicePrompt

from .rows import Status, failed_row, pack_arrays, row_params, unpack_arrays, unpack_voice


@dataclass
class RowWork:
    """One pending row inside one stage: what it reads, what it has produced here so far."""

    index: int
    upstream: list[np.ndarray]  # the previous stage's output per segment (text ids for semantic)
    earlier: dict[str, list[np.ndarray]]  # outputs of the stages before this one, per segment
    voice: VoicePrompt | None
    params: GenerationParams
    seed: int
    outputs: list[np.ndarray | None] = field(default_factory=list)


def history(stage: str, i: int, work: RowWork) -> VoicePrompt | None:
    """Segment i's history prompt in ``stage``, as far as that stage reads it (Synthesizer._history's rule)."""
    parts = {**work.earlier, stage: work.outputs}
    while i > 0 and not carries_voice(parts["semantic"][i - 1]):  # a loop: many near-silent segments walk far
        i -= 1
    if i == 0:
        return work.voice
    sem = parts["semantic"][i - 1]
    coarse = parts["coarse"][i - 1] if stage in ("coarse", "fine") else None
    fine = parts["fine"][i - 1] if stage == "fine" else None
    return history_prompt(sem, coarse, fine)


def _work(stage: str, index: int, row: dict) -> RowWork:
    before = STAGES[:STAGES.index(stage)]
    # what this stage reads: the previous stage's output, and for the history rule the earlier ones (codec: none)
    earlier = {s: unpack_arrays(row[s]) for s in (before if stage != "codec" else before[-1:])}
    upstream = earlier[before[-1]] if before else unpack_arrays(row["text_ids"])
    seed = int(row["seed"])
    return RowWork(index, upstream, earlier, unpack_voice(row["voice_prompt"]), row_params(row["options"], seed),
                   seed, [None] * len(upstream))


def run_stage(engine: StageEngine, stage: str, rows: list[dict]) -> float:
    """Run ``stage`` for every pending row of ``rows`` (updated in place); returns the engine's busy seconds."""
    works: dict[int, RowWork] = {}
    queue: deque[tuple[int, int]] = deque()
    for k, row in enumerate(rows):
        if row["status"] != Status.PENDING.value:
            continue
        try:
            works[k] = work = _work(stage, k, row)
        except InvalidRequestError as exc:
            rows[k] = failed_row(row, str(exc))
            continue
        queue.extend((k, i) for i in (range(len(work.upstream)) if stage == "codec" else range(1)))
    busy = 0.0
    failed: set[int] = set()

    def fail(k: int, error) -> None:
        failed.add(k)
        rows[k] = failed_row(rows[k], f"{stage}: {error}")

    while queue or engine.num_active:
        while queue and engine.free > 0:
            k, i = queue.popleft()
            if k in failed:
                continue
            w = works[k]
            req = stage_request(stage, f"{k}:{i}", w.upstream[i], history(stage, i, w) if stage != "codec" else None,
                                w.params, segment_seed(w.seed, i))
            try:
                engine.admit(req)
            except InvalidRequestError as exc:
                fail(k, exc)
        if not engine.num_active:
            continue
        t0 = time.perf_counter()
        results = engine.step()
        busy += time.perf_counter() - t0
        for res in results:
            k, i = (int(x) for x in res.request_id.split(":"))
            if k in failed:
                continue
            if not res.ok:
                fail(k, res.error)
                continue
            works[k].outputs[i] = res.output
            if stage != "codec" and i + 1 < len(works[k].upstream):
                queue.append((k, i + 1))
    for k, w in works.items():
        if k not in failed:
            _finish(stage, rows[k], w.outputs)
    return busy


def _finish(stage: str, row: dict, outputs: list[np.ndarray]) -> None:
    if stage == "codec":
        row["audio"] = list(outputs)  # per segment: the codec worker joins them (stages/dsp.py) and writes the file
        return
    row[stage] = pack_arrays(outputs)
    if stage == "semantic":
        row["semantic_tokens"] = int(sum(len(o) for o in outputs))
