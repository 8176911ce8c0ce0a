"""Request bodies of the HTTP API (pydantic): the native body and OpenAI's, both over schema/request.py."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from bark_serve.schema.fields import MAX_VOICE_NAME, ScriptLine, VoiceRef
from bark_serve.schema.formats import FormatName
from bark_serve.schema.options import BarkOptions, OutputOptions, SynthesisOptions
from bark_serve.schema.request import SynthesisRequest

__all__ = ["MAX_VOICE_NAME", "BarkOptions", "OutputOptions", "ScriptLine", "SpeechRequest", "TTSRequest"]


class SpeechRequest(SynthesisOptions):
    """POST /v1/audio/speech: OpenAI's audio API, plus Bark's options as extra fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(..., max_length=256,
                       description="bark, tts-1, tts-1-hd, gpt-4o-mini-tts or the served checkpoint's name")
    input: str = Field(..., description="the text to speak")
    voice: VoiceRef = Field(..., description="a Bark preset (v2/en_speaker_6), an alias (alloy, ash, ...), "
                                             "or OpenAI's {\"id\": NAME} object holding either")
    response_format: FormatName | None = Field(
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

    def synthesis_request(self) -> SynthesisRequest:
        """This body as the one request every path takes (its options unchanged, mp3 unless asked otherwise)."""
        options = self.model_dump(include=set(SynthesisOptions.model_fields), exclude_unset=True)
        return SynthesisRequest(text=self.input, voice=self.voice, format=self.format, **options)


class TTSRequest(SynthesisRequest):
    """POST /v1/tts: the native API (JSON or msgpack): a SynthesisRequest, and whether to stream."""

    stream: bool = Field(False, description="send the audio as segments finish, in any format")
