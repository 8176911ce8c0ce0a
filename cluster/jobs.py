"""The batch job store in Redis: jobs, item records, counts, progress, results, cancel.

How this works: a job is a hash (meta as msgpack, counts by item state,
timestamps); its items are msgpack records in a second hash and their states
in a third. Submitting runs one Lua script per chunk of items that records
each new item and puts it on the work stream in the same step, so an item is
enqueued exactly when it is first recorded: item ids are idempotency keys,
and a resubmitted id (same job) is never enqueued twice. A client-supplied
job key maps to one job (``SET`` inside the create script), so resubmitting
a whole file with the same key adds only the ids the job lacks.

Finished items (succeeded or failed) are entries of the job's results
stream, written by the guarded scripts in cluster/queue.py; the entry id is
the resume cursor of ``GET /v1/batches/{id}/results?after=``. Every write
refreshes the TTL of all the job's keys (``result_ttl_s``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import msgpack
import redis.asyncio as aioredis

from bark_serve.cluster.batch_types import LUA_PRELUDE, BatchKeys, ItemRecord, ItemState, JobState
from bark_serve.cluster.queue import ensure_group
from bark_serve.cluster.quotas import Quota, check_quota
from bark_serve.cluster.redis_conn import StreamEntry, StreamRead
from bark_serve.stages.constants import STAGES

ADD_CHUNK = 500  # items per script call: bounds how long one call holds Redis

# job_key arrives scoped to its owner ("<owner>:<key>" when there is one): two owners' equal keys name
# two jobs. The owner's sorted set of job ids (by creation) is what GET /v1/batches lists.
_CREATE = LUA_PRELUDE + """
local jid, job_key, meta, owner = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if job_key ~= '' then
  local existing = redis.call('GET', P .. ':jobkey:' .. job_key)
  if existing and redis.call('EXISTS', jk(existing)) == 1 then return {existing, 0} end
  redis.call('SET', P .. ':jobkey:' .. job_key, jid)
end
redis.call('HSET', jk(jid), 'meta', meta, 'jobkey', job_key, 'owner', owner, 'created_at', NOW, 'total', 0,
           'queued', 0, 'running', 0, 'succeeded', 0, 'failed', 0, 'cancelled', 0, 'processed', 0)
