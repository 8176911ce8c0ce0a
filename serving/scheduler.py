"""The batching loop inside every stage replica: plain asyncio, testable without Ray or torch.

How this works:
- ``submit`` puts a request in a priority queue and awaits its future. The
  order: interactive before batch, then lower segment index first (a request's
  first segment is never stuck behind the later segments of other long texts:
  time to first audio under load), then arrival order;
- one loop task admits queued requests whenever the engine has room, then
  runs ``engine.step()`` in a worker thread (so the event loop keeps
  accepting requests), and resolves the futures of the requests that finished;
- with a ``cores`` budget (cluster/cores.py, ``torch_threads: shared``) each step runs on the cores it
  leases from the replicas of its host, and the replica counts as idle there while it holds nothing;
- when the engine is idle the loop sleeps until a request arrives, then waits
  ``batch_wait_s`` so that a burst is admitted together;
- a bad request fails alone (``admit`` raises, or its result carries an
  error); if a whole step fails, the requests it held fail and the loop goes
  on: the replica never dies for a request. Unless the device is gone: after
  a failed step the engine's device is probed (in the step thread), and if
  the probe fails too (a sticky CUDA error) the scheduler is ``poisoned``: it
  admits nothing more, queued and new requests fail with ``ReplicaPoisoned``
  (retryable elsewhere), and the replica's health check fails so that Serve
  replaces it;
- a caller that goes away (cancelled await) has its request dropped from the
  queue or cancelled in the engine between two steps.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bark_serve.stages.types import EngineResult, InvalidRequestError, Priority, StageRequest

from .metrics import NullStageMetrics

log = logging.getLogger("ray.serve")  # shows in the replica logs



class QueueFull(RuntimeError):
    """The stage's queue is at its limit (the caller answers 503 with Retry-After)."""


class StageError(RuntimeError):
    """The engine failed while it held this request (not the request's fault)."""


class ReplicaPoisoned(StageError):
    """This replica's device is unusable (a step failed and so did the device probe after it: a sticky CUDA
    error, which fails every later call of the process). The request did not run here; another replica can
    run it, and Serve replaces this one (its health check fails)."""


@dataclass(frozen=True)
class StageOutput:
    """A finished request: the engine's output and when the stage worked on it (wall-clock seconds)."""

    output: object
    queued_at: float
    started: float
    finished: float


@dataclass(order=True)
class _Entry:
    priority: int
    segment: int  # the request's segment index (StageRequest.segment)
    seq: int
    request: StageRequest = field(compare=False)
    future: asyncio.Future = field(compare=False)
    queued_at: float = field(compare=False, default_factory=time.time)
    isolated: bool = field(compare=False, default=False)  # runs alone in the engine (a crash suspect)


