"""CUDA graphs for the stages' fixed-shape steps: one graph per (shape, sample mode).

How this works (vLLM's and SGLang's scheme, in small): a step function ``fn(shape, mode)`` runs
one step (a decode over ``rows`` rows attending to ``span`` cache positions, a prefill of ``rows``
prompts padded to ``length``, a fine pass over ``rows`` windows) on the engine's static buffers
and returns its output tensor; it neither allocates persistent state nor synchronises with the
host. At start, for every shape (largest first) and mode, it runs once eagerly (so lazy cuBLAS and
kernel set-up happen outside any capture) and is then captured into a graph that shares one memory
pool with the others. A step replays the graph of the smallest shape that holds it (``fit``); the
rows and positions past its own are padding the engine ignores. A step larger than every shape runs
eagerly, and so does everything on CPU, where the same fixed-shape path runs without capture (the
tests' way of checking it).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .sampling import SampleMode

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SPAN_STEP = 128  # decode spans and prefill lengths are captured in multiples of this (and the maximum)
Shape = tuple[int, ...]
StepFn = Callable[[Shape, SampleMode], torch.Tensor]


def buckets_for(capacity: int, sizes: Sequence[int] = ()) -> tuple[int, ...]:
    """The batch sizes to capture: ``sizes`` (or the defaults) up to ``capacity``, and ``capacity`` itself."""
    chosen = {b for b in (sizes or DEFAULT_BUCKETS) if 1 <= b <= capacity}
    return tuple(sorted(chosen | {max(capacity, 1)}))


def spans_for(lo: int, hi: int, step: int = SPAN_STEP) -> tuple[int, ...]:
    """Lengths to capture for values in [lo, hi]: the multiples of ``step`` from the first >= lo, and hi."""
    first = -(-max(lo, 1) // step) * step
    return tuple(sorted({*range(first, hi, step), hi}))


def fit(sizes: Sequence[int], n: int) -> int | None:
    """The smallest of the sorted ``sizes`` that holds ``n``; None past the largest."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class HostTrafficError(RuntimeError):
    """A fixed-shape step moved data between host and device or waited for the device: on CUDA its
    capture would fail ("Cannot copy between CPU and CUDA tensors during CUDA graph capture")."""


class _NoHostTraffic(TorchDispatchMode):
    """Fails on the ops that break a CUDA graph capture and that a CPU run shows too: host data made
    into a tensor (``torch.tensor([...])``), a Python scalar written through an index tensor
    (``t[rows] = 0``: on CUDA its 0-dim CPU value is copied over; a plain fill or ``t[:, 0] = 0`` is not),
    a value read on the host (``.item()``, ``bool(t)``) and outputs whose size depends on the data."""

    SYNCS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select")

    def __init__(self):
        super().__init__()
        self._scalars: list[torch.Tensor] = []  # Python scalars made into tensors (kept alive: ids stay unique)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.SYNCS:
            raise HostTrafficError(f"{name} inside a fixed-shape step (a host sync)")
        if name in ("aten::index_put_", "aten::index_put") and any(args[2] is t for t in self._scalars):
            raise HostTrafficError("a Python scalar written through an index tensor inside a fixed-shape step "
                                   "(use index_fill_)")
        out = func(*args, **(kwargs or {}))
        if name == "aten::lift_fresh":
            if args[0].dim() > 0:
                raise HostTrafficError("a tensor made from host data inside a fixed-shape step")
            self._scalars.append(out)
        return out


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops a function dispatches that compute or write (not views, not allocations): on
    CUDA each is about one kernel launch, and a small decode step is bound by how many it launches.
    Composite ops (``linear``, ``matmul``, ``reshape``: in inference mode they reach this mode whole) are
    counted by what they decompose into, so a copy that ``reshape`` makes of a strided tensor counts."""

    # allocations, views that are not annotated as aliases, and Python scalars wrapped as host tensors
    FREE = ("aten::empty", "aten::empty_strided", "aten::lift_fresh", "aten::new_empty", "aten::empty_like",
            "aten::_unsafe_view", "aten::scalar_tensor")

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # the parts of a composite pass through this mode again
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        returns = func._schema.returns
        view = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        if not view and func._schema.name not in self.FREE:
            self.ops[func._schema.name] += 1
        return func(*args, **kwargs)


def dispatched_ops(fn: Callable[[], object]) -> collections.Counter[str]:
    """The computing ops ``fn()`` dispatches, by name (``_OpCounter``); runs it once, in inference mode."""
    with torch.inference_mode(), _OpCounter() as counter:
        fn()
    return counter.ops


def use_graphs(setting: str, device: torch.device, cpu_offload: bool = False) -> bool:
    """``cuda_graphs``: on, off, or auto (on for CUDA; off on CPU, where nothing is launched per kernel).

    Always off with CPU offload, "on" included (with a warning): the offloaded weights are meta tensors
    that accelerate's hooks fill per forward, which a graph cannot hold and the fine stage's stacked heads
    cannot be built from (every fine pass failed), and a static whole-length KV cache would defeat the
    point of offloading."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs must be auto, on or off, got {setting!r}")
    if cpu_offload:
        if setting == "on":
            log.warning("cuda_graphs: on is ignored with cpu_offload: steps run eagerly")
        return False
    return setting == "on" or (setting == "auto" and device.type == "cuda")


