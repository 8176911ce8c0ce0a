"""BatchWorkerLoop: claims batch items from Redis and synthesizes them, at most max_in_flight at once.

How this works: one asyncio loop per worker. Each turn it heartbeats the
items it holds (so a slow item is not taken over, and items whose job was
cancelled or that another worker took over are stopped), takes over stale
items of dead workers (XAUTOCLAIM), then reads new items for its free slots,
blocking briefly on the stream when idle. Each item runs as its own task:
``synthesize(item)`` (injected; in production it calls the orchestrator with
``priority="batch"``), then the guarded finish script writes the result once
or requeues/fails the item. Because the worker never holds more than
``max_in_flight`` items, a large job cannot flood the stage servers ahead of
interactive requests.

Redis outages are survived: the loop backs off and retries, and a finished
item keeps retrying its write until Redis is back (the write is guarded, so a
retry after a lost reply is harmless).

A failed synthesis other than a bad item (a stage replica that died, a
timeout, overload) is transient: the item is requeued for another attempt,
after ``retry_backoff_s`` (doubling per attempt), so that a stage replica
that needs ~10 s to restart does not use up every attempt at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bark_serve.cluster.batch_types import BatchItem, ErrorType, Lease, SynthesisResult
from bark_serve.cluster.queue import Heartbeat, Outcome, WorkQueue
from bark_serve.stages.types import InvalidRequestError, RequestCrashedStage

log = logging.getLogger("bark.batch.worker")

Synthesize = Callable[[BatchItem], Awaitable[SynthesisResult]]
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
MAX_BACKOFF_S = 2.0
RETRY_BACKOFF_S = 2.0  # served workers (from_config) wait this long before requeuing a failed item, doubling
MAX_RETRY_BACKOFF_S = 30.0


@dataclass
class WorkerStats:
    """Counters of one worker loop (for logs, metrics and tests)."""

    leased: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    discarded: int = 0  # results not written: duplicate, cancelled, stale or gone
    stopped: int = 0  # items stopped by a heartbeat verdict (cancelled or taken over)
    redis_errors: int = 0


def default_consumer_name() -> str:
    """Unique per process: a restarted worker is a new consumer, and its predecessor's items are reclaimed."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class BatchWorkerLoop:
    """Claims items from the work queue and runs ``synthesize`` on each, ≤ ``max_in_flight`` at once.

    ``run()`` until ``stop()``; ``stop(grace_s)`` lets in-flight items finish for
    ``grace_s`` and gives the rest back to the queue without using up an attempt.
    """

    def __init__(self, queue: WorkQueue, synthesize: Synthesize, *, max_in_flight: int = 8,
                 claim_timeout_s: float = 300.0, item_timeout_s: float | None = None,
                 consumer: str | None = None, block_ms: int | None = None, retry_backoff_s: float = 0.0):
        self.queue = queue
        self.synthesize = synthesize
        self.max_in_flight = max_in_flight
        self.claim_timeout_s = claim_timeout_s
        self.item_timeout_s = item_timeout_s  # a synthesize call running longer fails (and is retried)
        self.retry_backoff_s = retry_backoff_s  # before requeuing a transient failure (0: at once)
        self.consumer = consumer or default_consumer_name()
        # Heartbeats well inside the claim timeout, and often enough that a cancel stops in-flight
        # items within seconds; reclaim checks often enough to notice dead workers.
        self.heartbeat_s = min(claim_timeout_s / 3, 5.0)
        self.reclaim_s = min(claim_timeout_s / 2, 10.0)
        self.prune_s = max(10 * claim_timeout_s, 3600.0)  # dead consumers' names are dropped after this
        self.block_ms = block_ms if block_ms is not None else int(min(500, self.heartbeat_s * 1000))
        self.stats = WorkerStats()
        self._tasks: dict[asyncio.Task, Lease] = {}
        self._committing: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        self._grace_s = 30.0
        self._running = False
        self._reclaim_cursor = "0-0"
        self._progress_writes: dict[tuple[str, str], set[asyncio.Task]] = {}  # report_stage's writes by item
        self._progress_lock = asyncio.Lock()

    @classmethod
    def from_config(cls, queue: WorkQueue, synthesize: Synthesize, cfg, consumer: str | None = None,
                    item_timeout_s: float | None = None) -> "BatchWorkerLoop":
        """Build from a :class:`serving.config.BatchConfig`."""
        return cls(queue, synthesize, max_in_flight=cfg.max_in_flight, claim_timeout_s=cfg.claim_timeout_s,
                   item_timeout_s=item_timeout_s, consumer=consumer, retry_backoff_s=RETRY_BACKOFF_S)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self) -> None:
        """Work until :meth:`stop` is called (or the task is cancelled: then in-flight items are released)."""
        failures = 0
        need_group = True
        self._running = True
        next_heartbeat = next_reclaim = time.monotonic()
        next_prune = next_heartbeat + self.reclaim_s
        try:
            while not self._stop.is_set():
                try:
                    if need_group:  # at start, and whenever Redis came back without the group
                        await self.queue.ensure_group()
                        need_group = False
                    now = time.monotonic()
                    if now >= next_heartbeat:
                        await self._heartbeat()
                        next_heartbeat = now + self.heartbeat_s
                    if now >= next_reclaim and self._free():
                        await self._reclaim()
                        next_reclaim = now + self.reclaim_s
                    if now >= next_prune:
                        await self.queue.prune_consumers(int(self.prune_s * 1000))
                        await self.queue.sweep_results(min_age_s=self.prune_s)
                        next_prune = now + self.prune_s
                    await self._fill_or_wait()
                    failures = 0
                except REDIS_DOWN as exc:
                    failures += 1
                    self.stats.redis_errors += 1
                    if failures == 1:
                        log.warning("batch worker %s: Redis unavailable (%s); retrying", self.consumer, exc)
                    await asyncio.sleep(min(0.05 * 2 ** failures, MAX_BACKOFF_S))
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        need_group = True
                    else:  # a bug or a Redis refusal: keep the worker alive, but say so loudly
                        log.error("batch worker %s: Redis error: %s", self.consumer, exc)
                        await asyncio.sleep(MAX_BACKOFF_S)
                except Exception:
                    log.exception("batch worker %s: unexpected error; continuing", self.consumer)
                    await asyncio.sleep(MAX_BACKOFF_S)
        except asyncio.CancelledError:
            self._grace_s = 0.0  # cancelled from outside: give items back now, do not wait for them
            raise
        finally:
            try:
                await self._shutdown(self._grace_s)
            finally:
                self._finished.set()

    def request_stop(self, grace_s: float = 30.0) -> None:
        """Ask the loop to stop: no new claims; in-flight items get ``grace_s`` to finish, the rest are released."""
        self._grace_s = grace_s
        self._stop.set()

    async def stop(self, grace_s: float = 30.0) -> None:
        """:meth:`request_stop` and wait until :meth:`run` has returned (call it from another task)."""
        self.request_stop(grace_s)
        if self._running:
            await self._finished.wait()

    def _free(self) -> int:
        return self.max_in_flight - len(self._tasks)

    async def _fill_or_wait(self) -> None:
        free = self._free()
        if free > 0:
            # Tasks commit on their own, so blocking here delays nothing but the next heartbeat/reclaim check.
            for lease in await self.queue.claim(self.consumer, free, block_ms=self.block_ms):
                self._spawn(lease)
        else:  # full: wait for a free slot, the next heartbeat, or stop()
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait([*self._tasks, stop], timeout=self.heartbeat_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()

    async def _reclaim(self) -> None:
        self._reclaim_cursor, leases = await self.queue.reclaim(
            self.consumer, self._free(), int(self.claim_timeout_s * 1000), start=self._reclaim_cursor)
        for lease in leases:  # a restart from scratch: say so, and why
            log.warning("batch worker %s: took over item %s/%s (attempt %d): its worker sent no heartbeat for "
                        "%.0f s (claim_timeout_s)", self.consumer, lease.entry.job_id, lease.entry.item_id,
                        lease.attempt, self.claim_timeout_s)
            self._spawn(lease)

    async def _heartbeat(self) -> None:
        held = {t: lease for t, lease in self._tasks.items() if t not in self._committing}
        verdicts = await self.queue.heartbeat(self.consumer, list(held.values()))
        for task, lease in held.items():
            if verdicts.get(lease.entry.entry_id, Heartbeat.OK) is not Heartbeat.OK and not task.done():
                self.stats.stopped += 1
                task.cancel()  # cancelled job or taken over: its result would be discarded anyway

    def _spawn(self, lease: Lease) -> None:
        self.stats.leased += 1
        task = asyncio.create_task(self._process(lease), name=f"batch-item-{lease.entry.item_id}")
        self._tasks[task] = lease
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.pop(task, None)
        self._committing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch worker %s: item task crashed: %r", self.consumer, task.exception())

    async def _process(self, lease: Lease) -> None:
        item = lease.batch_item()
        try:
            result = await self._synthesize_within_timeout(item)
            if not isinstance(result, SynthesisResult) or not isinstance(result.audio, (bytes, bytearray)):
                raise TypeError(f"synthesize returned {type(result).__name__}, expected SynthesisResult")
        except asyncio.CancelledError:
            raise
        except InvalidRequestError as exc:  # the item itself is bad: retrying cannot help
            reason = str(exc) or "invalid request"
            outcome = await self._commit(lambda: self.queue.fail(lease, reason, ErrorType.INVALID_ITEM, retry=False))
        except RequestCrashedStage as exc:  # it kills stage replicas: another attempt would kill more
            reason = f"{type(exc).__name__}: {exc}"
            outcome = await self._commit(lambda: self.queue.fail(lease, reason, ErrorType.SYNTHESIS_ERROR,
                                                                 retry=False))
        except Exception as exc:  # anything else may be transient (a replica restarting, a timeout)
            reason = f"{type(exc).__name__}: {exc}".strip()
            log.warning("batch worker %s: item %s/%s attempt %d failed: %s", self.consumer,
                        lease.entry.job_id, lease.entry.item_id, lease.attempt, reason[:200])
            await self._retry_pause(lease)
            outcome = await self._commit(lambda: self.queue.fail(lease, reason, ErrorType.SYNTHESIS_ERROR, retry=True))
        else:
            outcome = await self._commit(lambda: self.queue.complete(lease, result, worker=self.consumer))
        self._count(outcome)

    async def _retry_pause(self, lease: Lease) -> None:
        """Wait before requeuing, if another attempt follows (the heartbeat keeps the lease meanwhile)."""
        if self.retry_backoff_s > 0 and lease.attempt < self.queue.max_attempts:
            await asyncio.sleep(min(self.retry_backoff_s * 2 ** (lease.attempt - 1), MAX_RETRY_BACKOFF_S))

    async def _synthesize_within_timeout(self, item: BatchItem) -> SynthesisResult:
        """``synthesize``, bounded by item_timeout_s if set (else only heartbeats bound it: a live worker
        keeps its item however long it takes, a dead one's item is reclaimed after claim_timeout_s)."""
        try:
            if self.item_timeout_s is None:
                return await self.synthesize(item)
            return await asyncio.wait_for(self.synthesize(item), self.item_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"took longer than batch.item_timeout_s ({self.item_timeout_s:g} s)") from None
        finally:  # its progress lands before its result (the result's write ends the item's progress)
            pending = self._progress_writes.pop((item.job_id, item.item_id), set())
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    def report_stage(self, job_id: str, item_id: str, stage: str | None, passed: list[str]) -> None:
        """Record, in the background, which stage an in-flight item is in (job status shows it).

        Best effort: progress never delays or fails an item, so Redis errors are only logged.
        """
        lease = next((held for held in self._tasks.values()
                      if held.entry.job_id == job_id and held.entry.item_id == item_id), None)
        if lease is not None:
            pending = self._progress_writes.setdefault((job_id, item_id), set())
            task = asyncio.ensure_future(self._write_stage(lease, stage, passed))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _write_stage(self, lease: Lease, stage: str | None, passed: list[str]) -> None:
        try:
            async with self._progress_lock:  # FIFO: an item's stages land in the order they happened
                await self.queue.set_stage(lease, stage, passed)
        except (*REDIS_DOWN, ResponseError) as exc:
            log.debug("batch worker %s: progress of %s not recorded: %s", self.consumer, lease.entry.item_id, exc)

    async def _commit(self, write: Callable[[], Awaitable[Outcome]]) -> Outcome | None:
        """Run the guarded write, retrying while Redis is down (until stop's grace runs out)."""
        task = asyncio.current_task()
        assert task is not None, "a write is committed from the item's task"
        self._committing.add(task)
        failures = 0
        while True:
            try:
                return await write()
            except REDIS_DOWN as exc:
                failures += 1
                self.stats.redis_errors += 1
                if self._stop.is_set() and failures > 20:
                    log.warning("batch worker %s: giving up a write (%s); the item will be reclaimed",
                                self.consumer, exc)
                    return None
                await asyncio.sleep(min(0.05 * 2 ** failures, MAX_BACKOFF_S))

    def _count(self, outcome: Outcome | None) -> None:
        if outcome is Outcome.OK:
            self.stats.succeeded += 1
        elif outcome is Outcome.FAILED:
            self.stats.failed += 1
        elif outcome is Outcome.RETRIED:
            self.stats.retried += 1
        else:
            self.stats.discarded += 1

    async def _shutdown(self, grace_s: float) -> None:
        """Let in-flight items finish for ``grace_s``; release what is left so others pick it up at once."""
        if self._tasks and grace_s > 0:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        leftover = [(t, lease) for t, lease in self._tasks.items() if t not in self._committing]
        for task, _ in leftover:
            task.cancel()
        if leftover:
            await asyncio.gather(*(t for t, _ in leftover), return_exceptions=True)
        for _, lease in leftover:
            try:
                await self.queue.release(lease)
            except REDIS_DOWN:
                pass  # not released: it is reclaimed after claim_timeout_s instead
        if self._tasks:  # tasks mid-write: let them land
            await asyncio.wait(list(self._tasks), timeout=5.0)
