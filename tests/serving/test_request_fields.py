"""The request models' input rules, without Ray: voice names and {"id"}, instructions, nulls, scripts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bark_serve.cluster.batch_types import ItemIn, parse_item
from bark_serve.schema.fields import MAX_SCRIPT_LINES
from bark_serve.serving.api_models import BarkOptions, SpeechRequest, TTSRequest
from bark_serve.serving.config import OPENAI_VOICES, AudioConfig, BarkConfig
from bark_serve.stages import constants as C

OPENAI_NAMES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                "marin", "cedar")
SPEECH = {"model": "tts-1", "input": "hi", "voice": "alloy"}


def test_every_current_openai_voice_has_a_default_alias_to_an_english_preset():
    aliases = BarkConfig().voice_aliases
    assert set(OPENAI_NAMES) <= set(aliases) and aliases == OPENAI_VOICES
    assert all(aliases[n].startswith("v2/en_speaker_") for n in OPENAI_NAMES)
    assert aliases["alloy"] == "v2/en_speaker_6"  # the mappings that existed before stay as they were


@pytest.mark.parametrize("model", [SpeechRequest, TTSRequest])
def test_a_voice_object_with_an_id_is_read_as_that_name(model):
    base = SPEECH if model is SpeechRequest else {"text": "hi"}
    assert model.model_validate({**base, "voice": {"id": "ash"}}).voice == "ash"
    assert model.model_validate({**base, "voice": {"id": "v2/en_speaker_6"}}).voice == "v2/en_speaker_6"


@pytest.mark.parametrize("voice,message", [
    ({"id": "ash", "name": "x"}, "only 'id'"),
    ({"id": 5}, "voice.id must be a string"),
    ({"id": None}, "voice.id must be a string"),
    ({"id": ["ash"]}, "voice.id must be a string"),
    ({"id": "a\x00b"}, "control characters"),
    ({"id": "x" * 257}, "at most 256 characters"),
    ("alloy\n", "control characters"),
    ({}, "valid string"),
    (["alloy"], "valid string"),
])
def test_bad_voice_shapes_are_refused_by_the_speech_model(voice, message):
    with pytest.raises(ValidationError, match=message):
        SpeechRequest.model_validate({**SPEECH, "voice": voice})


def test_instructions_are_accepted_bounded_and_change_nothing():
    with_instructions = SpeechRequest.model_validate({**SPEECH, "instructions": "Speak like a pirate."})
    assert with_instructions.generation_params() == SpeechRequest.model_validate(SPEECH).generation_params()
    with pytest.raises(ValidationError, match="at most 4096"):
        SpeechRequest.model_validate({**SPEECH, "instructions": "x" * 4097})


def test_null_optional_fields_take_their_defaults():
    nulls = {k: None for k in ("speed", "response_format", "stream_format", "instructions", "seed", "temperature",
                               "semantic_temperature", "coarse_temperature", "fine_temperature", "top_k", "top_p",
                               "max_semantic_tokens")}
    req = SpeechRequest.model_validate({**SPEECH, **nulls})
    assert req == SpeechRequest.model_validate(SPEECH)
    assert req.format == "mp3" and req.max_semantic_tokens == C.MAX_SEMANTIC_TOKENS
    assert req.post_process(AudioConfig()).speed == 1.0  # null output options take the config's audio block
    tts = TTSRequest.model_validate({"text": "hi", "voice": None, "format": None, "stream": None, "priority": None,
                                     "script": None, "max_semantic_tokens": None})
    assert tts == TTSRequest.model_validate({"text": "hi"})
    item = ItemIn.model_validate({"text": "hi", "format": None, "options": None, "voice": None, "seed": None})
    assert item.format == "wav" and item.options == {}


def test_null_keeps_its_meaning_where_the_field_takes_null():
    assert BarkOptions.model_validate({"min_eos_p": None}).min_eos_p is None  # null disables the EOS threshold
    assert BarkOptions.model_validate({}).min_eos_p == C.DEFAULT_MIN_EOS_P


@pytest.mark.parametrize("body", [{**SPEECH, "input": None}, {**SPEECH, "voice": None}, {**SPEECH, "model": None}])
def test_null_required_fields_are_still_refused(body):
    with pytest.raises(ValidationError):
        SpeechRequest.model_validate(body)


def test_a_native_request_takes_text_or_a_script():
    script = [{"voice": "v2/en_speaker_6", "text": "Hi."}, {"voice": {"id": "nova"}, "text": "Hello."}]
    req = TTSRequest.model_validate({"script": script})
    assert req.lines() == [("v2/en_speaker_6", "Hi."), ("nova", "Hello.")] and req.text is None
    assert TTSRequest.model_validate({"text": "x"}).lines() is None


@pytest.mark.parametrize("body,message", [
    ({}, "text: Field required"),
    ({"text": None, "script": None}, "text: Field required"),
    ({"text": "hi", "script": [{"voice": "a", "text": "b"}]}, "exactly one"),
    ({"script": []}, "at least 1 item"),
    ({"script": [{"voice": "a", "text": "b"}] * (MAX_SCRIPT_LINES + 1)}, f"at most {MAX_SCRIPT_LINES} items"),
    ({"script": [{"voice": "a", "text": ""}]}, "at least 1 character"),
    ({"script": [{"voice": "a"}]}, "Field required"),
    ({"script": [{"text": "b"}]}, "Field required"),
    ({"script": [{"voice": "a", "text": "b", "speed": 2}]}, "Extra inputs"),
    ({"script": [{"voice": 1, "text": "b"}]}, "valid string"),
    ({"script": [{"voice": "a", "text": ["b"]}]}, "valid string"),
    ({"script": [["a", "b"]]}, "valid dictionary"),
    ({"script": "a: hello"}, "valid list"),
    ({"script": {"voice": "a", "text": "b"}}, "valid list"),
    ({"script": [{"voice": "a", "text": "b"}], "voice": "alloy"}, "no top-level 'voice'"),
])
def test_bad_scripts_are_refused_by_the_native_model(body, message):
    with pytest.raises(ValidationError, match=message):
        TTSRequest.model_validate(body)


def test_a_batch_item_takes_a_script_and_stores_it():
    raw = {"id": "dialogue", "script": [{"voice": "v2/en_speaker_6", "text": "Hi."},
                                        {"voice": {"id": "echo"}, "text": "Hello."}]}
    rec = parse_item(raw, 0, max_text_chars=100)
    assert rec.error is None and rec.text == ""
    assert rec.script == [{"voice": "v2/en_speaker_6", "text": "Hi."}, {"voice": "echo", "text": "Hello."}]
    from bark_serve.cluster.batch_types import ItemRecord

    assert ItemRecord.unpack(rec.pack()) == rec


@pytest.mark.parametrize("raw,message", [
    ({"script": [{"voice": "a", "text": "   "}]}, "script line 0: text is empty"),
    ({"script": [{"voice": "a", "text": "x" * 60}, {"voice": "b", "text": "y" * 60}]}, "120 characters"),
    ({"script": []}, "at least 1 item"),
    ({"text": "a", "script": [{"voice": "a", "text": "b"}]}, "exactly one"),
    ({}, "text: Field required"),
])
def test_bad_batch_scripts_fail_the_item_alone(raw, message):
    rec = parse_item(raw, 3, max_text_chars=100)
    assert rec.error is not None and message in rec.error, rec.error


@pytest.mark.parametrize("stream", [True, False, None])
def test_speech_takes_stream_as_other_openai_compatible_servers_do(stream):
    """Issue 25: ``"stream": true`` on /v1/audio/speech was a 422 (an unknown field); every answer streams."""
    req = SpeechRequest.model_validate({**SPEECH, "stream": stream})
    plain = SpeechRequest.model_validate(SPEECH)
    assert (req.format, req.stream_format, req.generation_params()) == \
        (plain.format, plain.stream_format, plain.generation_params())
    with pytest.raises(ValidationError):
        SpeechRequest.model_validate({**SPEECH, "stream": {"nested": 1}})
