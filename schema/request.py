"""One synthesis request, as every entry point takes it: text or a script, a voice, the options, the format.

``SynthesisRequest`` is the schema of what a caller may ask; the native HTTP body (``TTSRequest``,
serving/api_models.py) adds only ``stream``, OpenAI's body is translated into it, and a batch item or
a batch item becomes one through ``item_request``. Each rule is checked here, once: text
xor script, no top-level voice with a script, numeric ranges, the format; the planner
(stages/plan.py) and everything after it trust the result.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from bark_serve.stages.types import InvalidRequestError, Priority

from .fields import Script, VoiceName, check_text_or_script, voice_ref
from .formats import FormatName
from .options import SynthesisOptions
from .untrusted import invalid_request

Line = tuple[Any, str]  # (voice, text): what the planner takes


class SynthesisRequest(SynthesisOptions):
    """Text (or a multi-speaker script), the voice, Bark's knobs, the output options, the format, the priority."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    text: str | None = Field(None, description="the text to speak (or send a script)")
    script: Script | None = Field(None, description="instead of text: [{voice, text}, ...] lines; each speaker "
                                                    "continues its own voice from its own previous lines")
    voice: Annotated[VoiceName | dict[str, Any] | None, BeforeValidator(voice_ref)] = Field(
        None, description="preset name or alias, {\"id\": NAME}, or arrays: semantic_prompt, coarse_prompt, "
                          "fine_prompt")
    format: FormatName = "wav"
    priority: Priority = Priority.INTERACTIVE

    @model_validator(mode="after")
    def _text_or_script(self):
        check_text_or_script(self.text, self.script, self.voice)
        return self

    def lines(self) -> list[Line] | None:
        """The script as (voice, text) pairs (None for a text request)."""
        return None if self.script is None else [(line.voice, line.text) for line in self.script]

    def named_voices(self) -> set[str]:
        """The voices this request names (presets, aliases, registered voices), not inline arrays."""
        voices = [self.voice] if self.script is None else [line.voice for line in self.script]
        return {v for v in voices if isinstance(v, str)}


def item_request(text: str | None, script: list[dict] | None, voice: str | None, format: str, seed: int | None,
                 options: dict | None, priority: Priority = Priority.BATCH) -> SynthesisRequest:
    """A batch item or dataset row (its fields and its ``options`` map) as a request; InvalidRequestError if bad.

    The one place an item becomes a request: at submission (every item is checked before it is queued)
    and in the batch worker.
    """
    options = dict(options or {})
    repeated = sorted(set(options) & {"text", "script", "voice", "format", "seed", "priority"})
    if repeated:
        raise InvalidRequestError(f"options repeat an item field ({', '.join(repeated)[:200]})")
    try:
        return SynthesisRequest(text=text if script is None else None, script=script, voice=voice, format=format,
                                seed=seed, priority=priority, **options)
    except ValidationError as exc:
        raise invalid_request(exc) from None
