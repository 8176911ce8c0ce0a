"""The VoiceEncoder deployment: an uploaded recording -> a Bark voice (stages/cloning.py).

Its own deployment, with its own pool and batch size, so that cloning (HuBERT, the quantizer and EnCodec's
encoder over up to a minute of audio) never takes a stage replica's time: the orchestrator only routes a
``POST /v1/voices`` here and stores what comes back. Clips are decoded one by one (a bad clip fails alone)
and encoded in batches of up to ``voice_cloning.max_batch`` (Serve's ``@serve.batch``).

The weights load on the first clip, not at start: a server whose HuBERT or quantizer cannot be found (no
hub access, nothing configured) starts and serves speech as ever, and ``POST /v1/voices`` answers 503
naming what is missing. A failed load is tried again after ``RELOAD_AFTER_S``. torch too is imported then,
with the weights: a replica that never clones starts in a fraction of the time and memory.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from ray import serve

from bark_serve.cluster.placement import ray_placement
from bark_serve.stages.audio_in import decode_clip
from bark_serve.stages.types import CloningUnavailable, VoicePrompt
from bark_serve.stages.voices import voice_npz_bytes

from .config import BarkConfig, parse_config

if TYPE_CHECKING:
    from bark_serve.stages.cloning import VoiceCloner

log = logging.getLogger("ray.serve")
RELOAD_AFTER_S = 30.0


def load_cloner(cfg: BarkConfig) -> VoiceCloner:
    """The cloner of ``cfg``: the checkpoint's EnCodec, and HuBERT and the quantizer where the config says
    (``BarkConfig.cloning_weights``); CloningUnavailable if any is missing."""
    from bark_serve.stages.cloning import VoiceCloner
    from bark_serve.stages.engine import EngineOptions, resolve_device, resolve_dtype

    hubert, quantizer = cfg.cloning_weights()
    vc = cfg.voice_cloning
    device = resolve_device(vc.device)
    options = EngineOptions(device=device, dtype=resolve_dtype(vc.dtype, device, logger=log), capacity=vc.max_batch)
    try:
        return VoiceCloner.from_pretrained(cfg.model, hubert, quantizer, options)
    except CloningUnavailable:
        raise
    except Exception as exc:  # a broken checkpoint's codec, an unreadable file: still the server's problem
        raise CloningUnavailable(f"voice cloning weights could not be loaded: {type(exc).__name__}: {exc}") from None


@serve.deployment
class VoiceEncoder:
    def __init__(self, config: dict):
        self.cfg = parse_config(config)
        vc = self.cfg.voice_cloning
        self._cloner: VoiceCloner | None = None
        self._error: str | None = None
        self._failed_at = 0.0
        self._lock = threading.Lock()
        batched = cast(Any, self._encode)  # @serve.batch adds these setters; its typing does not say so
        batched.set_max_batch_size(vc.max_batch)
        batched.set_batch_wait_timeout_s(vc.batch_wait_ms / 1000.0)
        self.clips = 0

    def _loaded(self) -> VoiceCloner:
        """The cloner, loaded on first use (in a worker thread); CloningUnavailable while it cannot be."""
        with self._lock:
            if self._cloner is not None:
                return self._cloner
            if self._error is not None and time.monotonic() - self._failed_at < RELOAD_AFTER_S:
                raise CloningUnavailable(self._error)
            t0 = time.monotonic()
            try:
                self._cloner = load_cloner(self.cfg)
            except CloningUnavailable as exc:
                self._error, self._failed_at = str(exc), time.monotonic()
                log.warning("voice cloning unavailable: %s", exc)
                raise
            log.info("voice cloning weights loaded in %.1f s", time.monotonic() - t0)
            self._error = None
            return self._cloner

    async def encode(self, data: bytes) -> dict:
        """An uploaded clip's bytes -> ``{"npz": Bark's .npz bytes, "duration_s", "semantic_tokens"}``.

        Raises InvalidRequestError for a clip that is not usable audio (each check of stages/audio_in.py),
        MissingPackage when its format needs PyAV and this host has none, CloningUnavailable (503).
        """
        vc = self.cfg.voice_cloning
        audio, sr = await asyncio.to_thread(decode_clip, data, max_bytes=vc.max_upload_bytes,
                                            min_s=vc.min_audio_s, max_s=vc.max_audio_s)
        prompt = await self._encode((audio, sr))
        self.clips += 1
        return {"npz": voice_npz_bytes(prompt), "duration_s": len(audio) / sr,
                "semantic_tokens": int(len(prompt.semantic))}

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _encode(self, clips: list[tuple[np.ndarray, int]]) -> list[VoicePrompt]:
        cloner = await asyncio.to_thread(self._loaded)
        return await asyncio.to_thread(cloner.clone_batch, clips)

    async def stats(self) -> dict:
        return {"clips": self.clips, "loaded": self._cloner is not None, "error": self._error, **ray_placement()}
