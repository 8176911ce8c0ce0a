"""(3) bark-serve's stage engines in one process, each stage batching up to ``batch`` requests."""

from __future__ import annotations

import math
import time

from bark_serve.stages.engine import EngineOptions
from bark_serve.stages.pipeline import BarkPipeline
from bark_serve.stages.types import GenerationParams

from .hf_runs import segments_of
from .workload import Run, Workload, counted_flops, roofline, stage_efficiency

ENGINE_ORDERS = ("longest", "given")


def engines(model_dir: str, work: Workload, n: int, batch: int, dtype: str, peaks: dict, device: str = "cpu",
            cuda_graphs: str = "auto", order: str = "longest") -> Run:
    """``cuda_graphs`` other than auto is named in the run's name (engines_batch16_bfloat16_graphs-on), and so
    is an admission ``order`` other than longest first (``_given``: in workload order, StageEngine.run)."""
    if order not in ENGINE_ORDERS:
        raise ValueError(f"order must be one of {', '.join(ENGINE_ORDERS)}, got {order!r}")
    opts = EngineOptions(device=device, capacity=batch, dtype=dtype, cuda_graphs=cuda_graphs)
    pipe = BarkPipeline.from_pretrained(model_dir, opts)
    items = segments_of(work, n)  # every segment its own generation, as transformers' baselines do
    params = [GenerationParams.greedy(max_semantic_tokens=cap, min_eos_p=None) for _, _, cap in items]
    t0 = time.perf_counter()
    gens = pipe.generate([t for t, _, _ in items], [v for _, v, _ in items], params,
                         longest_first=order == "longest")
    wall = time.perf_counter() - t0
    suffix = ("" if cuda_graphs == "auto" else f"_graphs-{cuda_graphs}") + ("" if order == "longest" else f"_{order}")
    run = Run(f"engines_batch{batch}_{dtype}{suffix}", wall_s=wall,
              extra={"dtype": dtype, "batch": batch, "cuda_graphs": cuda_graphs, "order": order})
    run.latencies = [wall] * n  # stage by stage: every request finishes with the last one
    run.ttfa = [wall] * n
    run.audio_s = sum(len(g.audio) for g in gens) / pipe.spec.sample_rate
    totals = {s: dict(e.totals) for s, e in pipe.engines.items()}
    run.extra["stages"] = stage_efficiency(totals, peaks, {s: dtype for s in totals}, wall)
    run.extra["roofline"] = roofline(counted_flops(totals), run.audio_s, wall, peaks.get(dtype, 0.0))
    run.extra["weights_mb"] = {s: round(e.weight_bytes() / 2**20, 1) for s, e in pipe.engines.items()}
    run.extra["decode_only_ms"] = {s: round(1e3 * t["decode_only_s"] / t["decode_only_steps"], 4)
                                   for s, t in totals.items() if t.get("decode_only_steps")}
    run.extra["graphs"] = {s: g for s, e in pipe.engines.items()
                           if (g := getattr(e, "graph_stats", lambda: None)()) is not None}
    run.extra["steps_bound"] = steps_bound(totals, gens, batch)
    return run


def steps_bound(totals: dict[str, dict], gens, batch: int) -> dict:
    """Per causal stage: the steps it ran against the fewest any admission order could (the longest
    request's own steps, or every row-step at a full batch, whichever is more). A run at its bound is
    limited by its longest request (the drain), not by how the engine batches."""
    rows = {"semantic": [len(g.semantic) for g in gens], "coarse": [g.coarse.size for g in gens]}
    out = {}
    for stage, lengths in rows.items():
        if lengths and stage in totals:
            bound = max(max(lengths), math.ceil(sum(lengths) / batch))
            out[stage] = {"steps": int(totals[stage].get("steps", 0)), "longest_request": max(lengths),
                          "full_batch": math.ceil(sum(lengths) / batch), "bound": bound}
    return out
