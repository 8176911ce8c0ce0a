"""The ingress deployment: HTTP API (FastAPI through Ray Serve) and the Python handle API.

It validates input, splits long text, pipelines the segments through the four
stage deployments (serving/synthesis.py) and streams audio back. It loads no
weights: only the tokenizer and the voice presets of the checkpoint.
"""

# No `from __future__ import annotations` here: FastAPI must see real annotations on the ingress methods.
import asyncio
import logging
import os
import time

import numpy as np

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ray import serve

from bark_serve.stages.types import InvalidRequestError

from . import http_api as H
from .api_models import SpeechRequest, TTSRequest
from .config import parse_config
from .errors import APIError, overloaded, to_api_error
from .service import make_synthesizer

log = logging.getLogger("ray.serve")  # shows in the replica logs
OPENAI_MODEL_NAMES = ("bark", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")

app = FastAPI(title="bark-serve", description="Bark text-to-speech, served stage by stage on Ray Serve.")


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return APIError(422, "; ".join(parts), "invalid_parameters").response()


@app.exception_handler(InvalidRequestError)
async def _invalid(request: Request, exc: InvalidRequestError):
    return to_api_error(exc).response()


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    return to_api_error(exc).response()


# Helpers come before the deployment class: Serve pickles the class when it is decorated.
async def _drain(chunks):
    return [c async for c in chunks]


def _request_metrics():
    try:
        from .metrics import RequestMetrics

        return RequestMetrics()
    except Exception:  # outside a replica (unit tests): a no-op sink
        class _Null:
            def __getattr__(self, name):
                return lambda *a, **k: None

        return _Null()


@serve.deployment
@serve.ingress(app)
class Orchestrator:
    def __init__(self, config: dict, semantic, coarse, fine, codec, batch_worker=None):
        self.cfg = parse_config(config)
        ocfg = self.cfg.orchestrator
        self.handles = {"semantic": semantic, "coarse": coarse, "fine": fine, "codec": codec}
        self.synth = make_synthesizer(self.cfg, self.handles)
        keys = os.environ.get(ocfg.api_keys_env, "") if ocfg.api_keys_env else ""
        self.api_keys = frozenset(k.strip() for k in keys.split(",") if k.strip())
        self.model_names = {self.cfg.model, self.cfg.model.rstrip("/").split("/")[-1], *OPENAI_MODEL_NAMES}
        self.active = 0
        self.metrics = _request_metrics()
        self.batch_worker = batch_worker  # keeps the BatchWorker deployment in the app
        if self.cfg.batch.enabled:
            self._mount_batch_api()

    def _mount_batch_api(self) -> None:
        from fastapi import Depends

        from .batch_api import BatchLimits, batch_router
        from .batch_app import batch_store_factory

        def require_key(request: Request):
            H.check_api_key(request, self.api_keys)

        app.include_router(batch_router(batch_store_factory(self.cfg), limits=BatchLimits.from_config(self.cfg),
                                        dependencies=[Depends(require_key)]))

    # -- Python handle API (serve.get_app_handle("bark")) ----------------------------------------
    async def synthesize(self, text: str, voice=None, **options) -> dict:
        """Synthesize ``text``; options are those of /v1/tts. -> {audio (float32 array), sample_rate, seed, timings}

        Raises InvalidRequestError for bad input and APIError(429) when this replica is at
        ``max_active_requests`` (Ray Client callers especially: Serve's queue limits are relaxed there).
        """
        try:
            req = TTSRequest(text=text, voice=voice, **options)
        except ValidationError as exc:
            raise InvalidRequestError(H.validation_error(exc).message) from None
        ocfg = self.cfg.orchestrator
        plan = self.synth.plan(req.text, req.voice, req.generation_params(), req.priority)
        self._begin()
        t0 = time.time()
        try:
            chunks = await asyncio.wait_for(self.synth.collect(plan), ocfg.request_timeout_s)
        finally:
            self.active -= 1
        return {"audio": np.concatenate([c.audio for c in chunks]), "sample_rate": self.synth.spec.sample_rate,
                "seed": plan.seed, "request_id": plan.request_id, "timings": H.timings_summary(chunks, t0, None)}

    def _begin(self) -> None:
        """Take one of this replica's ``max_active_requests`` places, or answer 429 with Retry-After."""
        ocfg = self.cfg.orchestrator
        if self.active >= ocfg.max_active_requests:
            raise overloaded(f"{self.active} requests in progress; retry shortly", ocfg.retry_after_s, status=429)
        self.active += 1

    # -- HTTP -----------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        async def ready(name):
            try:
                return bool(await asyncio.wait_for(self.handles[name].ready.remote(), 5.0))
            except Exception:
                return False

        states = dict(zip(self.handles, await asyncio.gather(*(ready(n) for n in self.handles))))
        ok = all(states.values())
        from fastapi.responses import JSONResponse

        return JSONResponse({"status": "ready" if ok else "not_ready", "stages": states}, status_code=200 if ok else 503)

    @app.get("/v1/voices")
    async def voices(self, request: Request):
        H.check_api_key(request, self.api_keys)
        return {"voices": self.synth.voices.names(), "aliases": self.synth.aliases}

    @app.get("/v1/models")
    async def models(self, request: Request):
        H.check_api_key(request, self.api_keys)
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "bark-serve"}
                                           for m in sorted(self.model_names)]}

    @app.post("/v1/audio/speech")
    async def speech(self, request: Request):
        """OpenAI's audio API: the official client works against it unchanged."""
        H.check_api_key(request, self.api_keys)
        req = await H.parse_body(request, SpeechRequest, self.cfg.orchestrator.max_body_bytes)
        if req.model not in self.model_names:
            raise APIError(404, f"model {req.model!r} not found; this server serves {self.cfg.model!r}",
                           "model_not_found")
        if req.response_format == "aac":
            raise APIError(400, "response_format 'aac' is not supported; use mp3, opus, flac, wav or pcm",
                           "unsupported_format")
        if req.speed != 1.0:
            raise APIError(400, "Bark cannot change speed; send speed 1.0", "unsupported_parameter")
        if req.stream_format == "sse":
            raise APIError(400, "stream_format 'sse' is not supported; pcm and wav stream as audio bytes",
                           "unsupported_parameter")
        stream = req.response_format in ("pcm", "wav")
        return await self._respond(request, "speech", req.input, req.voice, req, req.response_format, stream,
                                   "interactive")

    @app.post("/v1/tts")
    async def tts(self, request: Request):
        """Native API: JSON or msgpack in, audio / msgpack / JSON out, optional streaming."""
        H.check_api_key(request, self.api_keys)
        req = await H.parse_body(request, TTSRequest, self.cfg.orchestrator.max_body_bytes)
        return await self._respond(request, "tts", req.text, req.voice, req, req.format, req.stream, req.priority)

    async def _respond(self, request, api, text, voice, options, fmt, stream, priority):
        ocfg = self.cfg.orchestrator
        plan = self.synth.plan(text, voice, options.generation_params(), priority)
        meta = {"seed": plan.seed, "request_id": plan.request_id}
        self._begin()
        t0, done = time.time(), False
        chunks = self.synth.stream(plan)
        try:
            first = await asyncio.wait_for(anext(chunks), ocfg.request_timeout_s)
            t_first = time.time()
            self.metrics.first_audio(t_first - t0)
            if stream:
                def finished(ok):
                    self.active -= 1
                    self.metrics.request(api, time.time() - t0)

                done = True  # the stream's own cleanup releases the slot
                return await H.stream_response(request, first, chunks, fmt, meta, finished)
            rest = await asyncio.wait_for(_drain(chunks), ocfg.request_timeout_s - (time.time() - t0))
            collected = [first, *rest]
            meta["timings"] = H.timings_summary(collected, t0, t_first)
            self.metrics.audio(sum(len(c.audio) for c in collected) / first.sample_rate)
            self.metrics.request(api, time.time() - t0)
            return H.full_response(request, collected, fmt, meta)
        except asyncio.CancelledError:  # the client went away: stop the pipeline, answer nothing
            await chunks.aclose()
            raise
        except Exception as exc:
            await chunks.aclose()
            err = to_api_error(exc, ocfg.retry_after_s)
            self.metrics.error(err.status)
            raise err from None
        finally:
            if not done:
                self.active -= 1
