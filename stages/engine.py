"""The one interface every stage engine implements, and the in-process driver.

An engine holds up to ``capacity`` requests. ``admit`` validates a request and
takes it in; ``step`` advances every held request by one iteration (a token
for the causal stages, a window for fine, a decode for codec) and returns the
requests that finished in it. Between two steps new requests may join: this is
the iteration-level ("continuous") batching the serving layer drives.
"""

from __future__ import annotations

import abc
import ctypes
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from .types import EngineResult, InvalidRequestError, StageRequest

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=StageRequest)  # the request type an engine admits
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs: where, in which precision, how many requests at once."""

    device: str = "cpu"
    dtype: str = "float32"
    capacity: int = 8
    torch_threads: int | None = None
    cpu_offload: bool = False
    # Rows (tokens) one prefill or fine forward may hold; larger batches run in chunks. None: on CPU,
    # as many as keep the largest activation (the MLP's) under 24 MiB, below glibc's 32 MiB mmap
    # ceiling, so activations reuse heap memory instead of page-faulting in fresh memory each
    # forward (bigger chunks add no GEMM efficiency there); on CUDA, no limit.
    max_forward_tokens: int | None = None
    # Fixed-shape steps replayed as CUDA graphs (stages/graphs.py): "auto" (on for CUDA, off on CPU),
    # "on" (on CPU: the same fixed-shape path, run eagerly) or "off", always off with cpu_offload; and
    # the batch sizes captured (empty: the defaults up to ``capacity``).
    cuda_graphs: str = "auto"
    graph_buckets: tuple[int, ...] = ()
    # Pad small batches so that a row's logits, and so a seed's sampled tokens, do not depend on the rows
    # it shares a step with (stages/invariance.py); costs a lone request its GEMV speed. Off: the same
    # tokens except where a draw falls within rounding of a token boundary (rare, see invariance.py).
    batch_invariant: bool = False
    # With batch_invariant on the fixed-shape path: run every step of a kind at one shape (decodes at
    # ``capacity`` rows over the whole reach, prefills one prompt at a time at the longest length, fine
    # passes at ``capacity`` windows) instead of probing for a row floor. None: on CUDA, where the GEMM
    # and attention kernels change with the shape in ways no padding floor covers (``single_shape_for``).
    single_shape: bool | None = None
    # The replica runs each CPU step on the cores it is lent then, 1 to ``torch_threads`` (``torch_threads:
    # shared``, cluster/cores.py): batch_invariant's probe then runs at each of those thread counts.
    shared_threads: bool = False

    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def torch_device(self) -> torch.device:
        return parse_device(self.device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def device_report(device: str) -> dict:
    """Which device a process computes on, and for CUDA its name and memory (torch's allocated and reserved,
    the device's free and total): what a stage replica logs at start and exports as metrics."""
    out: dict = {"device": device, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                 "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        free, total = torch.cuda.mem_get_info(index)
        out.update(index=index, name=torch.cuda.get_device_name(index), free_bytes=free, total_bytes=total,
                   allocated_bytes=torch.cuda.memory_allocated(index), reserved_bytes=torch.cuda.memory_reserved(index))
    return out


def single_shape_for(options: EngineOptions, device: torch.device, fixed_shape: bool) -> bool:
    """Whether ``batch_invariant`` is kept by giving every step of a kind one shape (True) rather than by
    padding small GEMMs to a probed row floor (stages/invariance.py). Only on the fixed-shape path (there the
    shapes are the engine's to choose); by default on CUDA: there the decode attention is two cuBLAS batched
    GEMMs (``modeling.decode_attention``) whose kernels, like the prefill's attention split, follow the row
    count and span, which a floor for the linear layers does not cover; with one shape per step kind each
    row is computed by the same kernels whatever else is held."""
    if not (options.batch_invariant and fixed_shape):
        return False
    return options.single_shape if options.single_shape is not None else device.type == "cuda"


def invariance_summary(engine) -> str:
    """How an engine keeps ``batch_invariant`` (the replica logs it at start)."""
    if getattr(engine, "single_shape", False):
        return (f"every step of a kind at one shape (decodes and fine passes at {engine.options.capacity} rows, "
                "prefills one prompt at the longest length); no padding floor probed")
    floor = getattr(engine, "row_floor", None)
    if floor:
        return f"batches under {floor} rows padded to {floor}"
    return "no padding gives this device batch-invariant GEMMs; sampled tokens may depend on the batch"


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(parse_device(name))


def resolve_dtype(name: str, device: str, torch_threads: int | None = None, logger=None) -> str:
    """'auto': the dtype whose GEMM measured fastest on this host, bfloat16 on a GPU that runs it natively
    unless float32 measured much faster (stages/dtype_probe.py); else ``name``.

    ``torch_threads`` is the thread count the engine will run with: the probe measures with it. The
    choice and the measured rates are logged at INFO on ``logger`` (a replica passes its own).
    """
    if name != "auto":
        parse_dtype(name)
        return name
    from .dtype_probe import auto_dtype

    if torch_threads:
        torch.set_num_threads(torch_threads)
    return auto_dtype(device, logger)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise InvalidRequestError(f"unknown dtype {name!r}: choose float32, bfloat16 or float16") from None


def parse_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {name!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    return dev


_CPU_ACTIVATION_BYTES = 24 << 20
_MALLOC_TUNED: bool | None = None


def forward_token_budget(limit: int | None, device_type: str, dtype: torch.dtype, hidden: int) -> int:
    """``limit`` if given; else on CPU the rows whose MLP activation (rows x 4*hidden) fits in 24 MiB."""
    if limit is not None:
        return limit
    if device_type != "cpu":
        return 1 << 30
    return max(256, _CPU_ACTIVATION_BYTES // (4 * hidden * dtype.itemsize))


def tune_cpu_malloc() -> bool:
    """Have glibc keep freed memory for reuse (once per process; BARK_MALLOC_TUNING=0 turns it off).

    By default glibc returns the top of the heap to the OS once 2x the (adaptive) mmap threshold
    is free, so a forward's activations are page-faulted in afresh on every step: 20% of a fine
    window's time on CPU (measured: 1.2 s -> 0.93 s a window, bark-small, bfloat16). A fixed
    32 MiB mmap threshold and no trimming keep the heap at its peak size, which is the memory a
    replica needs anyway. True if applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = False
        if sys.platform.startswith("linux") and os.environ.get("BARK_MALLOC_TUNING", "1") != "0":
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):  # not glibc
                return False
            m_trim_threshold, m_mmap_threshold = -1, -3
            _MALLOC_TUNED = bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_threshold, 32 << 20))
    return _MALLOC_TUNED


class PartTimer:
    """Seconds a step spends on its named parts (a causal step's decode and prefill).

    On CPU the wall clock: every op is done when it returns. On CUDA a launch returns long before the GPU has
    run it, and the next blocking host-to-device copy waits for all that is queued, so wall-clock parts book
    one part's GPU time to the next (the decode's to the prefill's). There each part is bracketed by CUDA
    events on the current stream, and ``seconds`` reads them once the step has synchronised with the device
    (its one device-to-host copy): a part then runs, on the GPU, from the end of the work queued before it to
    its own end. The events are made once per part and recorded again every step.
    """

    def __init__(self, device: torch.device, event: Callable[[], object] | None = None):
        self.cuda = device.type == "cuda"
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._events: dict[str, tuple] = {}
        self._marks: dict[str, list] = {}

    def reset(self) -> None:
        """Forget the parts started so far (a step that failed midway leaves its marks)."""
        self._marks = {}

    def start(self, name: str) -> None:
        self._marks[name] = [self._mark(name, 0), None]

    def stop(self, name: str) -> None:
        self._marks[name][1] = self._mark(name, 1)

    def _mark(self, name: str, end: int):
        if not self.cuda:
            return time.perf_counter()
        if name not in self._events:
            self._events[name] = (self._event(), self._event())
        event = self._events[name][end]
        event.record()
        return event

    def seconds(self) -> dict[str, float]:
        """Each part timed since the last call, in seconds; on CUDA only after the step's work has completed."""
        marks, self._marks = self._marks, {}
        if not self.cuda:
            return {name: end - start for name, (start, end) in marks.items()}
        return {name: start.elapsed_time(end) / 1000.0 for name, (start, end) in marks.items()}


class StageEngine(abc.ABC, Generic[RequestT]):
    """A stage that batches the requests it holds (of its own request type, ``RequestT``)."""

    name: str = "stage"
    row_floor: int | None = None  # batch_invariant's probed padding floor (stages/invariance.py), if any
    single_shape: bool = False  # batch_invariant kept by one shape per step kind (``single_shape_for``)

    def __init__(self, options: EngineOptions):
        self.options = options
        self.device = options.torch_device()
        self.dtype = options.torch_dtype()
        self.last_step: dict[str, float] = {}  # batch, tokens, step_s (and work) of the latest step: metrics
        self.totals: dict[str, float] = {}  # the same, summed over all steps: the benchmark
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        if self.device.type == "cpu":
            tune_cpu_malloc()

    def _batch_invariant(self, model: torch.nn.Module, max_rows: int) -> int | None:
        """With ``batch_invariant``: pad the model's small GEMMs to the floor probed on this device
        (stages/invariance.py). -> the floor, or None (option off, CPU offload, or no floor found)."""
        if not self.options.batch_invariant:
            return None
        if self.options.cpu_offload:  # the weights live on the host: a probe there says nothing of the device
            log.warning("%s: batch_invariant is ignored with cpu_offload", self.name)
            return None
        if self.device.type == "cuda":
            log.warning("%s: batch_invariant on CUDA holds only on the fixed-shape path (cuda_graphs auto or on, "
                        "single_shape): a floor for the linear layers leaves the decode attention's kernels free to "
                        "change with the batch", self.name)
        from .invariance import apply_row_floor

        threads = range(1, (self.options.torch_threads or torch.get_num_threads()) + 1) \
            if self.options.shared_threads and self.device.type == "cpu" else ()
        return apply_row_floor(model, max_rows, threads)

    def _device_sync(self) -> None:
        """Wait until the engine's device has run what this step queued (on CUDA; nothing on CPU, where every
        op is done when it returns). A step that launches its GPU work without reading a result back calls
        this before timing itself: otherwise its ``step_s`` is launch time, and the GPU time lands on whoever
        synchronises next (an ``admit``'s host-to-device copy, on the replica's event loop)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def probe_device(self) -> None:
        """Raise if the engine's device can no longer run work (the serving loop asks after a failed step, in
        the step thread). A device-side assert, an illegal memory access or a launch failure is sticky on CUDA:
        every later call of the process fails, so the replica must be replaced. Nothing to probe on CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.zeros(1, device=self.device).add_(1).item()

    def forward_token_budget(self, hidden: int) -> int:
        """Rows one forward may hold (see ``EngineOptions.max_forward_tokens``)."""
        return forward_token_budget(self.options.max_forward_tokens, self.device.type, self.dtype, hidden)

    def _record(self, stats: dict[str, float]) -> None:
        self.last_step = stats
        for key, value in stats.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.totals["steps"] = self.totals.get("steps", 0.0) + 1

    @property
    def capacity(self) -> int:
        return self.options.capacity

    @property
    @abc.abstractmethod
    def num_active(self) -> int:
        """Requests held now."""

    @property
    def free(self) -> int:
        return self.capacity - self.num_active

    @abc.abstractmethod
    def admit(self, request: RequestT) -> None:
        """Validate and take in one request; raises InvalidRequestError for a bad one."""

    @abc.abstractmethod
    def step(self) -> list[EngineResult]:
        """Advance every held request one iteration; return those that finished."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> bool:
        """Drop a held request; True if it was held."""

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.modules_for_accounting() for p in m.parameters())

    def modules_for_accounting(self) -> list[torch.nn.Module]:
        return []

    def expected_steps(self, request: RequestT) -> int:
        """About how many steps ``request`` will hold a place here (0: not known). Drivers that hold a whole
        list of requests (``iter_run``, the dataset's offline/stage_run.py) admit the longest first."""
        return 0

    def steps_estimate(self, request: RequestT) -> int:
        """``expected_steps``, or 0 for a request too malformed to measure (``admit`` refuses it with the
        reason)."""
        try:
            return int(self.expected_steps(request))
        except (AttributeError, TypeError, ValueError, IndexError):
            return 0

    def run(self, requests: Iterable[RequestT], on_step=None, longest_first: bool = True) -> list[EngineResult]:
        """Run requests to completion, admitting whenever a place frees up; results in the given order.

        ``longest_first`` (the default) admits the longest requests first (``expected_steps``, ties in
        the given order): the batch then drains on short requests instead of finishing on one long
        request running alone, so a list takes fewer steps (on bark-mix-v1, 64 requests at batch 64:
        2308 coarse steps instead of 2826; longest-processing-time first, the classic rule for the
        makespan). False: in the given order. ``on_step()``, if given, is called after every step
        (progress display).
        """
        return list(self.iter_run(requests, on_step, longest_first))

    def iter_run(self, requests: Iterable[RequestT], on_step=None, longest_first: bool = True
                 ) -> Iterator[EngineResult]:
        given = list(requests)
        order = [r.request_id for r in given]
        if longest_first:
            given.sort(key=lambda r: -self.steps_estimate(r))  # stable: ties keep their order
        pending = deque(given)
        done: dict[str, EngineResult] = {}
        while pending or self.num_active:
            while pending and self.free > 0:
                req = pending.popleft()
                try:
                    self.admit(req)
                except InvalidRequestError as exc:
                    done[req.request_id] = EngineResult(req.request_id, error=exc)
            if self.num_active:
                for res in self.step():
                    done[res.request_id] = res
                if on_step is not None:
                    on_step()
        for rid in order:
            yield done[rid]


def load_for(options: EngineOptions, factory: Callable[[], ModuleT], state: dict, **kwargs) -> ModuleT:
    """Load a sub-model where the options say; with cpu_offload its weights stay in host memory
    (accelerate moves each layer's weights to the execution device for its forward)."""
    from .weights import load_module

    if not options.cpu_offload:
        return load_module(factory, state, options.torch_dtype(), options.torch_device(), **kwargs)
    from accelerate import cpu_offload

    module = load_module(factory, state, options.torch_dtype(), torch.device("cpu"), **kwargs)
    cpu_offload(module, execution_device=options.torch_device())
    return module


def check_int_array(name: str, arr, ndim: int, lo: int, hi: int, rows: int | None = None,
                    min_len: int = 1, max_len: int | None = None) -> np.ndarray:
    """Validate an integer token array's rank, rows, length and value range [lo, hi)."""
    if not isinstance(arr, np.ndarray):
        raise InvalidRequestError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype.kind not in "iu":
        raise InvalidRequestError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise InvalidRequestError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if rows is not None and arr.shape[0] != rows:
        raise InvalidRequestError(f"{name} must have {rows} rows, got shape {arr.shape}")
    length = arr.shape[-1]
    if length < min_len or (max_len is not None and length > max_len):
        bound = f"[{min_len}, {max_len}]" if max_len is not None else f">= {min_len}"
        raise InvalidRequestError(f"{name} length must be {bound}, got {length}")
    if arr.size and (arr.min() < lo or arr.max() >= hi):
        raise InvalidRequestError(f"{name} values must be in [{lo}, {hi}), got [{arr.min()}, {arr.max()}]")
    return arr
