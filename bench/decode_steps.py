"""Per-step cost of each stage's decode (semantic, coarse) and pass (fine): wall time against GPU time.

For each stage, batch size and ``cuda_graphs`` setting, one engine holds ``batch`` synthetic
requests (random tokens, greedy, long enough that no request ends while measured) and steps them:
after the prefill and a warm-up, ``steps`` decode-only steps (no prefill or window re-prefill rows
in them) are timed on the wall clock, then as many again run under the torch profiler, whose
device events give the kernel time per step (copies and memsets apart, as ``copy_ms``).
``wall_ms / gpu_ms`` is how far the host keeps the chip waiting: 1.0 means the GPU never idles between
kernels. On CPU ``gpu_ms`` is None.
``ops_per_step`` counts the ATen ops one more decode-only step dispatches from the host (about a kernel
launch each on CUDA; a replayed graph dispatches none of them): a small model's GPU decode step is bound
by its kernel count, and this number is the same on any machine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from bark_serve.stages.coarse import CoarseEngine
from bark_serve.stages.engine import EngineOptions, StageEngine
from bark_serve.stages.fine import FineEngine
from bark_serve.stages.graphs import dispatched_ops
from bark_serve.stages.pipeline import ENGINES
from bark_serve.stages.semantic import SemanticEngine
from bark_serve.stages.types import CoarseRequest, FineRequest, SemanticRequest
from bark_serve.stages.weights import Checkpoint

STAGES = ("semantic", "coarse", "fine")


def _requests(n: int, engine: SemanticEngine | CoarseEngine | FineEngine, rng: np.random.Generator) -> list:
    spec = engine.spec
    if isinstance(engine, SemanticEngine):
        ids = [rng.integers(0, min(1000, engine.text_vocab), 40) for _ in range(n)]
        return [SemanticRequest(f"s{i}", ids[i], max_new_tokens=spec.max_semantic_tokens, seed=i) for i in range(n)]
    if isinstance(engine, CoarseEngine):
        return [CoarseRequest(f"c{i}", rng.integers(0, spec.semantic_vocab_size, spec.max_semantic_tokens), seed=i)
                for i in range(n)]
    return [FineRequest(f"f{i}", rng.integers(0, spec.codebook_size, (2, 6000)), seed=i) for i in range(n)]


def _decode_only_steps(engine: StageEngine, k: int, limit: int = 400) -> tuple[float, int]:
    """Step until ``k`` decode-only steps ran; their wall seconds (steps with a prefill are not counted) and
    how many of them replayed a CUDA graph."""
    total, counted, replayed = 0.0, 0, 0
    for _ in range(limit):
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if engine.last_step.get("decode_only_steps", 1.0):
            total, counted = total + dt, counted + 1
            replayed += int(engine.last_step.get("graph_steps", 0.0) > 0)
            if counted == k:
                return total, replayed
    raise RuntimeError(f"{engine.name}: fewer than {k} decode-only steps in {limit}")


def _ops_per_step(engine: StageEngine, limit: int = 400) -> dict[str, int]:
    """The ATen ops one decode-only step dispatches from the host, by name (``dispatched_ops``): about one
    kernel launch each on CUDA. A replayed CUDA graph counts as none of its kernels (the profiler's
    ``device_events_per_step`` counts those); on CPU and on the eager path it is the step's whole op count."""
    for _ in range(limit):
        ops = dispatched_ops(engine.step)
        if engine.last_step.get("decode_only_steps", 1.0):
            return dict(ops.most_common())
    raise RuntimeError(f"{engine.name}: no decode-only step in {limit}")