redis.call('ZADD', P .. ':owner:' .. owner, NOW, jid)
touch(jid)
return {jid, 1}
"""

_ADD = LUA_PRELUDE + """
local jid, queue = ARGV[4], ARGV[5]
local h = jk(jid)
if redis.call('EXISTS', h) == 0 then return {-1} end
if redis.call('HGET', h, 'status') == 'cancelled' then return {-2} end
local added, dups, invalid, conflicts = 0, 0, 0, {}
for i = 6, #ARGV, 3 do
  local iid, spec, err = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('HSETNX', jk(jid, 'items'), iid, spec) == 0 then
    if redis.call('HGET', jk(jid, 'items'), iid) == spec then dups = dups + 1
    else conflicts[#conflicts + 1] = iid end
  else
    redis.call('HINCRBY', h, 'total', 1)
    redis.call('HINCRBY', h, 'request_bytes', #spec)  -- a tenant's quota counts the requests its jobs keep
    if err ~= '' then
      redis.call('HINCRBY', h, 'queued', 1)
      fail_item(jid, iid, 'queued', 0, err, 'invalid_item')
      invalid = invalid + 1
    else
      redis.call('HSET', jk(jid, 'state'), iid, 'queued')
      redis.call('HINCRBY', h, 'queued', 1)
      redis.call('XADD', queue, '*', 'job', jid, 'item', iid)
      redis.call('HDEL', h, 'finished_at')
      added = added + 1
    end
  end
end
touch(jid)
return {added, dups, invalid, conflicts}
"""

_CANCEL = LUA_PRELUDE + """
local jid = ARGV[4]
local h = jk(jid)
if redis.call('EXISTS', h) == 0 then return 0 end
if redis.call('HGET', h, 'status') == 'cancelled' then return 1 end
local v = redis.call('HMGET', h, 'queued', 'running', 'jobkey')
local open = tonumber(v[1]) + tonumber(v[2])
if open == 0 then return 2 end
-- the item requests go at once: no item of a cancelled job runs again, and it takes no more items. First, so
-- that a full Redis (maxmemory) still runs the script (a script that has written may go on writing).
redis.call('UNLINK', jk(jid, 'items'))
redis.call('HSET', h, 'status', 'cancelled', 'queued', 0, 'running', 0, 'finished_at', NOW, 'request_bytes', 0)
redis.call('HINCRBY', h, 'cancelled', open)
-- the key is released: resubmitting with it starts a new job instead of reviving a cancelled one
if v[3] and v[3] ~= '' and redis.call('GET', P .. ':jobkey:' .. v[3]) == jid then
  redis.call('DEL', P .. ':jobkey:' .. v[3])
end
touch(jid)
return 1
"""


@dataclass(frozen=True)
class JobCounts:
    """Items of a job by state."""

    total: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


@dataclass(frozen=True)
class JobInfo:
    """Status and progress of one job, as ``GET /v1/batches/{id}`` reports it."""

    job_id: str
    state: JobState
    counts: JobCounts
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    job_key: str | None = None
    rate_items_per_s: float | None = None  # items finished by workers per second since the first start
    eta_s: float | None = None
    stages: dict[str, int] = field(default_factory=dict)  # running items by the stage they are in now
    stage_rates: dict[str, float] = field(default_factory=dict)  # items per second through each stage
    owner: str = "-"  # the tenant that made it ("-": no API keys); never shown to clients

    def owned_by(self, owner: str) -> bool:
        return self.owner == (owner or "-")

    def to_dict(self) -> dict:
        return {"id": self.job_id, "object": "batch", "status": self.state.value,
                "job_key": self.job_key, "counts": self.counts.__dict__.copy(),
                "created_at": self.created_at, "started_at": self.started_at,
                "finished_at": self.finished_at, "rate_items_per_s": self.rate_items_per_s,
                "eta_s": self.eta_s, "stages": dict(self.stages), "stage_rates_items_per_s": dict(self.stage_rates)}


@dataclass(frozen=True)
class SubmitResult:
    """What one submission did: the job, whether it was new, and what happened to each item."""

    job: JobInfo
    created: bool
    added: int  # new valid items, now queued
    duplicates: int  # ids the job already had with the same content: not enqueued again
    invalid: int  # new malformed items, recorded as failed
    conflicts: list[str] = field(default_factory=list)  # ids the job already had with other content

    def to_dict(self) -> dict:
        return {**self.job.to_dict(), "created": self.created, "added": self.added,
                "duplicates": self.duplicates, "invalid": self.invalid, "conflicts": self.conflicts}


@dataclass(frozen=True)
class ResultRecord:
    """One finished item from the results stream. ``cursor`` resumes after it."""

    cursor: str
    item_id: str
    state: ItemState
    attempts: int
    meta: dict = field(default_factory=dict)  # format, media_type, sample_rate, duration_s, timings, ...
    audio: bytes | None = None  # results kept in Redis
    path: str | None = None  # results kept in results_dir
    error: str | None = None
    error_type: str | None = None


class JobNotFound(KeyError):
    """No such job (never existed, or expired after result_ttl_s)."""


class JobCancelled(RuntimeError):
    """Items cannot be added to a cancelled job."""


def _s(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _f(value: bytes | None) -> float | None:
    return None if value in (None, b"") else float(value)


class JobStore:
    """Jobs in Redis (asyncio). One instance per event loop; it holds no state besides the client."""

    def __init__(self, client: aioredis.Redis, *, keys: BatchKeys = BatchKeys(),
                 result_ttl_s: int = 7 * 24 * 3600, clock=time.time):
        self.redis = client
        self.keys = keys
        self.ttl = int(result_ttl_s)
        self.clock = clock
        self._create = client.register_script(_CREATE)
        self._add = client.register_script(_ADD)
        self._cancel = client.register_script(_CANCEL)

    def _base(self) -> list:
        return [self.keys.prefix, self.ttl, repr(self.clock())]

    @classmethod
    def from_config(cls, client: aioredis.Redis, cfg, keys: BatchKeys = BatchKeys()) -> "JobStore":
        """Build from a :class:`serving.config.BatchConfig` (result_ttl_s)."""
        return cls(client, keys=keys, result_ttl_s=cfg.result_ttl_s)

    async def ensure_group(self) -> None:
        """Create the work stream's consumer group (items are enqueued right after)."""
        await ensure_group(self.redis, self.keys)

    async def submit(self, records: Sequence[ItemRecord], job_key: str | None = None,
                     owner: str = "", quota: Quota | None = None) -> SubmitResult:
        """Create the job (or find the one ``job_key`` names among ``owner``'s) and add the items it lacks.

        ``owner`` is an opaque tenant id (a hash of the API key; "" when there are no keys): a job key
        names a job only among its owner's jobs. With a ``quota``, a submission that would take the
        owner past one of its limits raises QuotaExceeded before anything is written (a resubmission
        that adds no new item always passes). Submissions of one owner that arrive at the same moment
        are checked against the same usage, so together they may pass a limit by what they carry."""
        await self.ensure_group()
        meta = msgpack.packb({"job_key": job_key, "submitted_at": self.clock()})
        scoped = "" if not job_key else (f"{owner}:{job_key}" if owner else job_key)
        if quota is not None:
            await check_quota(self.redis, self.keys, records, scoped, owner, quota)
        job_id, created = await self._create(args=[*self._base(), f"b_{uuid.uuid4().hex}", scoped, meta,
                                                   owner or "-"])
        return await self.add_items(job_id.decode(), records, created=bool(created))

    async def list_jobs(self, owner: str = "", after: str | None = None, limit: int = 20) -> tuple[list[JobInfo], bool]:
        """``owner``'s jobs, newest first, starting after the job ``after``. -> (jobs, more after them?)

        Raises JobNotFound when ``after`` is not one of the owner's jobs. Expired jobs are dropped
        from the owner's index as they are met."""
        key = self.keys.owner_jobs(owner)
        start = 0
        if after is not None:
            rank = cast(int | None, await self.redis.zrevrank(key, after))
            if rank is None:
                raise JobNotFound(after)
            start = rank + 1
        jobs: list[JobInfo] = []
        while True:
            # one more than a page: is there more?
            ids = cast(list[bytes], await self.redis.zrevrange(key, start, start + limit))
            if not ids:
                return jobs, False
            for raw in ids:
                info = await self.get(raw.decode())
                if info is None or not info.owned_by(owner):  # expired: out of the index
                    await self.redis.zrem(key, raw)
                    continue
                if len(jobs) == limit:
                    return jobs, True
                jobs.append(info)
                start += 1
        return jobs, True

    async def add_items(self, job_id: str, records: Sequence[ItemRecord], created: bool = False) -> SubmitResult:
        """Add items to an existing job; ids it already has are not enqueued again.

        Raises JobNotFound, or JobCancelled (a cancelled job takes no more items).
        """
        added = dups = invalid = 0
        conflicts: list[str] = []
        for start in range(0, len(records), ADD_CHUNK):
            args = [*self._base(), job_id, self.keys.queue]
            for r in records[start:start + ADD_CHUNK]:
                args += [r.id, r.pack(), r.error or ""]
            out = await self._add(args=args)
            if out[0] == -1:
                raise JobNotFound(job_id)
            if out[0] == -2:
                raise JobCancelled(job_id)
            added, dups, invalid = added + out[0], dups + out[1], invalid + out[2]
            conflicts += [c.decode() for c in out[3]]
        job = await self.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return SubmitResult(job=job, created=created, added=added, duplicates=dups,
                            invalid=invalid, conflicts=conflicts)

    async def get(self, job_id: str) -> JobInfo | None:
        """Status, counts, rate and ETA of a job; None if there is no such job."""
        h = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.job(job_id)))
        if not h:
            return None
        counts = JobCounts(**{f: int(h.get(f.encode(), 0)) for f in JobCounts.__dataclass_fields__})
        started, finished = _f(h.get(b"started_at")), _f(h.get(b"finished_at"))
        done = counts.succeeded + counts.failed + counts.cancelled
        if h.get(b"status") == b"cancelled":
            state = JobState.CANCELLED
        elif counts.total and done == counts.total:
            state = JobState.COMPLETED
        elif started is not None:
            state = JobState.RUNNING
        else:
            state = JobState.QUEUED
        rate = eta = None
        processed = int(h.get(b"processed", 0))
        elapsed = None if started is None else max((finished or self.clock()) - started, 1e-6)
        if elapsed is not None and processed:
            rate = processed / elapsed
            if state in (JobState.QUEUED, JobState.RUNNING):
                eta = (counts.queued + counts.running) / rate
        open_job = state in (JobState.QUEUED, JobState.RUNNING)
        stages = await self._stage_counts(job_id) if open_job else {}
        rates = {} if elapsed is None else {s: int(h.get(f"passed:{s}".encode(), 0)) / elapsed for s in STAGES}
        if open_job:
            eta = stage_eta(counts, stages, rates) or eta
        owner = _s(h.get(b"owner")) or "-"
        job_key = _s(h.get(b"jobkey")) or None
        if job_key and owner != "-":
            job_key = job_key.removeprefix(f"{owner}:")
        return JobInfo(job_id=job_id, state=state, counts=counts, created_at=float(h[b"created_at"]),
                       started_at=started, finished_at=finished, job_key=job_key,
                       rate_items_per_s=rate, eta_s=eta, stages=stages, stage_rates=rates, owner=owner)

    async def _stage_counts(self, job_id: str) -> dict[str, int]:
        """Running items by stage (the hash holds only items in flight, so it stays small)."""
        stages = {s: 0 for s in STAGES}
        for value in cast(list[bytes], await self.redis.hvals(self.keys.job(job_id, "stage"))):
            if value.decode() in stages:
                stages[value.decode()] += 1
        return stages

    async def cancel(self, job_id: str) -> JobInfo | None:
        """Cancel a job: queued items will not run, in-flight results are discarded, and the item requests are
        dropped from Redis at once (its results so far stay until the job expires). None if unknown.

        Cancelling a finished job changes nothing (its status stays completed).
        """
        code = await self._cancel(args=[*self._base(), job_id])
        if code == 0:
            return None
        return await self.get(job_id)

    async def results(self, job_id: str, after: str = "0", count: int = 100,
                      block_ms: int | None = None) -> list[ResultRecord]:
        """Finished items after the cursor ``after`` (a results-stream id; "0" from the start).

        With ``block_ms`` it waits that long for the next result when none is there yet.
        """
        key = self.keys.job(job_id, "results")
        if block_ms:
            got = cast(StreamRead, await self.redis.xread({key: after}, count=count, block=block_ms))
            entries = got[0][1] if got else []
        else:
            low = f"({after}" if after != "0" else "-"
            entries = cast(list[StreamEntry], await self.redis.xrange(key, min=low, count=count))
        return [_record(eid, fields) for eid, fields in entries]

    async def item_states(self, job_id: str) -> dict[str, ItemState]:
        """State of every item (for tests and debugging: reads the whole hash)."""
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.job(job_id, "state")))
        return {k.decode(): ItemState(v.decode()) for k, v in raw.items()}

    async def item(self, job_id: str, item_id: str) -> ItemRecord | None:
        data = cast(bytes | None, await self.redis.hget(self.keys.job(job_id, "items"), item_id))
        return None if data is None else ItemRecord.unpack(data)


