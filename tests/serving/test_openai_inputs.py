"""What OpenAI-style clients send, against the real served app (real Ray, HTTP, the official ``openai`` client):
every voice name, voice objects, instructions, absent and null optional fields; and multi-speaker scripts
(HTTP, streaming, msgpack, the Ray handle), whose audio equals the in-process pipeline's."""

from __future__ import annotations

import base64
import io

import httpx
import msgpack
import numpy as np
import pytest
import soundfile as sf

from bark_serve.serving.config import OPENAI_VOICES
from bark_serve.stages.encoders import from_pcm16
from bark_serve.stages.types import GenerationParams
from tests.serving.conftest import API_KEY
from tests.serving.e2e_helpers import assert_error_shape

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# greedy, and the model's raw samples (no trim, crossfade or loudness), as the in-process references are
RAW = {"trim_silence": False, "crossfade_ms": 0, "normalize_loudness": False}
GREEDY = {"temperature": 0, "min_eos_p": None, **RAW}
QUANT = 2 / 32767  # 16-bit PCM quantization
SEGMENT_TOKENS = 24  # e2e_config's orchestrator.segment_max_tokens
SCRIPT = [{"voice": "v2/en_speaker_6", "text": "Welcome back to the podcast. Today we talk about trains."},
          {"voice": "v2/de_speaker_3", "text": "Guten Tag! Ich freue mich sehr."},
          {"voice": "alloy", "text": "So do we. Let us start with the first question, then."},
          {"voice": {"id": "v2/de_speaker_3"}, "text": "Gerne."}]
SCRIPT_LINES = [("v2/en_speaker_6", SCRIPT[0]["text"]), ("v2/de_speaker_3", SCRIPT[1]["text"]),
                ("v2/en_speaker_6", SCRIPT[2]["text"]), ("v2/de_speaker_3", SCRIPT[3]["text"])]


def expected(pipe, text, voice, n):
    return pipe.synthesize(text, voice, GenerationParams.greedy(max_semantic_tokens=n, min_eos_p=None),
                           max_segment_tokens=SEGMENT_TOKENS).audio


def expected_script(pipe, n, seed=None):
    params = GenerationParams.greedy(max_semantic_tokens=n, min_eos_p=None) if seed is None else \
        GenerationParams(max_semantic_tokens=n, seed=seed)
    return pipe.synthesize_script(SCRIPT_LINES, params, max_segment_tokens=SEGMENT_TOKENS).audio


def wav(content: bytes) -> np.ndarray:
    data, sr = sf.read(io.BytesIO(content), dtype="float32")
    assert sr == 24000
    return data


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=API_KEY)


def test_every_openai_voice_name_speaks_its_preset(served, pipe):
    url, _ = served
    listed = httpx.get(url + "/v1/voices", headers=AUTH, timeout=30).json()["aliases"]
    assert listed == OPENAI_VOICES and len(listed) == 13
    openai = client(url)
    for name, preset in OPENAI_VOICES.items():
        resp = openai.audio.speech.create(model="gpt-4o-mini-tts", voice=name, input="Hello there.",
                                          response_format="wav", extra_body={"max_semantic_tokens": 6, **GREEDY})
        np.testing.assert_allclose(wav(resp.content), expected(pipe, "Hello there.", preset, 6), atol=QUANT,
                                   err_msg=name)


def test_voice_object_and_instructions_through_the_openai_client(served, pipe):
    url, _ = served
    openai = client(url)
    ref = expected(pipe, "An object voice.", "v2/en_speaker_4", 8)
    extra = {"max_semantic_tokens": 8, **GREEDY}
    for voice in ({"id": "ash"}, {"id": "v2/en_speaker_4"}):
        resp = openai.audio.speech.create(model="tts-1", voice=voice, input="An object voice.",
                                          response_format="wav", instructions="Speak calmly, like a narrator.",
                                          extra_body=extra)
        np.testing.assert_allclose(wav(resp.content), ref, atol=QUANT, err_msg=str(voice))
    from openai import BadRequestError, UnprocessableEntityError

    with pytest.raises(BadRequestError, match="unknown voice"):
        openai.audio.speech.create(model="tts-1", voice={"id": "voice_1234"}, input="x", extra_body=extra)
    with pytest.raises(UnprocessableEntityError, match="only 'id'"):
        openai.audio.speech.create(model="tts-1", voice={"id": "ash", "name": "x"}, input="x", extra_body=extra)
    with pytest.raises(UnprocessableEntityError, match="instructions"):
        openai.audio.speech.create(model="tts-1", voice="ash", input="x", instructions="x" * 5000)


