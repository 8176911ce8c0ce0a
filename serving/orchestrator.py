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
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from bark_serve.cluster.placement import ray_placement
from bark_serve.schema.request import SynthesisRequest
from bark_serve.schema.untrusted import check_plain_data, clip, invalid_request

from . import http_api as H
from .admission import Admission
from .api_models import SpeechRequest, TTSRequest
from .config import parse_config
from .errors import APIError, to_api_error
from .metrics import NullRequestMetrics, RequestMetrics, replica_metrics
from .routes import ROUTES, build_http_app
from .stage_calls import make_synthesizer
from .voices_api import Voices

READY_WAIT_S = 1.5  # /readyz waits this long for each stage (in parallel) before calling it not ready
log = logging.getLogger("ray.serve")  # shows in the replica logs
OPENAI_MODEL_NAMES = ("bark", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# Helpers come before the deployment class: Serve pickles the class when it is decorated.
async def _drain(chunks):
    return [c async for c in chunks]


def _arrays(voice) -> bool:
    """An inline voice of numpy arrays (handle callers): not plain data, and checked by the voice library."""
    return isinstance(voice, dict) and any(isinstance(v, np.ndarray) for v in voice.values())


@serve.deployment
@serve.ingress()  # late-bound: each replica builds its app in __serve_build_asgi_app__ (serving/routes.py)
class Orchestrator:
    def __init__(self, config: dict, semantic, coarse, fine, codec, batch_worker=None, voice_encoder=None):
        self.cfg = parse_config(config)
        ocfg = self.cfg.orchestrator
        self.handles = {"semantic": semantic, "coarse": coarse, "fine": fine, "codec": codec}
        self.synth = make_synthesizer(self.cfg, handles=self.handles)
        keys = os.environ.get(ocfg.api_keys_env, "") if ocfg.api_keys_env else ""
        self.api_keys = frozenset(k.strip() for k in keys.split(",") if k.strip())
        # accepted in requests; /v1/models and every answer name only the public ones (no local path)
        self.model_names = {self.cfg.model, self.cfg.model.rstrip("/").split("/")[-1], *OPENAI_MODEL_NAMES}
        self.public_models = {self.cfg.public_model, self.cfg.model.rstrip("/").split("/")[-1], *OPENAI_MODEL_NAMES}
        self.admission = Admission(ocfg.max_active_requests, ocfg.retry_after_s)
        self.metrics = replica_metrics(RequestMetrics, NullRequestMetrics(), "the orchestrator")
        self.batch_worker = batch_worker  # keeps the BatchWorker deployment in the app
        self.voice_encoder = voice_encoder  # the VoiceEncoder deployment (POST /v1/voices), when cloning is on
        self.voices_reg = Voices(self)  # registered voices: the store, and their lookup by name

    def __serve_build_asgi_app__(self):
        """Serve calls this once, after __init__: this replica's FastAPI app."""
        return build_http_app(self)

    # -- Python handle API (serve.get_app_handle("bark")) ----------------------------------------
    async def synthesize(self, text: str | None = None, voice=None, script=None, **options) -> dict:
        """Synthesize ``text`` (or ``script``: [{"voice", "text"}, ...]); options are those of /v1/tts.
        -> {audio (float32 array), sample_rate, seed, request_id, duration_s, segments, timings}

        Raises InvalidRequestError for bad input and APIError(429) when this replica is at
        ``max_active_requests`` (Ray Client callers especially: Serve's queue limits are relaxed there).
        """
        # what the HTTP parser checks, for handle callers (whose inline voices may be numpy arrays)
        check_plain_data({"text": text, "voice": voice if isinstance(voice, (str, dict)) and not _arrays(voice)
                          else None, "script": script, **options})
        try:
            req = TTSRequest(text=text, voice=voice, script=script, **options)  # its options: those of /v1/tts
        except ValidationError as exc:
            raise invalid_request(exc) from None
        return await self._run("handle", req, H.HANDLE_REPLY)

    async def stats(self) -> dict:
        """This replica's state, for operators and tests: pid, active requests, cached voices, what Ray gave it."""
        return {"pid": os.getpid(), "active": self.admission.active, "max_active": self.admission.limit,
                "voice_cache": self.synth.voices.cached, "voice_cache_size": self.synth.voices.cache_size,
                **ray_placement()}

    # -- HTTP (paths in serving/routes.py) --------------------------------------------------------
    async def index(self):
        """What this server answers (no authentication needed)."""
        return {"name": "bark-serve", "model": self.cfg.public_model, "docs": ROUTES["docs"], "routes": ROUTES,
                "batch_enabled": self.cfg.batch.enabled}

    async def healthz(self):
        return {"status": "ok"}

    async def readyz(self):
        """200 when every stage answers and this replica can admit a request; 503 otherwise, within
        READY_WAIT_S (a stage with no running replica never answers: its call is held until one starts)."""
        async def ready(name):
            try:
                return bool(await asyncio.wait_for(self.handles[name].ready.remote(), READY_WAIT_S))
            except Exception:
                return False

        states = dict(zip(self.handles, await asyncio.gather(*(ready(n) for n in self.handles))))
        full = self.admission.full
        ok = all(states.values()) and not full
        status = "ready" if ok else ("busy" if full else "not_ready")
        body = {"status": status, "stages": states, "active_requests": self.admission.active,
                "max_active_requests": self.admission.limit}
        headers = {"Retry-After": str(self.cfg.orchestrator.retry_after_s)} if full else None
        return JSONResponse(body, status_code=200 if ok else 503, headers=headers)

    async def models(self, request: Request):
        H.check_api_key(request, self.api_keys)
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "bark-serve"}
                                           for m in sorted(self.public_models)]}

    async def speech(self, request: Request):
        """OpenAI's audio API: the official client works against it unchanged."""
        H.check_api_key(request, self.api_keys)
        self.admission.check()  # a full replica answers 429 before reading the body
        req = await H.parse_body(request, SpeechRequest, self.cfg.orchestrator.max_body_bytes)
        if req.model not in self.model_names:
            raise APIError(404, f"model {clip(req.model)!r} not found; this server serves {self.cfg.public_model!r}",
                           "model_not_found")
        sse = req.stream_format == "sse"
        reply = H.http_reply(request, stream=not H.wants_json(request), sse=sse)  # Accept: application/json: whole
        return await self._http("speech", req.synthesis_request(), reply, H.key_owner(request, self.api_keys))

    async def tts(self, request: Request):
        """Native API: JSON or msgpack in, audio / msgpack / JSON out, optional streaming."""
        H.check_api_key(request, self.api_keys)
        self.admission.check()  # a full replica answers 429 before reading the body
        req = await H.parse_body(request, TTSRequest, self.cfg.orchestrator.max_body_bytes)
        return await self._http("tts", req, H.http_reply(request, req.stream), H.key_owner(request, self.api_keys))

    # -- the one path ------------------------------------------------------------------------------
    async def _http(self, api: str, req: SynthesisRequest, reply: H.Reply, owner: str):
        """``_run`` for an HTTP route: whatever it raises becomes the API's error answer."""
        try:
            return await self._run(api, req, reply, owner)
        except Exception as exc:  # counted by the app's error handler, as every error answer is
            raise to_api_error(exc, self.cfg.orchestrator.retry_after_s) from None

    async def _run(self, api: str, req: SynthesisRequest, reply: H.Reply, owner: str = ""):
        """Every caller's path (the HTTP routes and the handle; batch items plan and stream the same way in
        serving/batch_app.py): admit -> plan -> stream -> answer as ``reply`` says. The admission slot is
        released exactly once, whatever happens; the deadline covers planning too. ``owner``: the caller's
        tenant, whose registered voices the request may name (the handle's is the shared owner "")."""
        post = req.post_process(self.cfg.audio)
        deadline = asyncio.get_running_loop().time() + self.cfg.orchestrator.request_timeout_s
        with self.admission.acquire() as slot:  # before voices are read or text is tokenized
            t0 = time.time()
            own = await asyncio.wait_for(self.voices_reg.own_voices(req.named_voices(), owner), H.remaining(deadline))
            plan = await asyncio.wait_for(self.synth.plan_request(req, own_voices=own), H.remaining(deadline))
            meta = {"seed": plan.seed, "request_id": plan.request_id, "segments": plan.n_segments}
            chunks = self.synth.stream(plan)
            try:
                first = await asyncio.wait_for(anext(chunks, None), H.remaining(deadline))
                t_first = time.time()
                self.metrics.first_audio(t_first - t0)
                if reply.stream and first is not None:
                    def finished(ok):
                        self.metrics.request(api, time.time() - t0)

                    response = H.stream_response(reply, first, chunks, req.format, meta, post=post,
                                                 input_tokens=sum(len(ids) for ids in plan.text_ids),
                                                 deadline=deadline, release=slot.release, on_done=finished)
                    slot.transfer()  # from here the response releases the slot (see SlotStreamingResponse)
                    return response
                rest = await asyncio.wait_for(_drain(chunks), H.remaining(deadline)) if first else []
            except BaseException:
                await H.close_quietly(chunks)  # stop the pipeline: error, timeout, or the client went away
                raise
            collected = [first, *rest] if first else []
            meta["timings"] = H.timings_summary(collected, t0, t_first)
            self.metrics.audio(sum(len(c.audio) for c in collected) / self.synth.spec.sample_rate)
            self.metrics.request(api, time.time() - t0)
            # joining and encoding minutes of audio takes a while: not on the event loop
            return await asyncio.to_thread(H.full_answer, reply, collected, req.format, meta, post)
