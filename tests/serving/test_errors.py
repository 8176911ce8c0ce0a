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
