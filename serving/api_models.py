"""Request bodies of the HTTP API (pydantic), and their translation to generation parameters."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from bark_serve.cluster.request_fields import (
    MAX_VOICE_NAME,
    NullMeansDefault,
    Script,
    ScriptLine,
    VoiceName,
    VoiceRef,
    check_text_or_script,
    voice_ref,
)
from bark_serve.stages import constants as C
from bark_serve.stages.dsp import PostProcess
from bark_serve.stages.types import GenerationParams, Priority, SamplingParams, check_seed

from .config import AudioConfig

__all__ = ["MAX_VOICE_NAME", "BarkOptions", "OutputOptions", "ScriptLine", "SpeechRequest", "TTSRequest"]


class BarkOptions(NullMeansDefault):
    """Bark's knobs, accepted by both APIs (OpenAI-style requests carry them as extra fields).

    NaN and infinities are refused in every float field (Python's json accepts them). An optional
    field sent as null takes its default (``NullMeansDefault``); ``min_eos_p: null`` disables the threshold.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    seed: Annotated[int | None, AfterValidator(check_seed)] = Field(None, description="same seed and input, same audio")
    temperature: float | None = Field(None, ge=0, le=100, description="every stage; 0 is greedy")
    semantic_temperature: float | None = Field(None, ge=0, le=100)
    coarse_temperature: float | None = Field(None, ge=0, le=100)
    fine_temperature: float | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="semantic and coarse stages")
    top_p: float | None = Field(None, gt=0, le=1, description="semantic and coarse stages")
    min_eos_p: float | None = Field(C.DEFAULT_MIN_EOS_P, gt=0, le=1, description="null disables the EOS threshold")
    max_semantic_tokens: int = Field(C.MAX_SEMANTIC_TOKENS, ge=1, le=C.MAX_SEMANTIC_TOKENS,
                                     description="cap per segment (768 is about 15 s)")

    def generation_params(self) -> GenerationParams:
        defaults = GenerationParams()
        stages = {}
        for stage in ("semantic", "coarse", "fine"):
            temp = getattr(self, f"{stage}_temperature")
            if temp is None:
                temp = self.temperature if self.temperature is not None else getattr(defaults, stage).temperature
            k, p = (self.top_k, self.top_p) if stage != "fine" else (None, None)
            stages[stage] = SamplingParams(temperature=temp, top_k=k, top_p=p)
        return GenerationParams(**stages, min_eos_p=self.min_eos_p, max_semantic_tokens=self.max_semantic_tokens,
                                seed=self.seed)


class OutputOptions(BaseModel):
    """How the audio comes out, on both APIs (and batch items' options): speed and the long-form joins.

    Every field left out or null takes the server's ``audio:`` config (serving/config.py AudioConfig).
    ``trim_silence: false, crossfade_ms: 0, normalize_loudness: false`` (and speed 1) give the model's raw samples.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    speed: float | None = Field(None, ge=0.25, le=4.0,
                                description="0.25-4, default 1: pitch-preserving time-stretch (Rubber Band)")
    trim_silence: bool | None = Field(None, description="cut each segment's leading and trailing silence")
    trim_threshold_db: float | None = Field(None, ge=-100, le=-1,
                                            description="silence: this many dB below the segment's loudest frame")
    crossfade_ms: float | None = Field(None, ge=0, le=500, description="segments join with a crossfade this long")
    normalize_loudness: bool | None = Field(None, description="bring the audio to target_lufs (ITU-R BS.1770)")
    target_lufs: float | None = Field(None, ge=-70, le=-5, description="integrated loudness target")

    def post_process(self, defaults: AudioConfig) -> PostProcess:
        """This request's joining: ``defaults`` (an AudioConfig) with this request's values where given."""
        fields = ("trim_silence", "trim_threshold_db", "crossfade_ms", "normalize_loudness", "target_lufs")
        return defaults.post_process(speed=self.speed, **{k: getattr(self, k) for k in fields})


class SpeechRequest(BarkOptions, OutputOptions):
    """POST /v1/audio/speech: OpenAI's audio API, plus Bark's options as extra fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(..., max_length=256,
                       description="bark, tts-1, tts-1-hd, gpt-4o-mini-tts or the served checkpoint's name")
    input: str = Field(..., description="the text to speak")
    voice: VoiceRef = Field(..., description="a Bark preset (v2/en_speaker_6), an alias (alloy, ash, ...), "
                                             "or OpenAI's {\"id\": NAME} object holding either")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] | None = Field(
        None, description="mp3 (default), opus, aac, flac, wav, pcm: every one streams")
    instructions: str | None = Field(None, max_length=4096,
                                     description="accepted and ignored: Bark takes no style instructions")
    stream_format: Literal["audio", "sse"] | None = Field(
        None, description="audio (default): the encoded bytes as they are made; sse: speech.audio.delta events")
    stream: bool | None = Field(None, description="accepted, as other OpenAI-compatible servers take it: every "
                                                  "answer streams (see stream_format)")

    @property
    def format(self) -> str:
        return self.response_format or "mp3"


class TTSRequest(BarkOptions, OutputOptions):
    """POST /v1/tts: the native API (JSON or msgpack)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    text: str | None = Field(None, description="the text to speak (or send a script)")
    script: Script | None = Field(None, description="instead of text: [{voice, text}, ...] lines; each speaker "
                                                    "continues its own voice from its own previous lines")
    voice: Annotated[VoiceName | dict[str, Any] | None, BeforeValidator(voice_ref)] = Field(
        None, description="preset name or alias, {\"id\": NAME}, or arrays: semantic_prompt, coarse_prompt, "
                          "fine_prompt")
    format: Literal["wav", "flac", "mp3", "opus", "aac", "pcm"] = "wav"
    stream: bool = Field(False, description="send the audio as segments finish, in any format")
    priority: Priority = Priority.INTERACTIVE

    @model_validator(mode="after")
    def _text_or_script(self):
        check_text_or_script(self.text, self.script, self.voice)
        return self

    def lines(self) -> list[tuple[str, str]] | None:
        """The script as (voice, text) pairs (None for a text request)."""
        return None if self.script is None else [(line.voice, line.text) for line in self.script]