def _gpu_seconds(engine: StageEngine, k: int) -> tuple[float | None, int, float | None]:
    """Kernel time on the device per decode-only step, from the torch profiler, the number of device events
    it saw per step (kernels inside a replayed graph are among them) and the copy/memset time per step."""
    if engine.device.type != "cuda":
        return None, 0, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # a window re-prefill inside the profiled steps: profile again
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            clean = True
            for _ in range(k):
                engine.step()
                clean = clean and bool(engine.last_step.get("decode_only_steps", 1.0))
            torch.cuda.synchronize()
        if clean:
            events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
            copies = [e for e in events if _is_copy(e.name)]
            kernel_us = sum(e.time_range.elapsed_us() for e in events if not _is_copy(e.name))
            copy_us = sum(e.time_range.elapsed_us() for e in copies)
            return (kernel_us / 1e6 / k if events else None), len(events) // k, copy_us / 1e6 / k
    return None, 0, None


def _is_copy(name: str) -> bool:
    """A device event that moves or fills memory (the profiler's "Memcpy HtoD ...", "Memset ...") rather
    than a kernel."""
    return name.lower().startswith(("memcpy", "memset"))


def measure(model_dir: str, batches: Sequence[int], graph_settings: Sequence[str], dtype: str, device: str,
            steps: int = 20, stages: Sequence[str] = STAGES, log=print, on_row=None) -> list[dict]:
    """One record per (stage, cuda_graphs, batch): wall_ms, gpu_ms and their ratio per decode-only step.

    ``cuda_graphs`` is true only when every measured step replayed a graph (``replayed_steps`` says how many
    did); ``capture_error`` names a capture that failed. A stage whose engine or steps fail gets one record
    with its ``error`` and the others are still measured. ``on_row`` gets each record as it is made."""
    ckpt = Checkpoint.open(model_dir)
    rng = np.random.default_rng(0)
    out: list[dict] = []

    def emit(row: dict) -> None:
        out.append(row)
        if on_row is not None:
            on_row(row)

    for graphs in graph_settings:
        for stage in stages:
            try:
                _measure_stage(ckpt, stage, batches, graphs, dtype, device, steps, rng, log, emit)
            except Exception as exc:  # noqa: BLE001 - one stage's failure must not lose the others' rows
                log(f"decode steps: {stage} with cuda_graphs {graphs} failed: {type(exc).__name__}: {exc}")
                emit({"stage": stage, "setting": graphs, "error": f"{type(exc).__name__}: {exc}"})
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return out


def _measure_stage(ckpt: Checkpoint, stage: str, batches: Sequence[int], graphs: str, dtype: str, device: str,
                   steps: int, rng: np.random.Generator, log, emit) -> None:
    opts = EngineOptions(device=device, dtype=dtype, capacity=max(batches), cuda_graphs=graphs)
    engine = ENGINES[stage].from_checkpoint(ckpt, opts)
    assert isinstance(engine, (SemanticEngine, CoarseEngine, FineEngine)), f"no decode steps in {stage}"
    stats = engine.graph_stats() if hasattr(engine, "graph_stats") else None
    for b in batches:
        reqs = _requests(b, engine, rng)
        for r in reqs:
            engine.admit(r)
        _decode_only_steps(engine, 3)  # prefill, then warm-up
        wall_s, replayed = _decode_only_steps(engine, steps)
        wall = wall_s / steps
        gpu, kernels, copy = _gpu_seconds(engine, steps)
        ops = _ops_per_step(engine)
        for r in reqs:
            engine.cancel(r.request_id)
        row = {"stage": stage, "batch": b, "cuda_graphs": replayed == steps, "replayed_steps": replayed,
               "setting": graphs, "steps": steps, "wall_ms": round(wall * 1e3, 4),
               "gpu_ms": round(gpu * 1e3, 4) if gpu is not None else None,
               "copy_ms": round(copy * 1e3, 4) if copy is not None else None,
               "wall_over_gpu": round(wall / gpu, 3) if gpu else None, "device_events_per_step": kernels,
               "ops_per_step": sum(ops.values()), "ops": ops}
        if stats is not None:
            row["capture_s"], row["graph_mib"] = stats["capture_s"], round(stats["graph_bytes"] / 2**20, 1)
            if stats.get("capture_error"):
                row["capture_error"] = stats["capture_error"]
        log(f"decode step { {k: v for k, v in row.items() if k != 'ops'} }")
        emit(row)