def stage_eta(counts: JobCounts, stages: dict[str, int], rates: dict[str, float]) -> float | None:
    """Seconds until the job is done, from each stage's rate: the pipeline is as fast as its slowest stage.

    Stage s still has to see every queued item and every running item not past it yet. None until
    every stage has passed at least one item (no rate to go by).
    """
    if not rates or any(rates.get(s, 0) <= 0 for s in STAGES):
        return None
    etas = []
    for i, stage in enumerate(STAGES):
        past = sum(stages.get(later, 0) for later in STAGES[i + 1:])
        etas.append((counts.queued + counts.running - past) / rates[stage])
    return max(0.0, max(etas))


async def open_store(cfg, keys: BatchKeys | None = None) -> JobStore:
    """Connect (PING; RedisUnavailable if that fails) and build the store from a BatchConfig, in this loop."""
    from bark_serve.cluster.redis_conn import aconnect

    keys = keys or BatchKeys(getattr(cfg, "key_prefix", "bark"))
    return JobStore.from_config(await aconnect(cfg.redis()), cfg, keys)


def _record(entry_id: bytes, fields: dict[bytes, bytes]) -> ResultRecord:
    meta = msgpack.unpackb(fields[b"meta"], raw=False) if b"meta" in fields else {}
    return ResultRecord(cursor=entry_id.decode(), item_id=fields[b"id"].decode(),
                        state=ItemState(fields[b"state"].decode()), attempts=int(fields.get(b"attempts", 0)),
                        meta=meta, audio=fields.get(b"audio"), path=_s(fields.get(b"path")),
                        error=_s(fields.get(b"error")), error_type=_s(fields.get(b"error_type")))
