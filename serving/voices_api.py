"""``/v1/voices``: the presets and aliases, and the caller's own voices, cloned from a recording.

- ``POST /v1/voices`` (multipart: ``file``, the recording, and ``name``): the VoiceEncoder deployment
  (serving/voice_server.py) makes a Bark voice of it, the voice store (cluster/voice_store.py) keeps it
  under the caller's API key; 201 with the voice (its ``id``). The body is read bounded
  (``voice_cloning.max_upload_bytes``) before any parsing.
- ``GET /v1/voices``: ``voices`` (presets), ``aliases`` and ``custom``, the caller's registered voices
  (absent when voice cloning is disabled).
- ``GET /v1/voices/{id}`` (metadata), ``GET /v1/voices/{id}/npz`` (Bark's .npz), ``DELETE /v1/voices/{id}``;
  ``{id}`` is the id or the name. Another key's voice answers 404, as a missing one does.

A registered voice is used by its name (or id) wherever a voice is named: ``/v1/audio/speech``, ``/v1/tts``,
scripts, the handle, batch items (with the job's key) and, for the one shared owner of a server without
keys, ``dataset`` rows and ``synth`` (``own_voices``).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime.
import asyncio
import functools
import logging
from collections.abc import Iterable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from bark_serve.cluster.voice_backends import DirVoiceStore, RedisVoiceStore
from bark_serve.cluster.voice_store import VoiceNameTaken, VoiceQuotaExceeded, VoiceStore, check_name, is_voice_id
from bark_serve.schema.untrusted import short_repr
from bark_serve.stages.types import InvalidRequestError, VoicePrompt
from bark_serve.stages.voices import voice_from_npz_bytes

from .errors import APIError, overloaded, store_failure, to_api_error, unwrap
from .http_api import check_api_key, key_owner, read_limited

log = logging.getLogger("ray.serve")
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the name field, beyond the file itself
CLONING_DISABLED = "voice cloning is disabled on this server: set `voice_cloning.enabled: true` in the config"


class Voices:
    """The orchestrator's side of registered voices: its store (opened in the replica's event loop on first
    use) and the lookups a synthesis request needs."""

    def __init__(self, orch):
        self.orch = orch
        self._store: VoiceStore | None = None
        self._opening = asyncio.Lock()

    async def store(self) -> VoiceStore:
        async with self._opening:
            if self._store is None:
                cfg = self.orch.cfg
                try:
                    self._store = await asyncio.to_thread(voice_store, cfg)
                except Exception as exc:
                    log.warning("voice store unavailable: %s", exc)
                    raise _store_down() from None
            return self._store

    def reserved(self, name: str) -> bool:
        """A preset's or an alias's name: no registered voice may take it."""
        synth = self.orch.synth
        if name in synth.planner.aliases:
            return True
        try:
            return synth.voices.resolve(name) is not None
        except InvalidRequestError:
            return False

    async def own_voices(self, names: Iterable[str], owner: str) -> dict[str, VoicePrompt]:
        """The caller's registered voices among ``names`` (see :func:`registered_voices`)."""
        synth = self.orch.synth
        if not self.orch.cfg.voice_cloning.enabled or not _wanted(names, synth.planner.aliases):
            return {}
        return await registered_voices(await self.store(), names, owner, synth.planner.aliases, synth.spec)


def _wanted(names: Iterable[str], aliases) -> list[str]:
    """The names a registered voice could have: presets have a "/" (v2/en_speaker_6) and aliases are
    reserved; a name no voice may take (a path, NUL, 100 000 characters) is never looked up."""
    return sorted(n for n in set(names) if "/" not in n and n not in aliases and _registrable(n))


def _registrable(name: str) -> bool:
    if is_voice_id(name):
        return True
    try:
        check_name(name)
    except InvalidRequestError:
        return False
    return True


async def registered_voices(store: VoiceStore, names: Iterable[str], owner: str, aliases,
                            spec) -> dict[str, VoicePrompt]:
    """``owner``'s registered voices among the voice ``names`` a request gives, by the name it gives (a
    name or an id), for ``Planner.plan(own_voices=...)``; names it has not registered are left to the
    planner (a preset, or "unknown voice")."""
    out = {}
    for name in _wanted(names, aliases):
        try:
            data = await store.npz(owner, name)
        except Exception as exc:
            log.warning("voice store lookup failed: %s", exc)
            raise _store_down() from None
        if data is not None:
            out[name] = voice_from_npz_bytes(data, spec)
    return out


def voice_store(cfg) -> VoiceStore:
    """The store of registered voices of a BarkConfig: its Redis where it names one, else its folder."""
    settings = cfg.voice_store_redis()
    return RedisVoiceStore(settings) if settings is not None else DirVoiceStore(cfg.voice_store_dir())


def registered_voices_sync(store: VoiceStore, names: Iterable[str], aliases, spec,
                           owner: str = "") -> dict[str, VoicePrompt]:
    """:func:`registered_voices` for in-process callers (``synth``, ``dataset`` rows): by default the shared
    owner's, the one owner of a server without API keys."""
    out = {}
    for name in _wanted(names, aliases):
        data = store.load_npz_sync(owner, name)
        if data is not None:
            out[name] = voice_from_npz_bytes(data, spec)
    return out