class StageScheduler:
    def __init__(self, engine, max_queue: int = 1024, batch_wait_s: float = 0.002,
                 metrics: NullStageMetrics = NullStageMetrics(), alone_hook=None, cores=None, probe=None):
        self.engine = engine
        # probe() raises if the engine's device can no longer run anything; run in the step thread after a
        # failed step. Default: the engine's ``probe_device`` (stages/engine.py: CUDA only), if it has one.
        self.probe = probe if probe is not None else getattr(engine, "probe_device", None)
        self.poisoned: str | None = None  # why the device is unusable (then nothing more is admitted)
        self.cores = cores  # a cluster.cores.CoreBudget, or None: steps run on the engine's own threads
        # alone_hook(request_id, True) when an isolated request goes into the engine alone, (request_id, False)
        # once it is out: what tells a caller whose replica died whether its request was the one running
        self.alone_hook = alone_hook
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics  # serving/metrics.py: Prometheus through Ray in a replica
        self._queue: list[_Entry] = []
        self._seq = itertools.count()
        self._held: dict[str, _Entry] = {}  # request_id -> entry, admitted to the engine
        self._started: dict[str, float] = {}
        self._cancel: set[str] = set()
        self._alone: str | None = None  # the isolated request the engine holds, alone
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{engine.name}-step")
        self._task: asyncio.Task | None = None
        self.busy_s = 0.0  # time spent inside engine.step (for the benchmark's per-stage busy time)
        self.steps = 0

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.engine.name}-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=False)
        if self.cores is not None:
            self.cores.idle()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def stats(self) -> dict:
        return {"queued": len(self._queue), "held": len(self._held), "steps": self.steps, "busy_s": self.busy_s}

    async def submit(self, request: StageRequest, priority: Priority | str = Priority.INTERACTIVE,
                     isolated: bool = False) -> StageOutput:
        """Queue a request and wait for its output; raises InvalidRequestError, QueueFull or StageError.

        ``isolated``: the request runs alone, admitted once the engine holds nothing and holding it
        until it ends (a request that was in flight when a replica died, retried: see
        serving/stage_calls.py)."""
        try:
            priority = Priority(priority)
        except ValueError:
            raise InvalidRequestError(f"priority must be one of {', '.join(p.value for p in Priority)}") from None
        if self.poisoned:
            raise self._poisoned_error()
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{self.engine.name} queue is full ({self.max_queue} waiting)")
        self.start()
        segment = getattr(request, "segment", 0)
        segment = segment if isinstance(segment, int) and segment > 0 else 0
        entry = _Entry(priority.rank, segment, next(self._seq), request, asyncio.get_running_loop().create_future(),
                       isolated=bool(isolated))
        heapq.heappush(self._queue, entry)
        self.metrics.queue_length(len(self._queue))
        self._wake.set()
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._cancel.add(request.request_id)
            self._wake.set()
            raise

    # -- loop -----------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue and not self._held:
                if self.cores is not None:
                    self.cores.idle()
                self._wake.clear()
                await self._wake.wait()
                if self.batch_wait_s:
                    await asyncio.sleep(self.batch_wait_s)
            self._apply_cancels()
            self._admit()
            if not self._held:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._step)
            except Exception as exc:  # the engine broke: fail what it held, keep serving (if its device works)
                log.exception("%s step failed; failing %d held requests", self.engine.name, len(self._held))
                await self._probe_device(loop, exc)
                self._fail_held(exc)
                if self.poisoned:
                    self._fail_queued()
                continue
            finally:
                self.busy_s += time.perf_counter() - t0
                self.steps += 1
            last = getattr(self.engine, "last_step", {}) or {}
            self.metrics.step(last.get("batch", 0.0), last.get("tokens", 0.0), last.get("step_s", 0.0))
            for res in results:
                self._finish(res)

    def _step(self) -> list[EngineResult]:
        """One engine step (in the step thread), on leased cores when the replica shares its host's."""
        if self.cores is None:
            return self.engine.step()
        with self.cores.lease():
            return self.engine.step()

    def _admit(self) -> None:
        if self._alone is not None and self._alone not in self._held:
            if self.alone_hook is not None:
                self.alone_hook(self._alone, False)
            self._alone = None  # it ended (finished, failed or cancelled)
        while self._queue and self.engine.free > 0 and self._alone is None:
            if self._queue[0].isolated and self._held and not self._queue[0].future.done():
                break  # it waits, in its turn, until the engine is empty
            entry = heapq.heappop(self._queue)
            if entry.future.done():  # cancelled while queued
                continue
            rid = entry.request.request_id
            try:
                self.engine.admit(entry.request)
            except InvalidRequestError as exc:
                entry.future.set_exception(exc)
                self.metrics.request_done(time.time() - entry.queued_at, ok=False)
                continue
            except Exception as exc:  # admission itself broke: this request fails alone
                log.exception("%s admit failed for %s", self.engine.name, rid)
                entry.future.set_exception(StageError(f"{self.engine.name} could not admit the request: {exc}"))
                continue
            self._held[rid] = entry
            self._started[rid] = time.time()
            if entry.isolated:
                self._alone = rid
                if self.alone_hook is not None:
                    self.alone_hook(rid, True)
        self.metrics.queue_length(len(self._queue))

    def _finish(self, res: EngineResult) -> None:
        entry = self._held.pop(res.request_id, None)
        started = self._started.pop(res.request_id, time.time())
        if entry is None or entry.future.done():
            return
        now = time.time()
        self.metrics.request_done(now - entry.queued_at, ok=res.ok)
        if res.ok:
            entry.future.set_result(StageOutput(res.output, entry.queued_at, started, now))
        else:
            entry.future.set_exception(res.error if isinstance(res.error, Exception) else StageError(str(res.error)))

    async def _probe_device(self, loop: asyncio.AbstractEventLoop, exc: Exception) -> None:
        """After a failed step: can the device still run work? Asked in the step thread, where the engine's
        CUDA work runs. A device-side assert, an illegal memory access or a launch failure leaves the process's
        CUDA context unusable: every later admit and step fails, yet the loop lives on, so without this the
        replica failed every request ("could not admit") while its health check passed."""
        if self.probe is None:
            return
        try:
            await loop.run_in_executor(self._executor, self.probe)
        except Exception as probe_exc:
            self.poisoned = f"{type(exc).__name__}: {exc} (then the device probe: {type(probe_exc).__name__}: " \
                            f"{probe_exc})"
            log.error("%s: the device is unusable after a failed step; refusing requests until Serve replaces "
                      "this replica: %s", self.engine.name, self.poisoned)

    def _poisoned_error(self) -> ReplicaPoisoned:
        return ReplicaPoisoned(f"{self.engine.name} replica's device is unusable, the replica is being replaced: "
                               f"{self.poisoned}")

    def _fail_queued(self) -> None:
        """A poisoned replica's queue: every waiting request fails at once, retryable elsewhere."""
        while self._queue:
            entry = heapq.heappop(self._queue)
            if not entry.future.done():
                entry.future.set_exception(self._poisoned_error())
                self.metrics.request_done(time.time() - entry.queued_at, ok=False)
        self.metrics.queue_length(0)

    def _fail_held(self, exc: Exception) -> None:
        for rid, entry in list(self._held.items()):
            try:
                self.engine.cancel(rid)
            except Exception:  # the engine is already in trouble; drop our side regardless
                log.exception("cancel of %s failed", rid)
            if not entry.future.done():
                entry.future.set_exception(StageError(f"{self.engine.name} failed: {exc}"))
        self._held.clear()
        self._started.clear()

    def _apply_cancels(self) -> None:
        for rid in self._cancel:
            if rid in self._held:
                self.engine.cancel(rid)
                self._held.pop(rid)
                self._started.pop(rid, None)
        self._cancel.clear()
