"""Request parsing and response building of the HTTP API (used by the orchestrator's routes)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import msgpack
import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from bark_serve.schema.untrusted import check_plain_data, short_repr, summarize_errors
from bark_serve.stages import encoders as A
from bark_serve.stages.audio import PostProcess, join_segments
from bark_serve.stages.types import InvalidRequestError

from .errors import APIError, to_api_error
from .synthesis import AudioChunk

log = logging.getLogger("ray.serve")  # shows in the replica logs

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
JSON_TYPES = ("application/json", "")  # no Content-Type at all: JSON, as most clients mean
DECODE_INLINE_BYTES = 64 * 1024  # bigger bodies are decoded in a worker thread, off the event loop
M = TypeVar("M", bound=BaseModel)
REQUEST_ID_HEADER = "X-Bark-Request-Id"  # Ray Serve owns X-Request-Id (and takes the client's)


def wants_msgpack(request: Request) -> bool:
    return any(t in request.headers.get("accept", "") for t in MSGPACK_TYPES)


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


@dataclass(frozen=True)
class Reply:
    """How a caller takes its answer, decided once at the edge (the route and its Accept header).

    ``kind``: ``audio`` (the encoded bytes in the request's format), ``json`` (base64 audio and the
    metadata), ``msgpack`` (16-bit PCM and the metadata), ``sse`` (OpenAI's ``speech.audio.delta`` events)
    or ``arrays`` (the Python handle API: a dict holding the float32 samples). ``stream``: as segments
    finish (sse always streams; arrays never do).
    """

    kind: Literal["audio", "json", "msgpack", "sse", "arrays"]
    stream: bool = False


HANDLE_REPLY = Reply("arrays")


def http_reply(request: Request, stream: bool, sse: bool = False) -> Reply:
    """The Reply an HTTP request asks for: msgpack or JSON by its Accept header (msgpack first), else audio."""
    if sse:
        return Reply("sse", stream=True)
    return Reply("msgpack" if wants_msgpack(request) else "json" if wants_json(request) else "audio", stream)


def check_api_key(request: Request, keys: frozenset[str]) -> None:
    """401 unless the request carries one of ``keys`` as a bearer token (compared as bytes, in constant time)."""
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    # Starlette decodes header bytes as latin-1, so encoding back gives the bytes sent, whatever they are;
    # compare_digest refuses non-ASCII str.
    sent = token.encode("latin-1", "replace")
    if not token or not any(hmac.compare_digest(sent, k.encode("utf-8")) for k in keys):
        raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key",
                       "authentication_error")


def key_owner(request: Request, keys: frozenset[str]) -> str:
    """The tenant of an authenticated request: a hash of its API key ("" when no keys are configured).
    Stored with the jobs it makes; the key itself is never stored."""
    if not keys:
        return ""
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return hashlib.sha256(b"bark-serve tenant\0" + token.encode("latin-1", "replace")).hexdigest()[:32]


def too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body over {max_bytes} bytes", "body_too_large")


async def read_limited(request: Request, max_bytes: int) -> bytes:
    """The body, read chunk by chunk and refused with 413 as soon as it passes ``max_bytes``.

    A chunked upload has no Content-Length: reading it whole first would hold all of it in memory.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large(max_bytes)
    return bytes(body)


def content_kind(request: Request) -> str:
    """"json" or "msgpack" from the Content-Type; 415 for anything else (text/plain and forms included)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in MSGPACK_TYPES:
        return "msgpack"
    if ctype in JSON_TYPES or (ctype.startswith("application/") and ctype.endswith("+json")):
        return "json"
    raise APIError(415, f"unsupported content type {short_repr(ctype)}: send application/json or "
                        "application/msgpack", "unsupported_media_type")


def decode_body(body: bytes, kind: str) -> dict:
    """JSON or msgpack bytes -> a dict of plain data; 400 if unreadable, too deep, or not an object."""
    try:
        if kind == "msgpack":
            data = msgpack.unpackb(body, raw=False)
        else:
            data = json.loads(body or b"null")
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", "invalid_body") from None
    except Exception as exc:  # json: ValueError; msgpack raises several unrelated types for bad input
        raise APIError(400, f"request body is not valid {kind}: {short_repr(str(exc))}", "invalid_body") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be an object", "invalid_body")
    try:
        check_plain_data(data)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), "invalid_body") from None
    return data


async def parse_body(request: Request, model: type[M], max_bytes: int) -> M:
    """JSON or msgpack body -> pydantic model; 413 if too large, 415 if another type, 400 if unreadable,
    422 if invalid. Big bodies are decoded and validated in a worker thread."""
    kind = content_kind(request)
    body = await read_limited(request, max_bytes)

    def parse() -> M:
        try:
            return model.model_validate(decode_body(body, kind))
        except ValidationError as exc:
            raise validation_error(exc) from None

    return parse() if len(body) <= DECODE_INLINE_BYTES else await asyncio.to_thread(parse)


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A 422 naming the first few problems, each cut short: the answer stays small whatever was sent."""
    errors = exc.errors(include_url=False, include_input=False) if isinstance(exc, ValidationError) else exc.errors()
    return APIError(422, summarize_errors([dict(e) for e in errors]), "invalid_parameters")


def timings_summary(chunks: list[AudioChunk], t0: float, first_audio: float | None) -> dict:
    stages: dict[str, dict[str, float]] = {}
    for chunk in chunks:
        for stage, t in chunk.timings.items():
            s = stages.setdefault(stage, {"queue_s": 0.0, "work_s": 0.0})
            s["queue_s"] += t["started"] - t["queued_at"]
            s["work_s"] += t["finished"] - t["started"]
    return {"total_s": time.time() - t0, "time_to_first_audio_s": (first_audio or time.time()) - t0,
            "stages": stages, "segments": [c.timings for c in chunks]}


def joined_audio(chunks: list[AudioChunk], post: PostProcess) -> tuple[np.ndarray, int]:
    """The request's segments joined as ``post`` says (stages/audio.py), and the sample rate."""
    sr = chunks[0].sample_rate if chunks else 24_000
    return join_segments([c.audio for c in chunks], sr, post), sr


def full_answer(reply: Reply, chunks: list[AudioChunk], fmt: str, meta: dict, post: PostProcess) -> Response | dict:
    """A finished request as ``reply`` says: audio bytes, msgpack (PCM + timings), JSON (base64 audio +
    timings), or for the handle a dict with the samples (``audio``, float32) and the same metadata."""
    audio, sr = joined_audio(chunks, post)
    meta = {**meta, "sample_rate": sr, "duration_s": len(audio) / sr, "segments": len(chunks)}
    if reply.kind == "arrays":
        return {**meta, "audio": audio}
    if reply.kind == "msgpack":
        body = msgpack.packb({**meta, "format": "pcm", "audio": A.to_pcm16(audio)}, use_bin_type=True)
        return Response(body, media_type="application/msgpack", headers=_meta_headers(meta))
    encoded = A.encode(audio, sr, fmt)
    if reply.kind == "json":
        return JSONResponse({**meta, "format": fmt, "audio_base64": base64.b64encode(encoded).decode()},
                            headers=_meta_headers(meta))
    return Response(encoded, media_type=A.media_type(fmt), headers=_meta_headers(meta))


def _meta_headers(meta: dict) -> dict[str, str]:
    return {"X-Bark-Seed": str(meta.get("seed")), "X-Bark-Segments": str(meta.get("segments", "")),
            REQUEST_ID_HEADER: str(meta.get("request_id", ""))}


class StreamAborted(Exception):
    """A raw audio stream ended early (timeout or failure): the transfer is cut, so no client takes
    the audio so far for the whole answer (its status line, 200, was sent long before)."""


async def close_quietly(gen) -> None:
    """Close an async generator unless a task is still inside it: a cancelled ``wait_for(anext(gen))`` leaves
    its inner task unwinding the generator (which then runs its own cleanup), and aclose() would raise."""
    if not gen.ag_running:
        try:
            await gen.aclose()
        except RuntimeError:  # it started running again between the check and the close
            pass


class SlotStreamingResponse(StreamingResponse):
    """A streaming answer that owns an admission slot (serving/admission.py).

    The slot is released when the ASGI call ends in any way (body finished, failed, cancelled, client
    gone) and, should the response be dropped without being sent, when it is garbage-collected.
    """

    def __init__(self, content, release: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._release = release
        weakref.finalize(self, release)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await close_quietly(self.body_iterator)  # a body that never started or stopped at a yield
            finally:
                self._release()


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (event-loop time); TimeoutError if none."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise TimeoutError
    return left


async def _next_chunk(rest: AsyncIterator[AudioChunk], deadline: float) -> AudioChunk | None:
    """The next chunk, or None at the end; TimeoutError past ``deadline`` (loop time)."""
    return await asyncio.wait_for(anext(rest, None), remaining(deadline))


def _line(chunk: AudioChunk) -> dict:
    """A script's chunk says which line it belongs to (0-based); a text request's chunks say nothing."""
    return {} if chunk.line is None else {"line": chunk.line}


def _packed_chunk(chunk: AudioChunk, audio: np.ndarray) -> bytes:
    return msgpack.packb({"index": chunk.index, "n_segments": chunk.n_segments, **_line(chunk), "format": "pcm",
                          "sample_rate": chunk.sample_rate, "audio": A.to_pcm16(audio),
                          "timings": chunk.timings}, use_bin_type=True)


def sse_event(event: dict) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def _usage(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}


def stream_response(reply: Reply, first: AudioChunk, rest: AsyncIterator[AudioChunk], fmt: str, meta: dict,
                    *, post: PostProcess, deadline: float, release: Callable[[], None],
                    on_done: Callable[[bool], None], input_tokens: int = 0) -> SlotStreamingResponse:
    """Audio as segments finish: msgpack objects or Server-Sent Events as ``reply`` says, else encoded bytes
    in ``fmt``.

    Each segment is joined onto the previous ones (``post``) and encoded incrementally
    (stages/audio.py) in a worker thread. The stream obeys ``deadline`` (event-loop time) like a full
    answer: past it, or when a stage fails, an SSE stream ends with an ``{"type": "error", "error": ...}``
    event, a msgpack stream with an ``{"error": ...}`` object, and a raw stream is cut off (StreamAborted).
    ``release`` frees the request's admission slot exactly once; ``on_done(ok)`` records the outcome.
    """
    packed, sse = reply.kind == "msgpack", reply.kind == "sse"
    out = A.AudioOut(fmt, first.sample_rate, post)

    async def piece(chunk: AudioChunk) -> bytes:
        last = chunk.index == chunk.n_segments - 1
        if packed:
            return _packed_chunk(chunk, await asyncio.to_thread(out.join, chunk.audio, last))
        data = await asyncio.to_thread(out, chunk.audio, last)
        if sse and data:
            return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        return data

    async def body():
        ok, semantic_tokens = False, 0
        try:
            chunk: AudioChunk | None = first
            while chunk is not None:
                semantic_tokens += chunk.semantic_tokens
                data = await piece(chunk)
                if data:
                    yield data
                chunk = await _next_chunk(rest, deadline)
            ok = True
            if packed:
                yield msgpack.packb({"done": True, **meta}, use_bin_type=True)
            elif sse:
                yield sse_event({"type": "speech.audio.done", "usage": _usage(input_tokens, semantic_tokens)})
        except Exception as exc:  # the status line is gone: end the stream, in-band where the format allows
            err = to_api_error(exc)
            log.warning("stream %s ended early: %s", meta.get("request_id"), err.message)
            problem = {"message": err.message, "type": err.type, "code": err.code}
            if sse:
                yield sse_event({"type": "error", "error": problem})
            elif packed:
                yield msgpack.packb({"error": problem}, use_bin_type=True)
            else:
                raise StreamAborted(err.message) from None
        finally:
            await close_quietly(rest)
            on_done(ok)

    media = "application/msgpack" if packed else "text/event-stream" if sse else A.media_type(fmt)
    headers = {**_meta_headers(meta), "X-Bark-Stream": "1", **({"Cache-Control": "no-cache"} if sse else {})}
    return SlotStreamingResponse(body(), release, media_type=media, headers=headers)
