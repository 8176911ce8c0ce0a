"""What every ``bark-serve`` command module shares: the usage error, its exit code, the server URL.

``cli.py`` (the parser) and the command modules (``up.py``, ``batch_cli.py``, ...) import this small
module, never each other, so there is no import cycle and ``--help`` stays light.
"""

from __future__ import annotations

import os
import sys

EXIT_USAGE = 2
DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "BARK_URL"
DEPRECATED_URL_ENV = "BARK_SERVE_URL"  # what `batch` read before; still honoured, with a warning


class UsageError(Exception):
    """A user error the CLI reports in one line with exit code 2."""


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
