"""What a request's failure becomes (serving/errors.to_api_error), and what the replica log says of it."""

from __future__ import annotations

import asyncio
import logging

import pytest
import ray.serve.exceptions  # noqa: F401  (importing Serve sets up its logger: before a test adds a handler)
from ray.exceptions import RayTaskError, TaskCancelledError

from bark_serve.serving.errors import to_api_error


@pytest.fixture
def records():
    """What the replica logger (``ray.serve``, which does not propagate to the root) records."""
    got: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = got.append
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.mark.parametrize("exc", [TaskCancelledError(), asyncio.CancelledError(),
                                 RayTaskError("stage.run", "remote traceback", TaskCancelledError())],
                         ids=["ray-task", "asyncio", "wrapped-by-ray"])
def test_a_client_disconnect_is_logged_at_info_without_a_traceback(exc, records):
    """Issue 25: 2 of 30 disconnects were logged at ERROR as "unexpected error" with a TaskCancelledError traceback."""
    err = to_api_error(exc)
    assert err.status == 499 and err.code == "cancelled"
    assert [r.levelno for r in records] == [logging.INFO]
    assert records[0].exc_info is None and "cancelled" in records[0].getMessage()


def test_an_unexpected_error_is_still_logged_with_its_traceback(records):
    err = to_api_error(RuntimeError("boom"))
    assert err.status == 500 and records[-1].levelno == logging.ERROR and records[-1].exc_info


def test_every_error_answer_is_counted_by_code_and_route_whoever_wrote_it():
    """Issue 25: after 16 x 429 and many 401/404/422, bark_http_errors_total had only code="400". Errors that
    an endpoint returns itself (the batch router's guard: 429 quota_exceeded, 503 store_unavailable) passed
    by the exception handlers that counted; so did a lost replica's 503. Real FastAPI app, real ASGI stack."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient
    from ray.exceptions import RayActorError

    from bark_serve.serving.errors import APIError
    from bark_serve.serving.routes import ErrorCounter, install_error_handlers

    counted: list[tuple[int, str]] = []
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(ErrorCounter, on_error=lambda code, route: counted.append((code, route)))

    @app.get("/raised/{n}")
    async def raised(n: int):
        raise APIError(429, "slow down", "rate_limited")

    @app.get("/returned")
    async def returned():
        return JSONResponse({"error": {"message": "store down"}}, status_code=503)

    @app.get("/lost")
    async def lost():
        raise RayActorError()

    @app.get("/bug")
    async def bug():
        raise RuntimeError("a bug")

    @app.get("/fine")
    async def fine():
        return {"ok": True}

    with TestClient(app, raise_server_exceptions=False) as client:
        answers = [client.get(p) for p in ("/raised/1", "/raised/x", "/returned", "/lost", "/bug", "/nowhere", "/fine")]
    assert [r.status_code for r in answers] == [429, 422, 503, 503, 500, 404, 200]
    assert counted == [(429, "/raised/{n}"), (422, "/raised/{n}"), (503, "/returned"), (503, "/lost"),
                       (500, "/bug"), (404, "unmatched")]
    for r in answers[:-1]:  # each in the API's error shape, never a trace
        assert set(r.json()["error"]) >= {"message"} and "Traceback" not in r.text
