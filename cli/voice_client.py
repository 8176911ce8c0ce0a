"""``bark-serve voice add / list / rm``: registered voices on a running server (``/v1/voices``).

``voice add AUDIO --name NAME`` uploads a recording, which the server clones and keeps under the API key
(``--api-key``, else $BARK_API_KEY); ``voice list`` prints the key's voices (and, with ``--all``, the
presets and aliases); ``voice rm NAME_OR_ID`` deletes one. The server's JSON error becomes one line on
stderr: exit 2 for what the request got wrong (4xx), 1 when the server could not serve it (5xx, down).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import httpx

from .common import URL_ENV, CliError, server_url

EXIT_FAILED = 1
TIMEOUT_S = 600.0  # a clone of a long clip on a CPU replica takes a while


def register(voice_sub) -> None:
    """Add ``add``, ``list`` and ``rm`` to the ``voice`` command family."""
    p = voice_sub.add_parser("add", help="register a voice on a server from a recording",
                             description="Upload AUDIO to the server (POST /v1/voices); it clones the speaker and "
                                         "keeps the voice under your API key. Then name it anywhere a voice goes.")
    p.add_argument("audio", help="the recording (wav, flac, mp3, ogg/opus, m4a; at least 1 s)")
    p.add_argument("--name", required=True, help="the voice's name (letters, digits, _ - . and inner spaces)")
    _server_args(p)
    p.set_defaults(func=add)
    p = voice_sub.add_parser("list", help="list your voices on a server",
                             description="Your registered voices (GET /v1/voices); --all adds presets and aliases.")
    p.add_argument("--all", action="store_true", help="also the server's presets and aliases")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    _server_args(p)
    p.set_defaults(func=list_voices)
    p = voice_sub.add_parser("rm", help="delete one of your voices on a server",
                             description="Delete a registered voice (DELETE /v1/voices/{id}), by name or id.")
    p.add_argument("voice", help="the voice's name or id")
    _server_args(p)
    p.set_defaults(func=remove)


def _server_args(p) -> None:
    p.add_argument("--url", help=f"server URL (default ${URL_ENV}, else http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="API key (default $BARK_API_KEY)")


def _call(args, method: str, path: str, **kwargs) -> httpx.Response:
    key = args.api_key or os.environ.get("BARK_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = server_url(args.url).rstrip("/") + path
    try:
        r = httpx.request(method, url, headers=headers, timeout=TIMEOUT_S, **kwargs)
    except httpx.TransportError as exc:
        raise CliError(f"cannot reach the server at {url}: {type(exc).__name__}: {exc}", EXIT_FAILED) from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        raise CliError(f"{r.status_code}: {message}", 2 if r.status_code < 500 else EXIT_FAILED)
    return r


def add(args) -> int:
    path = Path(args.audio)
    if not path.is_file():
        raise CliError(f"no such file: {args.audio}")
    with path.open("rb") as f:
        voice = _call(args, "POST", "/v1/voices", files={"file": (path.name, f)}, data={"name": args.name}).json()
    print(f"added voice {voice['name']!r} ({voice['id']}, {voice['duration_s']:.1f} s of audio); "
          f"use it as --voice {voice['name']!r} or \"voice\": {json.dumps(voice['name'])}")
    return 0


def list_voices(args) -> int:
    data = _call(args, "GET", "/v1/voices").json()
    if args.json:
        print(json.dumps(data if args.all else data["custom"], indent=2))
        return 0
    for v in data["custom"]:
        print(f"{v['name']}\t{v['id']}\t{v['duration_s']:.1f} s")
    if not data["custom"]:
        print("(no voices of your own: add one with `bark-serve voice add AUDIO --name NAME`)")
    if args.all:
        print("presets: " + ", ".join(data["voices"]))
        print("aliases: " + ", ".join(f"{k} -> {v}" for k, v in data["aliases"].items()))
    return 0


def remove(args) -> int:
    gone = _call(args, "DELETE", f"/v1/voices/{quote(args.voice, safe='')}").json()
    print(f"deleted voice {gone['id']}")
    return 0
