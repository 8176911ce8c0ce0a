"""Output options (speed, joins) from the request and the config, and the encoders, without Ray."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from pydantic import ValidationError

from bark_serve.serving.api_models import SpeechRequest, TTSRequest
from bark_serve.serving.config import ConfigError, parse_config
from bark_serve.stages.audio import PostProcess, join_segments
from bark_serve.stages.encoders import FORMATS, AudioOut, encode, from_pcm16, open_encoder, to_pcm16

SR = 24_000


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(SR * seconds)) / SR)).astype(np.float32)


def test_request_fields_override_the_config_and_null_means_the_config():
    cfg = parse_config({"audio": {"crossfade_ms": 35, "target_lufs": -23, "trim_silence": False}})
    req = TTSRequest(text="hi", crossfade_ms=None, normalize_loudness=False, speed=1.5)
    assert req.post_process(cfg.audio) == PostProcess(trim_silence=False, crossfade_ms=35, target_lufs=-23,
                                                      normalize_loudness=False, speed=1.5)
    speech = SpeechRequest(model="tts-1", input="hi", voice="alloy", response_format=None, speed=None)
    assert speech.format == "mp3" and speech.post_process(parse_config({}).audio) == PostProcess()


def test_bad_audio_config_is_refused():
    for bad in ({"crossfade_ms": -1}, {"target_lufs": 3}, {"trim_threshold_db": 0}, {"unknown": 1},
                {"normalize_loudness": "sometimes"}):
        with pytest.raises(ConfigError, match="audio"):
            parse_config({"audio": bad})


@pytest.mark.parametrize("speed", [0, 0.2, 4.5, float("nan"), float("inf"), "fast"])
def test_speed_out_of_range_is_refused(speed):
    with pytest.raises(ValidationError):
        SpeechRequest(model="tts-1", input="hi", voice="alloy", speed=speed)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray() for f in container.decode(audio=0)]
        rate = container.streams.audio[0].codec_context.sample_rate
    return np.concatenate(frames, axis=1)[0], rate


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "pcm"])
def test_incremental_encoding_gives_one_valid_file_with_bytes_after_every_piece(fmt):
    enc = open_encoder(fmt, SR, stream=True)
    pieces = [enc.feed(tone(0.5, f)) for f in (200, 300, 400)] + [enc.close()]
    assert all(len(p) > 0 for p in pieces[:3]), [len(p) for p in pieces]  # bytes leave with every segment
    audio, rate = decode(b"".join(pieces))
    assert len(audio) / rate == pytest.approx(1.5, abs=0.1)
    whole, rate = decode(encode(np.concatenate([tone(0.5, f) for f in (200, 300, 400)]), SR, fmt))
    assert len(whole) / rate == pytest.approx(1.5, abs=0.1)  # aac: priming + padding


def test_audio_out_streams_what_a_whole_join_gives():
    segments = [tone(0.4, f) for f in (200, 250, 300)]
    post = PostProcess(speed=1.5)
    out = AudioOut("pcm", SR, post)
    data = b"".join(out(s, i == len(segments) - 1) for i, s in enumerate(segments))
    whole = join_segments(segments, SR, post)
    assert data == encode(whole, SR, "pcm")


def test_nan_and_inf_never_reach_an_encoder_and_finite_samples_are_only_clipped():
    odd = np.array([np.nan, np.inf, -np.inf, 0.5, 1.5, -2.0], np.float32)
    np.testing.assert_allclose(from_pcm16(to_pcm16(odd)), [0.0, 1.0, -1.0, 0.5, 1.0, -1.0], atol=1e-4)
    finite = np.random.default_rng(1).uniform(-1.2, 1.2, 5000).astype(np.float32)
    assert to_pcm16(finite) == (np.clip(finite, -1, 1) * 32767.0).round().astype("<i2").tobytes()
    flac = av.open(io.BytesIO(encode(odd, SR, "flac")))  # lossless: the sanitised samples come back
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in flac.decode(audio=0)])
    scale = 32768.0 if pcm.dtype.kind == "i" else 1.0
    np.testing.assert_allclose(pcm[:6] / scale, [0.0, 1.0, -1.0, 0.5, 1.0, -1.0], atol=1e-3)
