"""What every ``bark-serve`` command module shares: the error type and exit codes, the server URL.

``main.py`` (the parser) and the command modules (``up.py``, ``batch.py``, ...) import this small
module, never each other, so there is no import cycle and ``--help`` stays light.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2
DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "BARK_URL"
DEPRECATED_URL_ENV = "BARK_SERVE_URL"  # what `batch` read before; still honoured, with a warning


class CliError(Exception):
    """What a command reports in one line on stderr, and the exit code it leaves with (2: the user's mistake)."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def number(kind: type = float, low: float | None = None, high: float | None = None,
           above: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: ``kind`` (float or int) that is finite and within [low, high] (``above``: over
    ``low``, not equal), else argparse's one-line error, exit 2 (NaN and infinity would slip past every
    comparison: a NaN timeout never ends, a NaN flush interval never flushes)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value < low or (above and value == low)):
            raise argparse.ArgumentTypeError(f"{text} must be {'over' if above else 'at least'} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be at most {high:g}")
        return value

    return parse


def check_text(text: str, what: str = "TEXT") -> str:
    """Text from the command line as UTF-8 can carry it: argv bytes that are not UTF-8 arrive as lone
    surrogates, which no encoder and no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CliError(f"{what} is not valid UTF-8 text") from None
    return text


def check_output_path(path: str, what: str = "-o") -> str:
    """An output file that can be written where it is named, checked before any work (not after minutes of
    synthesis): not a directory, in an existing directory this process may write to."""
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise CliError(f"{what} {path!r} is a directory; name a file")
    if not os.path.isdir(parent):
        raise CliError(f"{what} {path!r}: no such directory {parent!r}")
    if not os.access(parent, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise CliError(f"{what} {path!r}: not writable here")
    return path


def write_output(path: str, data: bytes, what: str = "-o") -> None:
    """Write an output file; a refusal of the system (disk full, ...) is a CliError naming the file."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise CliError(f"cannot write {what} {path!r}: {exc.strerror or exc}") from None


def server_url(explicit: str | None) -> str:
    """--url, else $BARK_URL, else the deprecated $BARK_SERVE_URL, else the local default; a CliError (exit 2)
    unless it is an http(s) URL with a host (``localhost:8000`` alone would be retried as an outage)."""
    url = explicit
    if not url and os.environ.get(URL_ENV):
        url = os.environ[URL_ENV]
    if not url and os.environ.get(DEPRECATED_URL_ENV):
        print(f"bark-serve: warning: {DEPRECATED_URL_ENV} is deprecated, set {URL_ENV} instead", file=sys.stderr)
        url = os.environ[DEPRECATED_URL_ENV]
    return check_url(url or DEFAULT_URL)


def check_url(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a port out of range or not a number raises here)
    except ValueError as exc:
        raise CliError(f"server URL {url[:200]!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"server URL {url[:200]!r} must start with http:// or https:// and name a host "
                       f"(e.g. {DEFAULT_URL})")
    return url


# A Unix socket path holds at most 107 bytes. Ray puts its sockets at
# <temp dir>/session_<YYYY-mm-dd_HH-MM-SS_ffffff>_<pid>/sockets/plasma_store.
_SOCKET_PATH_MAX = 107
_RAY_SOCKET_TAIL = len("/session_2026-12-04_18-29-05_123456_/sockets/plasma_store")


def ray_temp_dir(command: str) -> str:
    """A fresh temp dir for a local Ray instance under ``RAY_TMPDIR`` (created if missing), named short
    (``br`` + 8 characters) so that Ray's socket paths fit; a RAY_TMPDIR too long for them is a CliError
    saying so, before Ray is started and with nothing left behind."""
    import tempfile

    base = os.path.abspath(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    longest = len(base) + len("/br12345678") + _RAY_SOCKET_TAIL + len(str(os.getpid()))
    if longest > _SOCKET_PATH_MAX:
        raise CliError(f"could not start a local Ray instance: RAY_TMPDIR={base!r} is too long: Ray's socket paths "
                       f"under it would be {longest} bytes, over the {_SOCKET_PATH_MAX} a Unix socket allows (keep it "
                       f"under {_SOCKET_PATH_MAX - longest + len(base)} characters, e.g. /tmp/ray)")
    try:
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix="br", dir=base)
    except OSError as exc:
        raise CliError(f"{command}: cannot make Ray's temp dir under RAY_TMPDIR={base!r}: {exc.strerror}") from None
