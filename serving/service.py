"""Building a Synthesizer on top of the stage deployments' handles (orchestrator and batch workers)."""

from __future__ import annotations

from bark_serve.stages.text import TextPreparer
from bark_serve.stages.voices import VoiceLibrary
from bark_serve.stages.weights import Checkpoint

from .config import BarkConfig
from .synthesis import Synthesizer


def make_synthesizer(cfg: BarkConfig, handles: dict) -> Synthesizer:
    """Tokenizer and voices from the checkpoint (no weights); stage calls through Serve handles."""

    async def call(stage: str, request, priority: str):
        return await handles[stage].run.remote(request, priority)

    ckpt = Checkpoint.open(cfg.model)
    voices = VoiceLibrary(ckpt.spec, ckpt, [cfg.voices_dir] if cfg.voices_dir else [])
    ocfg = cfg.orchestrator
    return Synthesizer(TextPreparer.from_checkpoint(ckpt), voices, ckpt.spec, call, ocfg.segment_max_tokens,
                       ocfg.max_text_chars, cfg.voice_aliases, ocfg.max_segments_in_flight)
