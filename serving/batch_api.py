"""HTTP API of durable batch jobs: ``batch_router(store_factory)`` -> a FastAPI APIRouter.

Endpoints (mounted under ``/v1/batches``):

``POST /v1/batches``
    Body: JSONL (``application/jsonl`` or ``application/x-ndjson``; one item
    object a line, blank lines skipped) or msgpack (``application/msgpack``: an
    array of item maps). Item fields: ``id`` (optional, default the 0-based
    line/array index), ``text``, ``voice``, ``seed``, ``format``
    (wav|flac|pcm|mp3|opus|aac, default wav), ``options`` (dict, passed through).
    Idempotency: ``Idempotency-Key`` header (or ``?job_key=``) names the job:
    the same key returns the same job and adds only item ids it lacks; ids
    already there (queued, done or failed) are not enqueued again, and an id
    resent with other content is listed in ``conflicts`` and left alone. A
    cancelled job releases its key. Malformed items fail alone (reason in
    their result); the whole body is refused only when it cannot be read (400),
    has an unsupported type (415), is too large or has too many items (413), or
    has no items, duplicate or unusable ids (422). Answers 202 with the job.
``GET /v1/batches/{id}``
    Status (queued|running|completed|cancelled), counts by item state,
    ``rate_items_per_s`` and ``eta_s``.
``GET /v1/batches/{id}/results?after=CURSOR&limit=N&follow=true&wait_s=S``
    Streams finished items (succeeded and failed) in finishing order, JSONL
    with base64 audio by default, or a stream of msgpack maps with raw audio
    bytes when ``Accept: application/msgpack``. Every record carries its
    ``cursor``; pass the last one as ``after`` to resume. ``follow=true``
    keeps the stream open until the job is finished (or ``wait_s``). The last
    record is ``{"type": "end", "cursor", "status", "complete"}``; ``complete``
    true means the job is finished and every result up to it was sent.
``GET /v1/batches?after=ID&limit=N``
    The caller's jobs, newest first, OpenAI's list shape (``data``, ``first_id``, ``last_id``,
    ``has_more``); ``limit`` 1-100, default 20.
``DELETE /v1/batches/{id}``
    Cancels: queued items never run, in-flight results are discarded; the job
    ends ``cancelled``. A finished job is left as it is.

Tenancy: with API keys on, a job belongs to the key that made it (a hash of the key is stored, never
the key): another key gets 404 for it, its idempotency keys are its own, and its list shows only its
jobs. Without keys every caller is the same tenant.

Quotas (``BatchLimits.quota``, per tenant): jobs in flight, items queued or running, result bytes kept
(checked by the store before a submission writes anything), and open ``follow=true`` streams on this
replica: past one, 429 ``quota_exceeded`` naming it. A full Redis (maxmemory, noeviction) is 503
``store_full``.

Errors are OpenAI-style ``{"error": {"message", "type", "code"}}``, never a stack trace. Reading a
submission's body (limits, JSONL and msgpack, per-item checks) is serving/batch_submission.py.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import json
import logging
import math
import re
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import RedisError

from bark_serve.cluster.batch_types import (
    JOB_ID_RE,
    JOB_KEY_RE,
    ItemState,
    JobState,
)
from bark_serve.cluster.jobs import JobCancelled, JobNotFound, JobStore, ResultRecord
from bark_serve.cluster.quotas import QuotaExceeded
from bark_serve.schema.untrusted import clip

from .batch_submission import BatchLimits, media_type, parse_submission
from .errors import APIError, store_failure, to_api_error
from .http_api import MSGPACK_TYPES, read_limited

log = logging.getLogger("bark.batch.api")

CURSOR_RE = re.compile(r"^[0-9]{1,20}(-[0-9]{1,20})?$")
PARSE_INLINE_BYTES = 64 * 1024  # bigger submissions are parsed in a worker thread
FINISHED = (JobState.COMPLETED, JobState.CANCELLED)

StoreFactory = Callable[[], JobStore | Awaitable[JobStore]]


def _guard(endpoint):
    """Answer every failure of an endpoint in the API's error shape; the job store being away is a 503."""

    @functools.wraps(endpoint)
    async def wrapper(*args, **kwargs):
        try:
            return await endpoint(*args, **kwargs)
        except QuotaExceeded as exc:
            return APIError(429, str(exc), "quota_exceeded", "rate_limit_error", retry_after=30).response()
        except Exception as exc:  # APIError as it is; a bug is logged by to_api_error and answered without a trace
            return (store_failure(exc, "the batch job store (Redis)") or to_api_error(exc)).response()

    return wrapper


class _StoreCache:
    """One store per event loop: asyncio Redis clients belong to the loop that made them."""

    def __init__(self, factory: StoreFactory):
        self.factory = factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: JobStore | None = None

    async def get(self) -> JobStore:
        loop = asyncio.get_running_loop()
        if self._store is None or self._loop is not loop:
            store = self.factory()
            self._store = await store if inspect.isawaitable(store) else store
            self._loop = loop
        return self._store



