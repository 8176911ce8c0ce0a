"""Request parsing and response building of the HTTP API (used by the orchestrator's routes)."""

from __future__ import annotations

import base64
import hmac
import json
import time
from collections.abc import AsyncIterator

import msgpack
import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from . import audio as A
from .errors import APIError
from .synthesis import AudioChunk

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")


def wants_msgpack(request: Request) -> bool:
    return any(t in request.headers.get("accept", "") for t in MSGPACK_TYPES)


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def check_api_key(request: Request, keys: frozenset[str]) -> None:
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if not token or not any(hmac.compare_digest(token, k) for k in keys):
        raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key",
                       "authentication_error")


async def parse_body(request: Request, model: type[BaseModel], max_bytes: int) -> BaseModel:
    """JSON or msgpack body -> pydantic model; 413 if too large, 400 if unreadable, 422 if invalid."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body over {max_bytes} bytes", "body_too_large")
    body = await request.body()
    if len(body) > max_bytes:
        raise APIError(413, f"request body over {max_bytes} bytes", "body_too_large")
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    try:
        if ctype in MSGPACK_TYPES:
            data = msgpack.unpackb(body, raw=False)
        elif ctype in ("application/json", "", "text/plain"):
            data = json.loads(body or b"null")
        else:
            raise APIError(415, f"unsupported content type {ctype!r}: send application/json or application/msgpack",
                           "unsupported_media_type")
    except (ValueError, msgpack.UnpackException) as exc:
        raise APIError(400, f"request body is not valid {ctype}: {exc}", "invalid_body") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be an object", "invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> APIError:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
    return APIError(422, "; ".join(parts), "invalid_parameters")


def timings_summary(chunks: list[AudioChunk], t0: float, first_audio: float | None) -> dict:
    stages: dict[str, dict[str, float]] = {}
    for chunk in chunks:
        for stage, t in chunk.timings.items():
            s = stages.setdefault(stage, {"queue_s": 0.0, "work_s": 0.0})
            s["queue_s"] += t["started"] - t["queued_at"]
            s["work_s"] += t["finished"] - t["started"]
    return {"total_s": time.time() - t0, "time_to_first_audio_s": (first_audio or time.time()) - t0,
            "stages": stages, "segments": [c.timings for c in chunks]}


def full_response(request: Request, chunks: list[AudioChunk], fmt: str, meta: dict) -> Response:
    """A finished request, as audio bytes, msgpack (PCM + timings) or JSON (base64 audio + timings)."""
    audio = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros((0,), np.float32)
    sr = chunks[0].sample_rate if chunks else 24_000
    meta = {**meta, "sample_rate": sr, "duration_s": len(audio) / sr, "segments": len(chunks)}
    if wants_msgpack(request):
        body = msgpack.packb({**meta, "format": "pcm", "audio": A.to_pcm16(audio)}, use_bin_type=True)
        return Response(body, media_type="application/msgpack")
    encoded = A.encode(audio, sr, fmt)
    if wants_json(request):
        return JSONResponse({**meta, "format": fmt, "audio_base64": base64.b64encode(encoded).decode()})
    return Response(encoded, media_type=A.media_type(fmt), headers=_meta_headers(meta))


def _meta_headers(meta: dict) -> dict[str, str]:
    return {"X-Bark-Seed": str(meta.get("seed")), "X-Bark-Segments": str(meta.get("segments", "")),
            "X-Request-Id": str(meta.get("request_id", ""))}


async def stream_response(request: Request, first: AudioChunk, rest: AsyncIterator[AudioChunk], fmt: str,
                          meta: dict, on_done) -> StreamingResponse:
    """Audio chunks as segments finish: raw pcm/wav bytes, or a stream of msgpack objects."""
    packed = wants_msgpack(request)
    if not packed and fmt not in ("pcm", "wav"):
        raise APIError(400, "streaming returns pcm or wav (or msgpack chunks); ask for one of those", "invalid_request")

    async def body():
        if fmt == "wav" and not packed:
            yield A.wav_stream_header(first.sample_rate)
        chunk, ok = first, False
        try:
            while chunk is not None:
                pcm = A.to_pcm16(chunk.audio)
                if packed:
                    yield msgpack.packb({"index": chunk.index, "n_segments": chunk.n_segments, "format": "pcm",
                                         "sample_rate": chunk.sample_rate, "audio": pcm, "timings": chunk.timings},
                                        use_bin_type=True)
                else:
                    yield pcm
                chunk = await anext(rest, None)
            ok = True
            if packed:
                yield msgpack.packb({"done": True, **meta}, use_bin_type=True)
        finally:
            await rest.aclose()
            on_done(ok)

    media = "application/msgpack" if packed else A.media_type(fmt)
    return StreamingResponse(body(), media_type=media, headers={**_meta_headers(meta), "X-Bark-Stream": "1"})
