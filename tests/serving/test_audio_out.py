"""Audio out, end to end on the real app: every format streams (official openai client), SSE, speed, joins.

"Before the last segment is synthesized" is checked against the codec deployment itself: the test reads
how many segments the (one) codec replica has decoded the moment the first bytes arrive.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import msgpack
import numpy as np
import pytest

from bark_serve.stages.encoders import from_pcm16
from bark_serve.stages.longform import split_text
from bark_serve.stages.text import TextPreparer
from bark_serve.stages.weights import Checkpoint
from tests.serving.conftest import API_KEY

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SR = 24_000
QUANT = 2 / 32767
TEXT = ("The first sentence is here. A second one follows it. Then comes a third sentence. A fourth one is next. "
        "The fifth one is here. And a sixth to end it all.")
BARK = {"max_semantic_tokens": 24, "temperature": 0, "min_eos_p": None}  # greedy: the same audio every time
FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"]
# Seconds a decoded answer may run long: a streamed mp3 by its end padding (under one 576-sample frame; a
# whole one is exact), aac (ADTS) by AAC's 1024 priming samples and up to 1023 of padding
# (tests/serving/test_encoder_delay.py); the others are exact up to the 2 ms opus' 48 kHz rounds to.
CODEC_SLACK_S = {"mp3": 576 / SR, "aac": 2048 / SR}
EXACT_S = 0.002


def slack(fmt: str) -> float:
    return CODEC_SLACK_S.get(fmt, EXACT_S)


@pytest.fixture(scope="module")
def n_segments(tiny_ckpt) -> int:
    """How many segments the app cuts TEXT into (e2e_config: segment_max_tokens 24)."""
    text = TextPreparer.from_checkpoint(Checkpoint.open(str(tiny_ckpt)))
    n = len(split_text(TEXT, text.count, 24))
    assert n >= 4
    return n


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=API_KEY)


def codec_decoded() -> int:
    """Segments the codec replica has decoded so far (its engine's summed batch sizes)."""
    from ray import serve

    stats = serve.get_deployment_handle("CodecServer", app_name="bark").stats.remote().result(timeout_s=30)
    return int(stats["totals"].get("batch", 0))


def decoded_seconds(data: bytes, fmt: str) -> float:
    """Duration of encoded audio, decoded with PyAV (FFmpeg); pcm is counted."""
    if fmt == "pcm":
        return len(data) / 2 / SR
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(audio=0))
    assert frames, f"{fmt}: nothing decoded"
    return sum(f.samples for f in frames) / frames[0].sample_rate


def tts_pcm(url: str, **extra) -> np.ndarray:
    body = {"text": TEXT, "voice": "alloy", "format": "pcm", **BARK, **extra}  # alloy: the speech tests' voice
    r = httpx.post(url + "/v1/tts", json=body, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    return from_pcm16(r.content)


def sse_events(lines) -> list[dict]:
    """A plain SSE parser: the JSON of every ``data:`` field."""
    return [json.loads(line[len("data:"):].strip()) for line in lines if line.startswith("data:")]


@pytest.fixture(scope="module")
def reference(served) -> dict[float, np.ndarray]:
    """The whole answer (not streamed) at speed 1 and 2, with the server's default joins."""
    url, _ = served
    return {1.0: tts_pcm(url), 2.0: tts_pcm(url, speed=2.0)}


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac"])
def test_openai_client_streams_before_the_last_segment_is_synthesized(served, n_segments, reference, fmt):
    url, _ = served
    before = codec_decoded()
    with client(url).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT, response_format=fmt, extra_body=BARK) as resp:
        assert resp.headers["content-type"] == {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac"}[fmt]
        pieces = resp.iter_bytes()
        first = next(pieces)
        decoded_then = codec_decoded() - before  # an upper bound: it is read after the first bytes came
        data = first + b"".join(pieces)
    assert len(first) > 0 and decoded_then < n_segments, (decoded_then, n_segments)
    assert codec_decoded() - before == n_segments
    assert decoded_seconds(data, fmt) == pytest.approx(len(reference[1.0]) / SR, abs=slack(fmt))


def test_openai_client_sse_deltas_and_usage(served, n_segments, reference):
    url, _ = served
    before = codec_decoded()
    with client(url).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT, response_format="pcm", stream_format="sse",
            extra_body=BARK) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        decoded_then = codec_decoded() - before
        events = sse_events([first, *lines])
    assert decoded_then < n_segments
    deltas, done = events[:-1], events[-1]
    assert deltas and all(e["type"] == "speech.audio.delta" for e in deltas)
    pcm = from_pcm16(b"".join(base64.b64decode(e["audio"]) for e in deltas))
    np.testing.assert_allclose(pcm, reference[1.0], atol=QUANT)  # streamed == whole, joins included
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] >= n_segments
    assert 1 <= usage["output_tokens"] <= n_segments * BARK["max_semantic_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_sse_in_every_format_decodes_with_a_plain_parser(served, reference, fmt):
    url, _ = served
    body = {"model": "bark", "voice": "v2/en_speaker_6", "input": TEXT, "response_format": fmt,
            "stream_format": "sse", "speed": 2.0, **BARK}
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, headers=AUTH, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert [e["type"] for e in events][-1] == "speech.audio.done"
    data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert decoded_seconds(data, fmt) == pytest.approx(len(reference[2.0]) / SR, abs=slack(fmt))


@pytest.mark.parametrize("speed", [1.0, 2.0])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_streams_and_decodes_to_the_expected_length(served, reference, fmt, speed):
    url, _ = served
    with client(url).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT, response_format=fmt, speed=speed, extra_body=BARK) as resp:
        assert resp.headers["x-bark-stream"] == "1"
        data = resp.read()
    expected = len(reference[speed]) / SR
    assert decoded_seconds(data, fmt) == pytest.approx(expected, abs=slack(fmt))
    if fmt == "pcm":
        np.testing.assert_allclose(from_pcm16(data), reference[speed], atol=QUANT)  # streamed == whole


