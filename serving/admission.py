"""Admission: at most ``max_active_requests`` requests synthesize at once in one orchestrator replica.

Each admitted request holds a :class:`Slot`. A slot is released exactly once,
whatever happens: ``with admission.acquire() as slot:`` releases it when the
block ends (answered, failed or cancelled), unless the block hands it to a
streaming response (``release`` given to it, then :meth:`Slot.transfer`); the response then releases it
when its body ends, fails or is cancelled, or when the response is dropped
without ever being sent. No code path has to remember a decrement.
"""

from __future__ import annotations

from .errors import overloaded


class Slot:
    """One admitted request's place; ``release`` is idempotent."""

    def __init__(self, admission: "Admission"):
        self._admission = admission
        self._released = False
        self._transferred = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._active -= 1

    def transfer(self) -> None:
        """The slot now belongs to another owner (a streaming response that calls ``release``):
        the ``with`` block no longer releases it."""
        self._transferred = True

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        if not self._transferred:
            self.release()


class Admission:
    """Counts active requests against a limit; a full replica answers 429 with Retry-After."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after_s = limit, retry_after_s
        self._active = 0

    @property
    def active(self) -> int:
        return self._active

    @property
    def full(self) -> bool:
        return self._active >= self.limit

    def check(self) -> None:
        """Raise the 429 now if no slot is free (before reading a body or resolving anything)."""
        if self.full:
            raise overloaded(f"{self._active} requests in progress; retry shortly", self.retry_after_s, status=429)

    def acquire(self) -> Slot:
        """Take a slot (use it as a context manager), or raise the 429."""
        self.check()
        self._active += 1
        return Slot(self)
