"""Errors of the HTTP API, answered OpenAI-style: ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import asyncio
import logging

from fastapi.responses import JSONResponse
from redis.exceptions import OutOfMemoryError, RedisError

from bark_serve.cluster.redis_conn import RedisUnavailable
from bark_serve.stages.audio_in import MissingPackage
from bark_serve.stages.plan import TextTooLarge
from bark_serve.stages.text import TextTooLongError
from bark_serve.stages.types import CheckpointError, CloningUnavailable, InvalidRequestError, RequestCrashedStage
from bark_serve.stages.voices import UnknownVoiceError

from .scheduler import QueueFull, ReplicaPoisoned, StageError

log = logging.getLogger("ray.serve")  # shows in the replica logs


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.retry_after = status, message, code, type_, retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        body = {"error": {"message": self.message, "type": self.type, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def store_failure(exc: BaseException, store: str) -> APIError | None:
    """A store's failure (a Redis that is full, hung or away; a folder that cannot be written) as the API's 503
    with ``Retry-After``, ``store_full`` or ``store_unavailable``; None for any other exception. ``store``
    names it in the message ("the batch job store")."""
    if isinstance(exc, OutOfMemoryError):  # maxmemory with noeviction: writes are refused, nothing is lost
        log.warning("%s is full: %s", store, exc)
        return APIError(503, f"{store} is full (maxmemory reached); retry later", "store_full",
                        "server_error", retry_after=30)
    if isinstance(exc, (RedisError, RedisUnavailable, OSError)):
        log.warning("%s unavailable: %s", store, exc)
        return APIError(503, f"{store} is unavailable; retry later", "store_unavailable", "server_error",
                        retry_after=2)
    return None


def overloaded(message: str, retry_after: int, status: int = 503) -> APIError:
    code = "rate_limited" if status == 429 else "overloaded"
    return APIError(status, message, code, "server_error" if status == 503 else "rate_limit_error", retry_after)


def unwrap(exc: BaseException) -> BaseException:
    """The original exception of a Ray task/actor error (whose str() is a whole remote traceback)."""
    cause = getattr(exc, "cause", None)
    while cause is not None and cause is not exc:
        exc, cause = cause, getattr(cause, "cause", None)
    return exc


def _cancelled(exc: BaseException) -> bool:
    """A cancellation, local or of a Ray task (what a client disconnect leaves behind)."""
    from ray.exceptions import TaskCancelledError

    return isinstance(exc, (asyncio.CancelledError, TaskCancelledError))


def to_api_error(exc: BaseException, retry_after: int = 2) -> APIError:
    """Map whatever a request raised (possibly across Ray) to the answer the client gets."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(exc, APIError):
        return exc
    exc = unwrap(exc)
    if isinstance(exc, TextTooLarge):
        return APIError(413, str(exc), "input_too_large")
    if isinstance(exc, UnknownVoiceError):
        return APIError(400, str(exc), "voice_not_found")
    if isinstance(exc, TextTooLongError):
        return APIError(400, str(exc), "input_too_long")
    if isinstance(exc, MissingPackage):  # an optional feature this host lacks: the server's, not the client's
        return APIError(503, str(exc), "missing_package", "server_error")
    if isinstance(exc, CloningUnavailable):
        return APIError(503, str(exc), "voice_cloning_unavailable", "server_error")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), "invalid_request")
    if isinstance(exc, (QueueFull, BackPressureError)):
        return overloaded("the server is at capacity; retry shortly", retry_after)
    if isinstance(exc, DeploymentUnavailableError):
        return overloaded("a pipeline stage is unavailable; retry shortly", retry_after)
    if isinstance(exc, (RayActorError, ReplicaUnavailableError)):  # a stage replica died (Serve restarts it)
        log.warning("stage replica lost: %s", type(exc).__name__)
        return overloaded("a pipeline stage replica was lost and is restarting; retry shortly", retry_after)
    if isinstance(exc, ReplicaPoisoned):  # a stage replica's GPU broke (Serve replaces it): the retries hit it
        log.warning("stage replica unusable: %s", exc)
        return overloaded("a pipeline stage replica failed and is being replaced; retry shortly", retry_after)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return APIError(504, "the request took longer than the server's timeout", "timeout", "server_error")
    if isinstance(exc, CheckpointError):  # a broken deployment, not a bad request: never a 4xx
        log.error("checkpoint error: %s", exc)
        return APIError(500, "the server's model checkpoint is broken; see the server log", "server_misconfigured",
                        "server_error")
    if isinstance(exc, RequestCrashedStage):  # logged where it was decided (serving/stage_calls.py)
        return APIError(500, str(exc), "request_crashed_stage", "server_error")
    if isinstance(exc, StageError):
        log.error("stage error: %s", exc)
        return APIError(500, "a pipeline stage failed while processing this request", "stage_error", "server_error")
    if _cancelled(exc):  # the client went away and its work was cancelled: routine, no traceback
        log.info("request cancelled (client disconnected): %s", type(exc).__name__)
        return APIError(499, "the request was cancelled", "cancelled")
    log.error("unexpected error", exc_info=exc)
    return APIError(500, "internal error", "internal_error", "server_error")