def test_speed_two_halves_the_duration(served, n_segments, reference):
    url, _ = served
    raw = {"trim_silence": False, "crossfade_ms": 0, "normalize_loudness": False}
    assert len(tts_pcm(url, speed=2.0, **raw)) == pytest.approx(len(tts_pcm(url, **raw)) / 2, rel=0.01)
    # joined: each segment is stretched before the joins, and the crossfades (20 ms each) keep their length
    overlap = (n_segments - 1) * int(SR * 0.02)
    assert len(reference[2.0]) + overlap == pytest.approx((len(reference[1.0]) + overlap) / 2, rel=0.01)


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
def test_full_answers_and_native_streams_in_every_format(served, reference, fmt):
    url, _ = served
    body = {"text": TEXT, "voice": "alloy", "format": fmt, **BARK}
    whole = httpx.post(url + "/v1/tts", json=body, headers=AUTH, timeout=300)
    assert whole.status_code == 200 and "x-bark-stream" not in whole.headers
    with httpx.stream("POST", url + "/v1/tts", json={**body, "stream": True}, headers=AUTH, timeout=300) as r:
        assert r.status_code == 200 and r.headers["x-bark-stream"] == "1"
        streamed = r.read()
    for data in (whole.content, streamed):
        assert decoded_seconds(data, fmt) == pytest.approx(len(reference[1.0]) / SR, abs=slack(fmt))


def test_joins_are_switchable_per_request_and_msgpack_streams_joined_audio(served, reference):
    url, _ = served
    raw = tts_pcm(url, trim_silence=False, crossfade_ms=0, normalize_loudness=False)
    joined = reference[1.0]
    assert not np.array_equal(raw, joined[:len(raw)])
    r = httpx.post(url + "/v1/tts", json={"text": TEXT, "voice": "alloy", "stream": True, **BARK},
                   headers={**AUTH, "Accept": "application/msgpack"}, timeout=300)
    parts = list(msgpack.Unpacker(io.BytesIO(r.content)))
    assert parts[-1]["done"] is True
    np.testing.assert_allclose(np.concatenate([from_pcm16(p["audio"]) for p in parts[:-1]]), joined, atol=QUANT)
    # only the crossfades: the raw length less one fade per join
    fades = tts_pcm(url, trim_silence=False, normalize_loudness=False, crossfade_ms=10)
    n_joins = len(parts) - 2
    assert len(fades) == len(raw) - n_joins * int(SR * 0.01)


def test_a_stream_of_nothing_is_still_a_valid_file(served):
    url, _ = served
    for fmt in ("mp3", "opus", "aac", "flac"):
        with client(url).audio.speech.with_streaming_response.create(
                model="tts-1", voice="alloy", input="hi", response_format=fmt,
                extra_body={"min_eos_p": 1e-9}) as resp:  # EOS wins the first step: no audio at all
            data = resp.read()
        assert decoded_seconds(data, fmt) < 0.1
