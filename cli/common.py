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
