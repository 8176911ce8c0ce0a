"""One stage over one batch of rows: continuous batching inside a ``map_batches`` call.

Every pending row's segments go through the stage's engine (``stages/``: the same engines, and the
same plan and history rule, ``stages/plan.py``, as the served app and the in-process pipeline). The
history rule makes segment i of a row need, in stage s, only stage <= s outputs of its speaker's
earlier segments: so within one stage a row's segments run in order (segment i+1 is admitted when
segment i finishes here), while segments of different rows batch together. The codec needs no
history: all segments of all rows are admitted at once, as far as the engine holds them.

Admission order: the segment whose row has the most steps left in this stage first (its own and its
later segments', ``StageEngine.expected_steps``), so that the longest chains start at once and the
batch drains on short rows instead of finishing on one long row running alone.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bark_serve.stages.constants import STAGES
from bark_serve.stages.engine import StageEngine
from bark_serve.stages.plan import Plan
from bark_serve.stages.types import InvalidRequestError, VoicePrompt

from .rows import Status, failed_row, pack_arrays, row_plan, unpack_arrays


@dataclass
class RowWork:
    """One pending row inside one stage: its plan, what it reads, what it has produced here so far."""

    index: int
    plan: Plan
    upstream: list[np.ndarray]  # the previous stage's output per segment (text ids for semantic)
    earlier: dict[str, list[np.ndarray]]  # outputs of the stages before this one, per segment
    outputs: list[np.ndarray | None] = field(default_factory=list)

    def history(self, stage: str, i: int) -> VoicePrompt | None:
        """Segment i's history prompt in ``stage`` (the plan's rule), from the outputs known so far."""
        parts: dict[str, Sequence[np.ndarray | None]] = {**self.earlier, stage: self.outputs}

        def output(s: str, j: int) -> np.ndarray:
            out = parts[s][j]
            assert out is not None, f"segment {j}'s {s} output read before it was made"  # the rule reads only j < i
            return out

        return self.plan.history_prompt(i, stage, output)


def _work(stage: str, index: int, row: dict) -> RowWork:
    before = STAGES[:STAGES.index(stage)]
    # what this stage reads: the previous stage's output, and for the history rule the earlier ones (codec: none)
    earlier = {s: unpack_arrays(row[s]) for s in (before if stage != "codec" else before[-1:])}
    plan = row_plan(row)
    upstream = earlier[before[-1]] if before else list(plan.text_ids)
    return RowWork(index, plan, upstream, earlier, [None] * len(upstream))


def run_stage(engine: StageEngine, stage: str, rows: list[dict], cores=None) -> float:
    """Run ``stage`` for every pending row of ``rows`` (updated in place); returns the engine's busy seconds.
    ``cores``: a cluster.cores.CoreBudget (``torch_threads: shared``) each step leases its cores from."""
    works: dict[int, RowWork] = {}
    left: dict[int, list[int]] = {}  # per row: the steps its segments i.. have left in this stage
    queue: list[tuple[int, int, int]] = []  # a heap of (-steps left, row, segment): the longest chain first

    def enqueue(k: int, i: int) -> None:
        heapq.heappush(queue, (-left[k][i], k, i))

    for k, row in enumerate(rows):
        if row["status"] != Status.PENDING.value:
            continue
        try:
            works[k] = work = _work(stage, k, row)
        except InvalidRequestError as exc:
            rows[k] = failed_row(row, str(exc))
            continue
        left[k] = _steps_left(engine, stage, work)
        for i in (range(len(work.upstream)) if stage == "codec" else range(1)):
            enqueue(k, i)
    busy = 0.0
    failed: set[int] = set()
    segment_of: dict[str, tuple[int, int]] = {}  # engine request id -> (row, segment)

    def fail(k: int, error) -> None:
        failed.add(k)
        rows[k] = failed_row(rows[k], f"{stage}: {error}")

    while queue or engine.num_active:
        while queue and engine.free > 0:
            _, k, i = heapq.heappop(queue)
            if k in failed:
                continue
            w = works[k]
            req = w.plan.stage_request(stage, i, w.upstream[i], w.history(stage, i), request_id=f"{k}:{i}")
            segment_of[req.request_id] = (k, i)
            try:
                engine.admit(req)
            except InvalidRequestError as exc:
                fail(k, exc)
        if not engine.num_active:
            continue
        t0 = time.perf_counter()
        if cores is None:
            results = engine.step()
        else:
            with cores.lease():
                results = engine.step()
        busy += time.perf_counter() - t0
        for res in results:
            k, i = segment_of.pop(res.request_id)
            if k in failed:
                continue
            if not res.ok:
                fail(k, res.error)
                continue
            works[k].outputs[i] = res.output
            if stage != "codec" and i + 1 < len(works[k].upstream):
                enqueue(k, i + 1)
    if cores is not None:
        cores.idle()
    for k, w in works.items():
        if k not in failed:
            _finish(stage, rows[k], w.outputs)
    return busy


def _steps_left(engine: StageEngine, stage: str, work: RowWork) -> list[int]:
    """Per segment i of a row: the steps segments i.. will take in ``stage`` (the codec's segments are
    independent: each its own). Estimated without the history prompt, which the lengths do not depend on."""
    own = [engine.steps_estimate(work.plan.stage_request(stage, i, up, None)) for i, up in enumerate(work.upstream)]
    if stage == "codec":
        return own
    return list(itertools.accumulate(reversed(own)))[::-1]


def _finish(stage: str, row: dict, segments: list[np.ndarray | None]) -> None:
    outputs = [o for o in segments if o is not None]
    assert len(outputs) == len(segments), f"{stage}: a row not failed has a segment without output"
    if stage == "codec":
        row["audio"] = list(outputs)  # per segment: the codec worker joins them (stages/audio.py) and writes the file
        return
    row[stage] = pack_arrays(outputs)
    if stage == "semantic":
        row["semantic_tokens"] = int(sum(len(o) for o in outputs))
