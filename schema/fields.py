"""Request fields shared by the HTTP request models (serving/api_models.py) and batch items (batch_types.py).

- ``NullMeansDefault``: a base model on which an optional field sent as null takes its default, as
  OpenAI-style clients send them (``"speed": null``). A field whose own type admits None keeps an
  explicit null (``min_eos_p: null`` disables the EOS threshold); required fields stay required.
- ``VoiceName`` and ``voice_ref``: a voice named by a string or by OpenAI's ``{"id": NAME}`` object.
- ``ScriptLine``: one line of a multi-speaker script, ``{"voice": ..., "text": ...}``.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

# A voice name longer than this is no preset (stages/voices.py refuses it too); bounded here so that
# a 100 KB name is refused by the request model, before any file-system lookup.
MAX_VOICE_NAME = 256
MAX_SCRIPT_LINES = 1000  # lines of one script; their characters together count against max_text_chars


def _admits_none(annotation: Any) -> bool:
    if annotation is None or annotation is type(None):
        return True
    if typing.get_origin(annotation) is Annotated:
        return _admits_none(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_admits_none(a) for a in typing.get_args(annotation))
    return annotation is Any


class NullMeansDefault(BaseModel):
    """A null optional field is read as absent (its default), unless the field's type admits None."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        drop = [k for k, v in data.items() if v is None and k in fields
                and not fields[k].is_required() and not _admits_none(fields[k].annotation)]
        return {k: v for k, v in data.items() if k not in drop} if drop else data


def _printable(name: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise PydanticCustomError("voice_name", "a voice name holds no control characters (NUL, newlines, ...)")
    return name


def voice_ref(value: Any) -> Any:
    """OpenAI's custom-voice object ``{"id": NAME}`` as the name it holds; anything else unchanged."""
    if isinstance(value, dict) and "id" in value:
        if set(value) != {"id"}:
            raise PydanticCustomError("voice_object", "a voice object holds only 'id' (OpenAI's {\"id\": NAME} shape)")
        if not isinstance(value["id"], str):
            raise PydanticCustomError("voice_object", "voice.id must be a string")
        return value["id"]
    return value


VoiceName = Annotated[str, Field(max_length=MAX_VOICE_NAME), AfterValidator(_printable)]
# a name, or {"id": NAME}: both resolve the same way (aliases, then presets)
_NAME_SCHEMA = {"type": "string", "maxLength": MAX_VOICE_NAME}
VoiceRef = Annotated[VoiceName, BeforeValidator(voice_ref), WithJsonSchema({"anyOf": [
    _NAME_SCHEMA, {"type": "object", "properties": {"id": _NAME_SCHEMA}, "required": ["id"],
                   "additionalProperties": False}]})]


class ScriptLine(BaseModel):
    """One line of a multi-speaker script: who speaks (a preset or alias, or {"id": NAME}) and what."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    voice: VoiceRef
    text: str = Field(..., min_length=1)


Script = Annotated[list[ScriptLine], Field(min_length=1, max_length=MAX_SCRIPT_LINES)]


def check_text_or_script(text: str | None, script: list | None, voice: Any = None) -> None:
    """Exactly one of ``text`` and ``script``, and no top-level ``voice`` with a script (a validation error)."""
    if script is not None and voice is not None:
        raise PydanticCustomError("script_voice", "a script names the voice of each line: "
                                  "send no top-level 'voice' with it")
    if text is not None and script is not None:
        raise PydanticCustomError("text_or_script", "send exactly one of 'text' and 'script'")
    if text is None and script is None:
        raise PydanticCustomError("missing", "text: Field required (or send a 'script' of {voice, text} lines)")