def _store_down() -> APIError:
    return overloaded("the voice store is unavailable; retry shortly", 5)


def _store_guard(endpoint):
    """A route whose voice store fails (Redis full, hung or away; the folder unwritable) answers 503
    ``store_full`` / ``store_unavailable`` with ``Retry-After``, as the batch routes do, never a 500."""

    @functools.wraps(endpoint)
    async def wrapper(*args, **kwargs):
        try:
            return await endpoint(*args, **kwargs)
        except Exception as exc:
            failure = store_failure(exc, "the voice store")
            if failure is None:
                raise
            raise failure from None

    return wrapper


async def _form(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The upload's file bytes and name, from a multipart body read bounded; 4xx for anything else."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise APIError(415, "send the recording as multipart/form-data with fields `file` and `name`",
                       "unsupported_media_type")
    body = await read_limited(request, max_bytes + FORM_OVERHEAD_BYTES)
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as exc:  # malformed multipart, too many parts
        raise APIError(400, f"the form could not be read: {short_repr(str(exc))}", "invalid_body") from None
    file, name = form.get("file"), form.get("name")
    if not isinstance(file, UploadFile):
        raise APIError(422, "the form lacks the recording: a `file` field holding the audio", "invalid_parameters")
    if not isinstance(name, str):
        raise APIError(422, "the form lacks the voice's `name`", "invalid_parameters")
    data = await file.read()
    if len(data) > max_bytes:
        raise APIError(413, f"the recording is over {max_bytes} bytes", "body_too_large")
    return data, name


def voice_router(orch) -> APIRouter:
    """The /v1/voices routes of one orchestrator replica."""
    router = APIRouter(prefix="/v1/voices")
    voices: Voices = orch.voices_reg
    vc = orch.cfg.voice_cloning

    def owner_of(request: Request) -> str:
        check_api_key(request, orch.api_keys)
        return key_owner(request, orch.api_keys)

    def enabled() -> None:
        if not vc.enabled:
            raise APIError(404, CLONING_DISABLED, "voice_cloning_disabled")

    @router.get("")
    @_store_guard
    async def list_voices(request: Request):
        owner = owner_of(request)
        out = {"voices": orch.synth.voices.names(), "aliases": orch.synth.planner.aliases}
        if vc.enabled:  # without cloning there is no "custom" list (the playground then shows no upload)
            store = await voices.store()
            out["custom"] = [v.to_public() for v in await store.list(owner)]
        return out

    @router.post("", status_code=201)
    @_store_guard
    async def add_voice(request: Request):
        owner = owner_of(request)
        enabled()
        data, name = await _form(request, vc.max_upload_bytes)
        try:
            name = check_name(name)
        except InvalidRequestError as exc:
            raise APIError(422, str(exc), "invalid_voice_name") from None
        if voices.reserved(name):
            raise APIError(409, f"{short_repr(name)} is a preset or an alias name: choose another", "voice_name_taken")
        store = await voices.store()
        existing = await store.list(owner)
        if any(v.name == name for v in existing):  # also checked atomically when it is stored
            raise APIError(409, f"you already have a voice named {short_repr(name)}", "voice_name_taken")
        quota = vc.max_voices_per_key
        if quota is not None and len(existing) >= quota:
            raise _quota(quota)
        try:
            made = await orch.voice_encoder.encode.remote(data)
        except Exception as exc:
            raise to_api_error(unwrap(exc)) from None
        try:
            voice = await store.add(owner, name, made["npz"], made["duration_s"],
                                    meta={"semantic_tokens": made["semantic_tokens"]}, quota=quota,
                                    reserved=voices.reserved)
        except VoiceNameTaken as exc:
            raise APIError(409, str(exc), "voice_name_taken") from None
        except VoiceQuotaExceeded:
            raise _quota(quota) from None
        return JSONResponse(voice.to_public(), status_code=201)

    async def owned(request: Request, voice_id: str):
        owner = owner_of(request)
        enabled()
        store = await voices.store()
        voice = await store.get(owner, voice_id)
        if voice is None:
            raise APIError(404, f"no voice {short_repr(voice_id)}", "voice_not_found")
        return owner, store, voice

    @router.get("/{voice_id}")
    @_store_guard
    async def get_voice(voice_id: str, request: Request):
        _, _, voice = await owned(request, voice_id)
        return voice.to_public()

    @router.get("/{voice_id}/npz")
    @_store_guard
    async def get_voice_npz(voice_id: str, request: Request):
        owner, store, voice = await owned(request, voice_id)
        data = await store.npz(owner, voice.id)
        if data is None:  # deleted between the two reads
            raise APIError(404, f"no voice {short_repr(voice_id)}", "voice_not_found")
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{voice.id}.npz"'})

    @router.delete("/{voice_id}")
    @_store_guard
    async def delete_voice(voice_id: str, request: Request):
        owner, store, voice = await owned(request, voice_id)
        await store.delete(owner, voice.id)
        return {"id": voice.id, "object": "voice", "deleted": True}

    return router


def _quota(limit: int | None) -> APIError:
    return APIError(429, f"quota max_voices_per_key ({limit}) reached: delete a voice first", "quota_exceeded",
                    "rate_limit_error")