def test_absent_and_null_optional_fields_are_the_defaults(served, pipe):
    url, _ = served
    ref = expected(pipe, "Nulls are fine.", "v2/en_speaker_6", 8)
    nulls = {"speed": None, "response_format": None, "stream_format": None, "instructions": None, "seed": None,
             "top_k": None, "top_p": None, "semantic_temperature": None}
    body = {"model": "tts-1", "input": "Nulls are fine.", "voice": "alloy", "max_semantic_tokens": 8, **GREEDY}
    r = httpx.post(url + "/v1/audio/speech", json={**body, **nulls}, headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg", r.text  # null format: mp3
    assert sf.info(io.BytesIO(r.content)).format == "MP3"
    r = httpx.post(url + "/v1/audio/speech", json={**body, **nulls, "response_format": "wav"}, headers=AUTH,
                   timeout=120)
    np.testing.assert_allclose(wav(r.content), ref, atol=QUANT)
    tts = {"text": "Nulls are fine.", "voice": "alloy", "format": None, "stream": None, "priority": None,
           "script": None, "max_semantic_tokens": 8, **GREEDY}
    for voice in ("alloy", {"id": "alloy"}, {"id": "v2/en_speaker_6"}):
        r = httpx.post(url + "/v1/tts", json={**tts, "voice": voice}, headers=AUTH, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav", r.text
        np.testing.assert_allclose(wav(r.content), ref, atol=QUANT)
    # the official client with only the required fields, and with explicit None where its types allow it
    resp = client(url).audio.speech.create(model="tts-1", voice="alloy", input="Nulls are fine.",
                                           extra_body={"max_semantic_tokens": 8, "response_format": None, **GREEDY})
    assert sf.info(io.BytesIO(resp.content)).format == "MP3"
    # required fields stay required
    for missing in ("input", "voice", "model"):
        r = httpx.post(url + "/v1/audio/speech", json={**body, missing: None}, headers=AUTH, timeout=30)
        assert r.status_code == 422 and missing in assert_error_shape(r, missing)["message"]


@pytest.mark.parametrize("seed", [None, 11], ids=["greedy", "seeded"])
def test_a_served_script_equals_the_in_process_script(served, pipe, seed):
    url, _ = served
    opts = {"max_semantic_tokens": 8, **(GREEDY if seed is None else {"seed": seed, **RAW})}
    r = httpx.post(url + "/v1/tts", json={"script": SCRIPT, **opts, "format": "pcm"},
                   headers={**AUTH, "Accept": "application/json"}, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["segments"] > len(SCRIPT)  # long lines were split, each in its speaker's voice
    np.testing.assert_allclose(from_pcm16(base64.b64decode(out["audio_base64"])), expected_script(pipe, 8, seed),
                               atol=QUANT)


def test_a_script_streams_in_script_order(served, pipe):
    url, _ = served
    ref = expected_script(pipe, 6)
    req = {"script": SCRIPT, "max_semantic_tokens": 6, "stream": True, **GREEDY}
    with httpx.stream("POST", url + "/v1/tts", json={**req, "format": "pcm"}, headers=AUTH, timeout=300) as r:
        assert r.status_code == 200 and r.headers["x-bark-stream"] == "1"
        raw = b"".join(r.iter_bytes())
    np.testing.assert_allclose(from_pcm16(raw), ref, atol=QUANT)
    body = msgpack.packb(req)
    r = httpx.post(url + "/v1/tts", content=body, timeout=300,
                   headers={**AUTH, "Content-Type": "application/msgpack", "Accept": "application/msgpack"})
    chunks = list(msgpack.Unpacker(io.BytesIO(r.content)))[:-1]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    lines = [c["line"] for c in chunks]  # each chunk says which script line it belongs to
    assert sorted(set(lines)) == list(range(len(SCRIPT))) and lines == sorted(lines) and len(lines) > len(SCRIPT)
    np.testing.assert_allclose(np.concatenate([from_pcm16(c["audio"]) for c in chunks]), ref, atol=QUANT)


def test_the_ray_handle_takes_a_script(served, pipe):
    from ray import serve

    handle = serve.get_app_handle("bark")
    out = handle.synthesize.remote(script=SCRIPT, max_semantic_tokens=6, **GREEDY).result(timeout_s=300)
    np.testing.assert_allclose(out["audio"], expected_script(pipe, 6), atol=1e-5)
    from bark_serve.stages.types import InvalidRequestError

    bad_scripts = {"at least 1 item": [], "unknown voice 'nobody'": [{"voice": "nobody", "text": "hi"}],
                   "script line 0: text is empty": [{"voice": "alloy", "text": " "}],
                   "exactly one of 'text' and 'script'": [{"voice": "alloy", "text": "hi"}]}
    for message, bad in bad_scripts.items():
        text = "also text" if message.startswith("exactly") else None
        with pytest.raises(InvalidRequestError) as info:  # Ray's error is also the replica's exception class
            handle.synthesize.remote(text, script=bad, max_semantic_tokens=2).result(timeout_s=60)
        assert message in str(info.value), str(info.value)[-1000:]


@pytest.mark.parametrize("script,status,code", [
    ([], 422, "invalid_parameters"),
    ([{"voice": "alloy", "text": "   "}], 400, "invalid_request"),
    ([{"voice": "nobody", "text": "hi"}], 400, "voice_not_found"),
    ([{"voice": "alloy", "text": "x" * 2500}, {"voice": "echo", "text": "y" * 2500}], 413, "input_too_large"),
    ([{"voice": "alloy", "text": "hi"}] * 1001, 422, "invalid_parameters"),
    ([{"voice": ["alloy"], "text": "hi"}], 422, "invalid_parameters"),
])
def test_bad_scripts_get_a_clear_4xx(served, script, status, code):
    url, _ = served
    r = httpx.post(url + "/v1/tts", json={"script": script, "max_semantic_tokens": 2}, headers=AUTH, timeout=60)
    err = assert_error_shape(r, code)
    assert r.status_code == status and err["code"] == code, r.text