class StepGraphs:
    """Fixed-shape steps of one engine, captured per (shape, mode) on CUDA, run eagerly elsewhere."""

    def __init__(self, fn: StepFn, shapes: Iterable[Shape], device: torch.device, name: str = "step"):
        self.fn, self.device, self.name = fn, device, name
        self.shapes = sorted(set(shapes), reverse=True)  # captured largest first: later ones reuse its memory
        self.graphs: dict[tuple[Shape, SampleMode], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0
        self.graph_bytes = 0
        self.error: str | None = None  # why capture failed (the steps then run eagerly)

    @classmethod
    def grid(cls, fn: StepFn, axes: Sequence[Sequence[int]], device: torch.device, name: str = "step"):
        """One shape per combination of the axes' sizes (rows x span, rows x length)."""
        return cls(fn, itertools.product(*axes), device, name)

    def capture(self, modes: Iterable[SampleMode] = tuple(SampleMode), pool=None, stream=None) -> None:
        """Warm up and capture every (shape, mode) graph into ``pool`` (a new one by default) on ``stream`` (a
        new side stream by default). CUDA only. Captures that share a pool must share the stream too: the
        caching allocator reuses a freed block only on the stream that freed it (``torch.cuda.graph``'s docs)."""
        if self.device.type != "cuda":
            return
        try:
            self._capture(tuple(modes), pool if pool is not None else torch.cuda.graph_pool_handle(),
                          stream if stream is not None else torch.cuda.Stream(self.device))
        except Exception as exc:  # a replica that cannot capture still serves, eagerly; say so loudly
            self.graphs.clear()
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture failed (%s), steps run eagerly: %s", self.name, self.error,
                        exc_info=True)

    def _capture(self, modes: tuple[SampleMode, ...], pool, stream) -> None:
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        # Every capture starts by emptying the allocator's cache (torch.cuda.graph does): measured from a full
        # cache, the graphs' memory came out negative (-17 GiB on the H200 run of 2026-12-04, after the
        # transformers runs had left their blocks cached).
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for shape in self.shapes:
                for mode in modes:
                    self.fn(shape, mode)  # eager warm-up: lazy library set-up stays out of the graph
                    stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        out = self.fn(shape, mode)
                    self.graphs[(shape, mode)] = (graph, out)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        self.graph_bytes = torch.cuda.memory_reserved(self.device) - before
        log.info("captured %d CUDA graphs (%s) in %.2f s, %.1f MiB", len(self.graphs), self.name, self.capture_s,
                 self.graph_bytes / 2**20)

    def check_capturable(self, modes: Iterable[SampleMode] = tuple(SampleMode)) -> int:
        """Run every (shape, mode) step once, eagerly, under a guard that raises ``HostTrafficError`` on
        what would break its capture: a CPU host's check of the CUDA path (the tests run it). -> steps run"""
        n = 0
        with torch.inference_mode(), _NoHostTraffic():
            for shape in self.shapes:
                for mode in modes:
                    self.fn(shape, mode)
                    n += 1
        return n

    def run(self, shape: Shape, mode: SampleMode) -> tuple[torch.Tensor, bool]:
        """Replay the graph of ``shape`` (a captured one, from the engine's ``fit``), else run it eagerly.
        -> (output, replayed?)"""
        entry = self.graphs.get((shape, mode))
        if entry is None:
            return self.fn(shape, mode), False
        graph, out = entry
        graph.replay()
        return out, True

    def stats(self) -> dict:
        out: dict[str, float | str] = {"cuda_graphs": len(self.graphs), "shapes": len(self.shapes),
                                       "capture_s": round(self.capture_s, 4), "graph_bytes": self.graph_bytes}
        if self.error:
            out["capture_error"] = self.error
        return out