def _job_id(job_id: str) -> str:
    if not JOB_ID_RE.match(job_id):
        raise APIError(404, f"no batch job {job_id[:80]!r}", "job_not_found")
    return job_id


def _not_found(job_id: str) -> APIError:
    return APIError(404, f"no batch job {clip(job_id, 80)!r} (unknown, or expired)", "job_not_found")


async def _result_dict(rec: ResultRecord) -> dict:
    out: dict = {"type": "result", "cursor": rec.cursor, "id": rec.item_id, "state": rec.state.value,
                 "attempts": rec.attempts}
    if rec.state is not ItemState.SUCCEEDED:
        out["error"] = {"message": rec.error, "type": rec.error_type}
        return out
    out.update(rec.meta)
    audio = rec.audio
    if rec.path is not None:
        try:
            audio = await asyncio.to_thread(Path(rec.path).read_bytes)
        except OSError:
            out["error"] = {"message": f"result file {rec.path} is missing", "type": "result_missing"}
    out["audio"] = audio
    return out


def _is_cursor(text: str) -> bool:
    """A Redis stream id as Redis takes it: ``ms`` or ``ms-seq``, each below 2**64, and not the largest id of
    all (nothing comes after it: Redis refuses an exclusive range from there). Else Redis errs: a 503."""
    if not CURSOR_RE.match(text):
        return False
    parts = [int(part) for part in text.split("-")]
    return all(part < 2**64 for part in parts) and parts != [2**64 - 1, 2**64 - 1]


def _query(request: Request) -> tuple[str, int, bool, float]:
    q = request.query_params
    after = q.get("after", "0") or "0"
    if not _is_cursor(after):
        raise APIError(400, f"after={clip(after, 40)!r} is not a cursor (use the 'cursor' of a result record)",
                       "invalid_cursor")
    try:
        limit = int(q.get("limit", "0")) or 10**12
        wait_s = float(q.get("wait_s", "0"))
    except ValueError:
        raise APIError(400, "limit must be an integer and wait_s a number", "invalid_parameter") from None
    if limit < 0 or not (0 <= wait_s < math.inf):  # NaN fails every comparison: it is refused here too
        raise APIError(400, "limit and wait_s must be finite and not negative", "invalid_parameter")
    follow = q.get("follow", "false").lower() in ("1", "true", "yes")
    return after, limit, follow, wait_s


async def _results(store: JobStore, job_id: str, after: str, limit: int, follow: bool, wait_s: float,
                   encode: Callable[[dict], bytes], limits: BatchLimits) -> AsyncGenerator[bytes, None]:
    cursor, sent, final = after, 0, False
    deadline = time.monotonic() + (min(wait_s, limits.follow_max_s) if wait_s else limits.follow_max_s)
    try:
        while sent < limit:
            page = await store.results(job_id, after=cursor, count=min(limits.page_size, limit - sent))
            if not page:
                if not follow or final or time.monotonic() > deadline:
                    break
                info = await store.get(job_id)
                # the finishing script writes the result before the state turns final: one last read settles it
                final = info is None or info.state in FINISHED
                if not final:
                    await store.results(job_id, after=cursor, count=1, block_ms=500)  # wait for the next result
                continue
            for rec in page:
                yield encode(await _result_dict(rec))
                cursor, sent = rec.cursor, sent + 1
        info = await store.get(job_id)
        status = info.state.value if info else "expired"
        tail = not await store.results(job_id, after=cursor, count=1) if info else True
        yield encode({"type": "end", "cursor": cursor, "status": status,
                      "complete": bool(info is None or info.state in FINISHED) and tail})
    except (RedisError, OSError) as exc:  # the status line is gone: tell the client in-band, it resumes
        log.warning("batch API: results stream of %s broke: %s", job_id, exc)
        yield encode({"type": "error", "cursor": cursor,
                      "error": {"message": "the job store became unavailable; resume from cursor",
                                "type": "service_unavailable", "code": "store_unavailable"}})


def _encoder(request: Request) -> tuple[Callable[[dict], bytes], str]:
    accept = request.headers.get("accept", "").lower()
    if any(t in accept for t in MSGPACK_TYPES):
        return (lambda d: msgpack.packb(d, use_bin_type=True)), "application/msgpack"

    def jsonl(d: dict) -> bytes:
        if isinstance(d.get("audio"), (bytes, bytearray)):
            d = {**d, "audio": base64.b64encode(d["audio"]).decode("ascii")}
        return (json.dumps(d, separators=(",", ":")) + "\n").encode()

    return jsonl, "application/jsonl"


def _list_query(request: Request) -> tuple[str | None, int]:
    q = request.query_params
    after = q.get("after") or None
    if after is not None and not JOB_ID_RE.match(after):
        raise APIError(400, f"after={clip(after, 40)!r} is not a batch id", "invalid_cursor")
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        raise APIError(400, "limit must be an integer in [1, 100]", "invalid_parameter") from None
    if not 1 <= limit <= 100:
        raise APIError(400, "limit must be an integer in [1, 100]", "invalid_parameter")
    return after, limit


