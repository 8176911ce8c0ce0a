"""The work queue: a Redis stream with one consumer group, and the leases on its entries.

How this works: each queued item is one stream entry {job, item}. A worker
reads new entries with XREADGROUP (they enter its pending list) and takes
over entries idle longer than ``claim_timeout_s`` with XAUTOCLAIM (their
worker died). Either way the ``START`` script (cluster/queue_scripts.py) turns a delivery into a lease:
it bumps the item's attempt number, marks it running, and skips entries whose
job was cancelled, expired or already finished. An item delivered more than
``max_attempts`` times (its workers keep dying) fails and is dead-lettered.

A live worker heartbeats its entries (XCLAIM JUSTID to itself resets their
idle time) so that a slow item is not taken over; the heartbeat also tells it
which of its items were cancelled or taken over, so it can stop them.

``FINISH`` is the only way an item leaves the queue, and it is guarded by
the item's state inside one script: a result is written only while the item
is not terminal, so a late duplicate (a reclaimed item finishing twice) can
never write twice. Failures and releases act only for the current attempt,
so a stale holder cannot requeue an item someone else holds. Acked entries
are deleted, which keeps the stream as long as the backlog.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bark_serve.cluster import queue_scripts as scripts
from bark_serve.cluster.batch_types import (
    JOB_ID_RE,
    BatchKeys,
    ErrorType,
    ItemRecord,
    Lease,
    QueueEntry,
    SynthesisResult,
)
from bark_serve.cluster.redis_conn import StreamEntry, StreamRead

log = logging.getLogger("bark.batch.queue")


async def ensure_group(client: aioredis.Redis, keys: BatchKeys) -> None:
    """Create the consumer group if missing, from the stream's start so that no entry is missed."""
    try:
        await client.xgroup_create(keys.queue, keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Outcome(str, enum.Enum):
    """What finishing a lease did."""

    OK = "ok"  # the result was written (this attempt was the first to finish)
    DUPLICATE = "duplicate"  # another attempt had finished the item: nothing written
    CANCELLED = "cancelled"  # the job was cancelled: result discarded
    GONE = "gone"  # the job expired or vanished
    STALE = "stale"  # the item was taken over by a newer attempt: nothing done
    RETRIED = "retried"  # requeued for another attempt
    RELEASED = "released"  # requeued without using up an attempt (worker shutdown)
    FAILED = "failed"  # marked failed with its reason


class Heartbeat(str, enum.Enum):
    OK = "ok"  # still ours; its idle time was reset
    LOST = "lost"  # taken over by another worker or finished elsewhere: stop working on it
    CANCELLED = "cancelled"  # its job was cancelled (entry acked): stop working on it


class WorkQueue:
    """Stream + consumer group + leases (asyncio). ``max_attempts`` counts deliveries of one item."""

    def __init__(self, client: aioredis.Redis, *, keys: BatchKeys = BatchKeys(), max_attempts: int = 3,
                 result_ttl_s: int = 7 * 24 * 3600, results_dir: str | None = None,
                 inline_result_max_bytes: int = 0, inline_results_max_fraction: float = 1.0, clock=time.time):
        self.redis = client
        self.keys = keys
        self.max_attempts = max_attempts
        self.ttl = int(result_ttl_s)
        self.results_dir = Path(results_dir) if results_dir else None
        self.inline_max = inline_result_max_bytes  # with a results_dir, results past this size go there
        # ... and every result, once Redis holds more than this fraction of its maxmemory
        self.inline_fraction = inline_results_max_fraction
        self._info_refused = False
        self.clock = clock
        self._start = client.register_script(scripts.START)
        self._finish = client.register_script(scripts.FINISH)
        self._heartbeat = client.register_script(scripts.HEARTBEAT)
        self._prune = client.register_script(scripts.PRUNE)
        self._stage = client.register_script(scripts.STAGE)

    @classmethod
    def from_config(cls, client: aioredis.Redis, cfg, keys: BatchKeys = BatchKeys()) -> "WorkQueue":
        """From a :class:`serving.config.BatchConfig` (max_attempts, result_ttl_s, results_dir, inline size)."""
        return cls(client, keys=keys, max_attempts=cfg.max_attempts, result_ttl_s=cfg.result_ttl_s,
                   results_dir=cfg.results_dir, inline_result_max_bytes=cfg.inline_result_max_bytes,
                   inline_results_max_fraction=cfg.inline_results_max_fraction)

    def _base(self) -> list:
        return [self.keys.prefix, self.ttl, repr(self.clock())]

    async def ensure_group(self) -> None:
        """Create the consumer group if missing."""
        await ensure_group(self.redis, self.keys)

    async def prune_consumers(self, min_idle_ms: int) -> int:
        """Delete consumers idle ``min_idle_ms`` that hold nothing (dead workers' names); returns how many."""
        return int(await self._prune(args=[*self._base(), self.keys.queue, self.keys.group, min_idle_ms]))

    async def claim(self, consumer: str, count: int, block_ms: int = 0) -> list[Lease]:
        """Read up to ``count`` new entries (waiting up to ``block_ms`` for the first) and lease them."""
        got = cast(StreamRead, await self.redis.xreadgroup(self.keys.group, consumer, {self.keys.queue: ">"},
                                                           count=count, block=block_ms or None))
        entries = [_entry(eid, f) for _, msgs in (got or []) for eid, f in msgs if f]
        return await self._lease(entries)

    async def reclaim(self, consumer: str, count: int, min_idle_ms: int, start: str = "0-0") -> tuple[str, list[Lease]]:
        """Take over up to ``count`` entries idle ``min_idle_ms`` (their worker died): (next cursor, leases)."""
        nxt, msgs, *_ = await self.redis.xautoclaim(self.keys.queue, self.keys.group, consumer, min_idle_ms,
                                                    start_id=start, count=count)
        entries = [_entry(eid, f) for eid, f in msgs if f]
        return nxt.decode() if isinstance(nxt, bytes) else str(nxt), await self._lease(entries)

    async def _lease(self, entries: list[QueueEntry]) -> list[Lease]:
        if not entries:
            return []
        args = [*self._base(), self.keys.queue, self.keys.group, self.keys.dead, self.max_attempts]
        for e in entries:
            args += [e.entry_id, e.job_id, e.item_id]
        by_id = {e.entry_id: e for e in entries}
        out = await self._start(args=args)
        return [Lease(entry=by_id[eid.decode()], attempt=int(att), record=ItemRecord.unpack(spec),
                      owner=_tenant(owner)) for eid, att, spec, owner in out]

    async def heartbeat(self, consumer: str, leases: Sequence[Lease]) -> dict[str, Heartbeat]:
        """Keep this consumer's leases alive; entry id -> verdict (LOST/CANCELLED: stop that item)."""
        if not leases:
            return {}
        args = [*self._base(), self.keys.queue, self.keys.group, consumer]
        for lease in leases:
            args += [lease.entry.entry_id, lease.entry.job_id, lease.entry.item_id]
        out = await self._heartbeat(args=args)
        return {lease.entry.entry_id: Heartbeat(v.decode()) for lease, v in zip(leases, out)}

    async def _run_finish(self, lease: Lease, mode: str, *extra) -> Outcome:
        e = lease.entry
        args = [*self._base(), self.keys.queue, self.keys.group, self.keys.dead, e.job_id, e.item_id,
                e.entry_id, lease.attempt, mode, self.max_attempts, *extra]
        return Outcome((await self._finish(args=args)).decode())

    async def _room_inline(self, size: int) -> bool:
        """Whether a result of ``size`` bytes may go into Redis: Redis would then hold at most
        ``inline_fraction`` of its maxmemory (no maxmemory, or a Redis that refuses INFO: always). Small
        results of one busy key would otherwise fill a capped Redis, and a full one refuses every key's
        writes (store_full); with this they go to results_dir instead."""
        if self.inline_fraction >= 1.0 or self._info_refused:
            return True
        try:
            info = await self.redis.info("memory")
        except ResponseError as exc:  # a managed Redis may rename or forbid INFO
            self._info_refused = True
            log.warning("Redis refused INFO (%s): results up to inline_result_max_bytes stay in Redis "
                        "whatever its memory", exc)
            return True
        cap = int(info.get("maxmemory", 0) or 0)
        return cap == 0 or int(info.get("used_memory", 0)) + size <= self.inline_fraction * cap

    async def complete(self, lease: Lease, result: SynthesisResult, worker: str = "") -> Outcome:
        """Write the item's result once (audio in Redis, or, past ``inline_max`` bytes or with Redis past
        ``inline_fraction`` of its memory, with a results_dir, a file there) and ack it."""
        r = lease.record
        meta = {"index": r.index, "format": r.format, "voice": r.voice, "seed": r.seed,
                "media_type": str(result.media_type), "sample_rate": int(result.sample_rate),
                "duration_s": float(result.duration_s), "timings": _plain_timings(result.timings),
                "bytes": len(result.audio),
                "worker": worker, "finished_at": self.clock()}
        size = len(result.audio)
        if self.results_dir is None or (size <= self.inline_max and await self._room_inline(size)):
            return await self._run_finish(lease, "ok", msgpack.packb(meta, use_bin_type=True), "audio", result.audio,
                                          size)
        path = await asyncio.to_thread(self._write_file, lease, result.audio)
        outcome = await self._run_finish(lease, "ok", msgpack.packb(meta, use_bin_type=True), "path", str(path),
                                         size)
        if outcome is not Outcome.OK:  # another attempt's file is the result: drop ours
            await asyncio.to_thread(path.unlink, True)
        return outcome

    def _results_root(self) -> Path:
        """This deployment's part of results_dir (two deployments may share a folder as they share a Redis)."""
        assert self.results_dir is not None, "only called with a results_dir"
        return self.results_dir / self.keys.prefix

    async def sweep_results(self, min_age_s: float) -> int:
        """Delete the result files of jobs that expired (their Redis records are gone after result_ttl_s).

        A folder younger than ``min_age_s`` stays (its job's record may be on its way). Returns how many
        job folders were deleted."""
        if self.results_dir is None:
            return 0
        root = self._results_root()

        def folders() -> list[Path]:
            return [p for p in root.iterdir() if p.is_dir() and JOB_ID_RE.match(p.name)] if root.is_dir() else []

        removed = 0
        for folder in await asyncio.to_thread(folders):
            if await self.redis.exists(self.keys.job(folder.name)):
                continue
            try:
                if self.clock() - folder.stat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:  # another worker swept it
                continue
            await asyncio.to_thread(shutil.rmtree, folder, True)
            removed += 1
        if removed:
            log.info("results_dir: deleted the files of %d expired jobs", removed)
        return removed

    def _write_file(self, lease: Lease, audio: bytes) -> Path:
        # One file per attempt: a late duplicate never overwrites the file the result points to.
        folder = self._results_root() / lease.entry.job_id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{lease.record.id}.a{lease.attempt}.{lease.record.format}"
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(audio)
        os.replace(tmp, path)
        return path

    async def fail(self, lease: Lease, reason: str, error_type: ErrorType, retry: bool) -> Outcome:
        """Requeue the item (``retry`` and attempts left) or mark it failed with ``reason``; logs either."""
        outcome = await self._run_finish(lease, "retry" if retry else "fail", reason[:2000], error_type.value)
        e = lease.entry
        if outcome is Outcome.RETRIED:  # a retry starts the item from scratch: say so, and why
            log.warning("batch item %s/%s: attempt %d of %d failed, retrying: %s", e.job_id, e.item_id,
                        lease.attempt, self.max_attempts, reason)
        elif outcome is Outcome.FAILED:
            log.warning("batch item %s/%s: failed after attempt %d of %d: %s", e.job_id, e.item_id,
                        lease.attempt, self.max_attempts, reason)
        return outcome

    async def set_stage(self, lease: Lease, stage: str | None, passed: Sequence[str] = ()) -> bool:
        """Record the stage the item is in now (None: none) and count the stages it has just passed.

        Progress for ``GET /v1/batches/{id}`` (items per stage, stage rates for the ETA); acts only
        while this lease's attempt holds the item. False when it did nothing.
        """
        e = lease.entry
        args = [*self._base(), e.job_id, e.item_id, lease.attempt, stage or "", *passed]
        return bool(await self._stage(args=args))

    async def release(self, lease: Lease) -> Outcome:
        """Give the item back untouched (worker shutdown): requeued, the attempt not counted."""
        return await self._run_finish(lease, "release")

    async def dead_letters(self, count: int = 100) -> list[dict]:
        """The newest dead-lettered items (exhausted retries or lost workers), newest first."""
        rows = cast(list[StreamEntry], await self.redis.xrevrange(self.keys.dead, count=count))
        return [{k.decode(): v.decode() for k, v in fields.items()} | {"entry": eid.decode()} for eid, fields in rows]

    async def backlog(self) -> tuple[int, int]:
        """(entries in the stream, entries delivered but not yet acked)."""
        length = await self.redis.xlen(self.keys.queue)
        try:
            pending = (await self.redis.xpending(self.keys.queue, self.keys.group))["pending"]
        except ResponseError:
            pending = 0
        return length, pending


async def open_queue(cfg, keys: BatchKeys | None = None) -> WorkQueue:
    """Connect (PING; RedisUnavailable if that fails) and build the queue from a BatchConfig, in this loop."""
    from bark_serve.cluster.redis_conn import aconnect

    keys = keys or BatchKeys(getattr(cfg, "key_prefix", "bark"))
    queue = WorkQueue.from_config(await aconnect(cfg.redis()), cfg, keys)
    await queue.ensure_group()
    return queue


def _plain_timings(timings: dict) -> dict:
    """Timings as plain JSON types: nested dicts stay dicts, ints stay ints (a seed), numpy scalars become
    Python numbers, anything else its str (msgpack and the results' <id>.json need plain values)."""
    return {str(key): _plain(value) for key, value in timings.items()}


def _plain(value):
    if isinstance(value, dict):
        return _plain_timings(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalar
        return _plain(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _tenant(owner) -> str:
    """A job's stored owner as the tenant id ("-", a job made without API keys, is the shared owner "")."""
    text = owner.decode() if isinstance(owner, bytes) else str(owner or "")
    return "" if text == "-" else text


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> QueueEntry:
    return QueueEntry(entry_id=entry_id.decode(), job_id=fields[b"job"].decode(), item_id=fields[b"item"].decode())
