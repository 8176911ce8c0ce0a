"""CUDA graphs for the stages' fixed-shape steps: a graph per (batch bucket, sample mode).

How this works (vLLM's and SGLang's scheme, in small): a step function ``fn(bucket, mode)`` runs one
decode step (or one fine pass) for the first ``bucket`` rows of the engine's static buffers and
returns its output tensor; it neither allocates persistent state nor synchronises with the host.
At start, for every bucket (largest first) and mode, it runs once eagerly (so lazy cuBLAS and
kernel set-up happen outside any capture) and is then captured into a graph that shares one
memory pool with the others. A step with ``n`` rows replays the graph of the smallest bucket that
holds them; the rows past ``n`` are padding the engine ignores. More rows than the largest bucket
run eagerly, and so does everything on CPU, where the same static path runs without capture (the
tests' way of checking it).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from .sampling import SampleMode

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
StepFn = Callable[[int, SampleMode], torch.Tensor]


def buckets_for(capacity: int, sizes: Sequence[int] = ()) -> tuple[int, ...]:
    """The batch sizes to capture: ``sizes`` (or the defaults) up to ``capacity``, and ``capacity`` itself."""
    chosen = {b for b in (sizes or DEFAULT_BUCKETS) if 1 <= b <= capacity}
    return tuple(sorted(chosen | {max(capacity, 1)}))


def use_graphs(setting: str, device: torch.device) -> bool:
    """``cuda_graphs``: on, off, or auto (on for CUDA; off on CPU, where nothing is launched per kernel)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs must be auto, on or off, got {setting!r}")
    return setting == "on" or (setting == "auto" and device.type == "cuda")


class StepGraphs:
    """Fixed-shape steps of one engine, captured per (bucket, mode) on CUDA, run eagerly elsewhere."""

    def __init__(self, fn: StepFn, buckets: Sequence[int], device: torch.device):
        self.fn, self.buckets, self.device = fn, tuple(sorted(buckets)), device
        self.graphs: dict[tuple[int, SampleMode], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0
        self.graph_bytes = 0
        self.error: str | None = None  # why capture failed (the steps then run eagerly)

    def bucket(self, n: int) -> int | None:
        """The smallest bucket holding ``n`` rows; None past the largest (run eagerly)."""
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else None

    def capture(self, modes: Iterable[SampleMode] = tuple(SampleMode)) -> None:
        """Warm up and capture every (bucket, mode) graph, largest bucket first, into one pool (CUDA only)."""
        if self.device.type != "cuda":
            return
        try:
            self._capture(tuple(modes))
        except Exception as exc:  # a replica that cannot capture still serves, eagerly; say so loudly
            self.graphs.clear()
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture failed, steps run eagerly: %s", self.error, exc_info=True)

    def _capture(self, modes: tuple[SampleMode, ...]) -> None:
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                for mode in modes:
                    self.fn(b, mode)  # eager warm-up: lazy library set-up stays out of the graph
                    stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        out = self.fn(b, mode)
                    self.graphs[(b, mode)] = (graph, out)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        self.graph_bytes = torch.cuda.memory_reserved(self.device) - before
        log.info("captured %d CUDA graphs (buckets %s) in %.2f s, %.1f MiB", len(self.graphs), list(self.buckets),
                 self.capture_s, self.graph_bytes / 2**20)

    def run(self, n: int, mode: SampleMode) -> tuple[torch.Tensor, bool]:
        """Step the first ``n`` rows (padded to their bucket). -> (output of >= n rows, replayed?)"""
        b = self.bucket(n)
        if b is not None and (b, mode) in self.graphs:
            graph, out = self.graphs[(b, mode)]
            graph.replay()
            return out, True
        return self.fn(b if b is not None else n, mode), False

    def stats(self) -> dict:
        out = {"cuda_graphs": len(self.graphs), "buckets": list(self.buckets),
               "capture_s": round(self.capture_s, 4), "graph_bytes": self.graph_bytes}
        if self.error:
            out["capture_error"] = self.error
        return out
