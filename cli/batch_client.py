"""The HTTP client of ``bark-serve batch``: the batch API's calls, and riding out outages.

``Retrier`` retries what a running submit waits out (connection errors, 5xx and 429 answers) with
exponential backoff and jitter, at least the server's Retry-After, until ``--timeout`` or, without
one, until a single outage has lasted ``MAX_OUTAGE_S``; it prints one notice line per outage.
"""

from __future__ import annotations

import json
import random
import sys
import time

import httpx
from tqdm import tqdm

from .common import CliError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
MAX_OUTAGE_S = 600.0  # without --timeout, one outage longer than this ends the run (exit 1; re-run resumes)


class ServerBusy(CliError):
    """A 5xx or 429 answer: the server (or its Redis) is restarting or overloaded; worth retrying."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message, EXIT_FAILED)
        self.retry_after_s = retry_after_s


class OutOfTime(Exception):
    """``--timeout`` ran out while waiting for the server to come back."""


TRANSIENT = (ServerBusy, httpx.TransportError)  # what a submit run waits out


def describe(exc: BaseException) -> str:
    """A short description of a transient failure for the one-line notice."""
    if isinstance(exc, ServerBusy):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"[:160]


def notice(message: str) -> None:
    """One line on stderr that does not break the progress bar."""
    tqdm.write(f"notice: {message}", file=sys.stderr)


class Retrier:
    """Waits out outages: exponential backoff with jitter, one notice per outage, bounded by the deadline.

    ``wait(exc)`` sleeps before the next try, or raises OutOfTime past ``deadline`` (monotonic seconds) or
    CliError once one outage has lasted ``max_outage_s`` (when there is no deadline).
    ``ok()`` marks the end of an outage.
    """

    def __init__(self, deadline: float | None, max_outage_s: float = MAX_OUTAGE_S, base_s: float = 0.5,
                 cap_s: float = 10.0, sleep=time.sleep, rng: random.Random | None = None):
        self.deadline, self.max_outage_s, self.base_s, self.cap_s = deadline, max_outage_s, base_s, cap_s
        self.sleep, self.rng = sleep, rng or random.Random()
        self.outage_since: float | None = None
        self.tries = 0
        self.outages = 0

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, retried while it fails transiently."""
        while True:
            try:
                result = fn(*args, **kwargs)
            except TRANSIENT as exc:
                self.wait(exc)
                continue
            self.ok()
            return result

    def wait(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since, self.tries = now, 0
            self.outages += 1
            notice(f"server unavailable ({describe(exc)}); retrying until it is back")
        self.tries += 1
        delay = min(self.cap_s, self.base_s * 2 ** (self.tries - 1))
        delay = self.rng.uniform(delay / 2, delay)  # jitter: clients of one outage do not return in step
        if isinstance(exc, ServerBusy) and exc.retry_after_s:
            delay = max(delay, min(exc.retry_after_s, self.cap_s))
        if self.deadline is not None and now + delay >= self.deadline:
            raise OutOfTime()
        if self.deadline is None and now + delay - self.outage_since > self.max_outage_s:
            raise CliError(f"the server has been unavailable for {now - self.outage_since:.0f} s "
                           f"({describe(exc)}); re-run to resume", EXIT_FAILED)
        self.sleep(delay)

    def ok(self) -> None:
        self.outage_since = None


class BatchClient:
    """A small HTTP client of /v1/batches."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _check(self, resp: httpx.Response) -> dict:
        if resp.status_code < 400:
            return resp.json()
        try:
            message = resp.json()["error"]["message"]
        except Exception:
            message = resp.text[:200] or resp.reason_phrase
        if resp.status_code >= 500 or resp.status_code == 429:
            raise ServerBusy(f"server answered {resp.status_code}: {message}", _retry_after(resp))
        raise CliError(f"server answered {resp.status_code}: {message}", EXIT_USAGE)

    def submit(self, lines: list[str], job_key: str) -> dict:
        body = ("\n".join(lines) + "\n").encode()
        return self._check(self.http.post("/v1/batches", content=body, headers={
            "Content-Type": "application/jsonl", "Idempotency-Key": job_key}))

    def status(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/v1/batches/{job_id}"))

    def cancel(self, job_id: str) -> dict:
        return self._check(self.http.delete(f"/v1/batches/{job_id}"))

    def results(self, job_id: str, after: str, wait_s: float):
        """Yield result records (dicts) of one followed stream; the last is the ``end`` record."""
        params = {"after": after, "follow": "true", "wait_s": f"{wait_s:.1f}"}
        timeout = httpx.Timeout(30.0, read=wait_s + 30.0)
        with self.http.stream("GET", f"/v1/batches/{job_id}/results", params=params, timeout=timeout) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            for line in resp.iter_lines():
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except ValueError:  # a line cut short by a dying server
                        raise ServerBusy("the results stream broke off mid-record") from None
                    yield rec


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers.get("retry-after", ""))
    except ValueError:
        return None
