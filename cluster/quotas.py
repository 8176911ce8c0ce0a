"""Per-tenant quotas of batch jobs: what one API key holds (open jobs, queued or running items, result bytes
kept, item request bytes kept), read from its job index in Redis, and the check a submission passes before the
job store writes it.

A tenant is the owner a job stores (a hash of its API key, "-" without keys; cluster/jobs.py). Usage is
summed over the owner's unexpired jobs in one pipelined read; submissions of one owner that arrive at the
same moment are checked against the same usage, so together they may pass a limit by what they carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from bark_serve.cluster.batch_types import BatchKeys, ItemRecord

PIPELINE_CHUNK = 500  # item ids looked up per round trip


@dataclass(frozen=True)
class Quota:
    """What one tenant (API key) may hold at once; None: no limit. Checked when a submission arrives."""

    max_jobs_in_flight: int | None = None  # jobs with queued or running items
    max_items_queued: int | None = None  # items queued or running, over all its jobs
    max_result_bytes: int | None = None  # audio kept (in Redis and results_dir) until the jobs expire
    max_request_bytes: int | None = None  # item requests kept in Redis by jobs not cancelled, until they expire


@dataclass(frozen=True)
class Usage:
    """What one tenant holds now."""

    jobs_in_flight: int = 0
    items_queued: int = 0
    result_bytes: int = 0
    request_bytes: int = 0


class QuotaExceeded(Exception):
    """A submission would take its tenant past a limit of its :class:`Quota` (HTTP 429)."""

    def __init__(self, limit: str, value: int, message: str):
        super().__init__(message)
        self.limit, self.value = limit, value


async def tenant_usage(redis: aioredis.Redis, keys: BatchKeys, owner: str = "") -> Usage:
    """What ``owner``'s unexpired jobs hold: open jobs, queued or running items, result and request bytes."""
    ids = cast(list[bytes], await redis.zrange(keys.owner_jobs(owner), 0, -1))  # bytes: see cluster/redis_conn.py
    if not ids:
        return Usage()
    pipe = redis.pipeline(transaction=False)
    for raw in ids:
        pipe.hmget(keys.job(raw.decode()), "queued", "running", "status", "result_bytes", "request_bytes", "owner")
    jobs = items = size = requests = 0
    for queued, running, status, result_bytes, request_bytes, job_owner in await pipe.execute():
        if job_owner is None or job_owner.decode() != (owner or "-"):  # expired
            continue
        open_items = int(queued or 0) + int(running or 0)
        jobs += open_items > 0 and status != b"cancelled"
        items += open_items
        size += int(result_bytes or 0)
        requests += int(request_bytes or 0)  # 0 once cancelled: the script drops the requests
    return Usage(jobs, items, size, requests)


async def _new_records(redis: aioredis.Redis, keys: BatchKeys, job_id: str,
                       records: Sequence[ItemRecord]) -> list[ItemRecord]:
    """Those of ``records`` the job does not hold yet."""
    new: list[ItemRecord] = []
    for start in range(0, len(records), PIPELINE_CHUNK):
        chunk = records[start:start + PIPELINE_CHUNK]
        pipe = redis.pipeline(transaction=False)
        for r in chunk:
            pipe.hexists(keys.job(job_id, "items"), r.id)
        new += [r for r, held in zip(chunk, await pipe.execute()) if not held]
    return new


async def check_quota(redis: aioredis.Redis, keys: BatchKeys, records: Sequence[ItemRecord], scoped_key: str,
                      owner: str, quota: Quota) -> None:
    """Raise QuotaExceeded if adding ``records`` (to the job ``scoped_key`` names, or to a new job) would take
    ``owner`` past ``quota``; a submission that adds no new item always passes."""
    existing = None
    if scoped_key:
        jid = cast(bytes | None, await redis.get(keys.jobkey(scoped_key)))
        if jid is not None and await redis.exists(keys.job(jid.decode())):
            existing = jid.decode()
    fresh = list(records) if existing is None else await _new_records(redis, keys, existing, records)
    new = sum(r.error is None for r in fresh)  # a malformed item fails at once: it holds no place in the queue
    usage = await tenant_usage(redis, keys, owner)
    if existing is None and quota.max_jobs_in_flight is not None and usage.jobs_in_flight >= quota.max_jobs_in_flight:
        raise QuotaExceeded("max_jobs_in_flight", quota.max_jobs_in_flight,
                            f"quota max_jobs_in_flight ({quota.max_jobs_in_flight} per API key) reached: "
                            f"{usage.jobs_in_flight} of your jobs are queued or running; wait for one to "
                            "finish, cancel one, or add to one with its Idempotency-Key")
    if not fresh:
        return
    if quota.max_request_bytes is not None:
        adds = sum(len(r.pack()) for r in fresh)  # as the job stores them (a malformed item's too)
        if usage.request_bytes + adds > quota.max_request_bytes:
            raise QuotaExceeded("max_request_bytes", quota.max_request_bytes,
                                f"quota max_request_bytes ({quota.max_request_bytes} per API key) exceeded: your "
                                f"jobs keep {usage.request_bytes} bytes of item requests until they expire and "
                                f"this submission adds {adds}; cancel a job (which drops its requests at once), "
                                "submit less, or wait for jobs to expire")
    if new == 0:
        return
    if quota.max_result_bytes is not None and usage.result_bytes >= quota.max_result_bytes:
        raise QuotaExceeded("max_result_bytes", quota.max_result_bytes,
                            f"quota max_result_bytes ({quota.max_result_bytes} per API key) reached: your "
                            f"jobs keep {usage.result_bytes} bytes of results until they expire")
    if quota.max_items_queued is not None and usage.items_queued + new > quota.max_items_queued:
        raise QuotaExceeded("max_items_queued", quota.max_items_queued,
                            f"quota max_items_queued ({quota.max_items_queued} per API key) exceeded: "
                            f"{usage.items_queued} of your items are queued or running and this submission "
                            f"adds {new}; submit fewer, or later")
