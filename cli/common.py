"""What every ``bark-serve`` command module shares: the error type and exit codes, the server URL.

``main.py`` (the parser) and the command modules (``up.py``, ``batch.py``, ...) import this small
module, never each other, so there is no import cycle and ``--help`` stays light.
"""

from __future__ import annotations

import os
import sys

EXIT_USAGE = 2
DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "BARK_URL"
DEPRECATED_URL_ENV = "BARK_SERVE_URL"  # what `batch` read before; still honoured, with a warning


class CliError(Exception):
    """What a command reports in one line on stderr, and the exit code it leaves with (2: the user's mistake)."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def server_url(explicit: str | None) -> str:
    """--url, else $BARK_URL, else the deprecated $BARK_SERVE_URL, else the local default."""
    if explicit:
        return explicit
    if os.environ.get(URL_ENV):
        return os.environ[URL_ENV]
    if os.environ.get(DEPRECATED_URL_ENV):
        print(f"bark-serve: warning: {DEPRECATED_URL_ENV} is deprecated, set {URL_ENV} instead", file=sys.stderr)
        return os.environ[DEPRECATED_URL_ENV]
    return DEFAULT_URL


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