def batch_router(store_factory: StoreFactory, *, limits: BatchLimits = BatchLimits(),
                 dependencies: Sequence[Any] = (), prefix: str = "/v1/batches",
                 owner_of: Callable[[Request], str] = lambda request: "") -> APIRouter:
    """The batch-job endpoints over the store that ``store_factory()`` returns (a JobStore, or an awaitable of one).

    The factory is called once per event loop. ``dependencies`` (e.g. the API-key check) apply to every route.
    ``owner_of(request)`` names the caller's tenant (a hash of its API key; "" without keys): a job is
    visible only to the tenant that made it (another gets 404), and idempotency keys are per tenant.
    """
    router = APIRouter(prefix=prefix, dependencies=list(dependencies), tags=["batches"])
    stores = _StoreCache(store_factory)
    following: dict[str, int] = {}  # tenant -> its open follow=true streams on this replica

    def release(owner: str) -> None:
        following[owner] -= 1
        if not following[owner]:
            del following[owner]

    def counted(owner: str, stream: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """A follow stream, counted against its tenant from the moment it is granted (in the same event-loop
        step as the cap check, so a burst of requests cannot pass the cap together) until it ends, is
        dropped, or is discarded without ever being read."""
        following[owner] = following.get(owner, 0) + 1
        released = False

        def release_once() -> None:
            nonlocal released
            if not released:
                released = True
                release(owner)

        async def body() -> AsyncGenerator[bytes, None]:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                release_once()
                await stream.aclose()

        gen = body()
        weakref.finalize(gen, release_once)  # a response never sent: its generator never runs its finally
        return gen

    async def owned(store: JobStore, job_id: str, request: Request):
        """The caller's job, else 404 (another tenant's job is answered as if it did not exist)."""
        info = await store.get(_job_id(job_id))
        if info is None or not info.owned_by(owner_of(request)):
            raise _not_found(job_id)
        return info

    @router.get("")
    @_guard
    async def list_batches(request: Request) -> Response:
        """The caller's jobs, newest first, as OpenAI lists batches: ``after`` (a batch id) and ``limit``."""
        after, limit = _list_query(request)
        try:
            jobs, more = await (await stores.get()).list_jobs(owner_of(request), after, limit)
        except JobNotFound:
            raise APIError(400, f"after={clip(after or '', 40)!r} is not one of your batches", "invalid_cursor") \
                from None
        data = [j.to_dict() for j in jobs]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})

    @router.post("", status_code=202)
    @_guard
    async def create_batch(request: Request) -> Response:
        job_key = request.headers.get("idempotency-key") or request.query_params.get("job_key")
        if job_key is not None and not JOB_KEY_RE.match(job_key):
            raise APIError(400, "Idempotency-Key must be 1-200 printable ASCII characters without spaces",
                           "invalid_idempotency_key")
        ctype = media_type(request.headers.get("content-type", ""))
        body = await read_limited(request, limits.max_body_bytes)
        # decoding and validating 100k items takes seconds: not on the event loop
        records = (parse_submission(body, ctype, limits) if len(body) <= PARSE_INLINE_BYTES
                   else await asyncio.to_thread(parse_submission, body, ctype, limits))
        store = await stores.get()
        try:
            result = await store.submit(records, job_key=job_key, owner=owner_of(request), quota=limits.quota)
        except (JobCancelled, JobNotFound):  # the keyed job was cancelled or expired while we added to it
            raise APIError(409, "the job was cancelled or expired during submission; resubmit",
                           "job_conflict") from None
        return JSONResponse(result.to_dict(), status_code=202,
                            headers={"Location": f"{prefix}/{result.job.job_id}"})

    @router.get("/{job_id}")
    @_guard
    async def get_batch(job_id: str, request: Request) -> Response:
        return JSONResponse((await owned(await stores.get(), job_id, request)).to_dict())

    @router.get("/{job_id}/results")
    @_guard
    async def get_results(job_id: str, request: Request) -> Response:
        after, limit, follow, wait_s = _query(request)
        store = await stores.get()
        await owned(store, job_id, request)
        encode, media_type = _encoder(request)
        stream = _results(store, job_id, after, limit, follow, wait_s, encode, limits)
        if follow:
            owner = owner_of(request)
            cap = limits.max_follow_streams
            if cap is not None and following.get(owner, 0) >= cap:
                raise APIError(429, f"quota max_follow_streams ({cap} per API key) reached: close a follow=true "
                                    "results stream first, or read without follow", "quota_exceeded",
                               "rate_limit_error", retry_after=5)
            stream = counted(owner, stream)
        return StreamingResponse(stream, media_type=media_type, headers={"Cache-Control": "no-store"})

    @router.delete("/{job_id}")
    @_guard
    async def cancel_batch(job_id: str, request: Request) -> Response:
        store = await stores.get()
        await owned(store, job_id, request)
        info = await store.cancel(job_id)
        if info is None:
            raise _not_found(job_id)
        return JSONResponse(info.to_dict())

    return router
