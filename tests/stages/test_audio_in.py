"""Uploaded clips (stages/audio_in.py): every format decodes to the same mono samples, every bad upload is
refused with a clear message, and without PyAV wav and flac still decode while anything else names the
missing package."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import soundfile as sf

from bark_serve.stages.audio_in import MissingPackage, decode_clip, resample
from bark_serve.stages.types import InvalidRequestError

RATE = 24_000
LIMITS = {"max_bytes": 10 << 20, "max_s": 30.0}


def tone(seconds: float = 2.0, rate: int = RATE, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = RATE, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    """samples (n,) or (n, channels)."""
    buf = io.BytesIO()
    sf.write(buf, samples, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


def av_bytes(samples: np.ndarray, container: str, codec: str, rate: int = RATE) -> bytes:
    """Encode (channels, n) float samples with PyAV (FFmpeg)."""
    import av

    samples = np.atleast_2d(samples).astype(np.float32)
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def decode(data: bytes, **limits) -> tuple[np.ndarray, int]:
    return decode_clip(data, **{**LIMITS, **limits})


def lag_corr(a: np.ndarray, b: np.ndarray, max_lag: int = 3000) -> float:
    """Best normalised correlation of b against a within +-max_lag samples (codecs add delay)."""
    n = min(len(a), len(b)) - max_lag
    best = 0.0
    x = a[max_lag:max_lag + n - max_lag]
    for lag in range(0, 2 * max_lag, 4):
        y = b[lag:lag + len(x)]
        if len(y) < len(x):
            break
        best = max(best, float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12)))
    return best


# --- what is accepted ------------------------------------------------------------------------------------------

def test_wav_decodes_exactly_and_stereo_is_mixed_to_mono():
    x = tone()
    audio, rate = decode(wav_bytes(x, subtype="FLOAT"))
    assert rate == RATE and audio.dtype == np.float32
    np.testing.assert_array_equal(audio, x)
    stereo = np.stack([x, 0.5 * x], axis=1)  # (n, 2)
    audio, _ = decode(wav_bytes(stereo, subtype="FLOAT"))
    np.testing.assert_allclose(audio, 0.75 * x, atol=1e-7)
    audio, _ = decode(wav_bytes(x, subtype="PCM_16"))
    np.testing.assert_allclose(audio, x, atol=1 / 32768 + 1e-6)


@pytest.mark.parametrize("container,codec,rate", [("flac", "flac", RATE), ("mp3", "libmp3lame", RATE),
                                                  ("ogg", "libopus", 48_000), ("ipod", "aac", RATE),
                                                  ("wav", "pcm_s24le", 44_100), ("wav", "pcm_u8", RATE)])
def test_compressed_formats_decode(container, codec, rate):
    """flac, mp3, ogg/opus, m4a (the ipod muxer writes .m4a), 24-bit and 8-bit wav: the same sound comes back."""
    x = tone(2.0, rate)
    audio, got_rate = decode(av_bytes(np.stack([x, x]), container, codec, rate))
    assert got_rate == rate and audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(x)) <= 0.05 * rate  # codec padding and priming only
    assert lag_corr(x, audio) > 0.97


def test_limits_that_are_met_pass():
    x = tone(1.0, 16_000)
    assert decode(wav_bytes(x, 16_000), min_s=1.0)[1] == 16_000
    assert decode(wav_bytes(tone(1.0, 96_000), 96_000))[1] == 96_000
    data = wav_bytes(x, 16_000)
    assert decode(data, max_bytes=len(data))[0].size == x.size
    quiet = tone(2.0, amplitude=0.002)  # -54 dBFS peak: quiet, not silent
    assert decode(wav_bytes(quiet, subtype="FLOAT"))[0].size == quiet.size


# --- what is refused --------------------------------------------------------------------------------------------

def refused(data: bytes, match: str, **limits) -> str:
    with pytest.raises(InvalidRequestError, match=match) as info:
        decode(data, **limits)
    return str(info.value)


def test_not_audio_and_empty_are_refused():
    refused(b"", "empty")
    refused(b"this is plain text, not audio at all. " * 50, "not an audio file")
    refused(np.random.default_rng(0).bytes(20_000), "not an audio file")
    refused(b"%PDF-1.7\n" + b"0" * 4000, "not an audio file")
    good = wav_bytes(tone())
    refused(good[: len(good) // 50], "holds no samples|could not be decoded|not an audio file|long")


def test_other_containers_are_refused():
    """A playlist or an image is refused by name, even where FFmpeg could open it."""
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    refused(playlist, "not an audio file")
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), dtype=np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    message = refused(buf.getvalue(), "not an audio file")
    assert "png" in message


def test_short_long_and_big_uploads_are_refused():
    assert "0.50 s long; at least 1 s" in refused(wav_bytes(tone(0.5)), "at least")
    refused(wav_bytes(tone(0.9)), "at least 2 s", min_s=2.0)
    refused(wav_bytes(tone(5.0)), "at most 4 s", max_s=4.0)
    refused(av_bytes(tone(5.0)[None], "flac", "flac"), "longer than 4 s", max_s=4.0)  # stopped while decoding
    data = wav_bytes(tone(2.0))
    assert f"{len(data)} bytes; at most 1000 bytes" in refused(data, "bytes", max_bytes=1000)


def test_channels_and_rates_are_refused():
    x = tone(1.5)
    assert "8 channels" in refused(wav_bytes(np.stack([x] * 8, axis=1)), "channels")
    refused(wav_bytes(np.stack([x] * 3, axis=1)), "3 channels; only mono or stereo")
    assert "8000 Hz" in refused(wav_bytes(tone(1.5, 8_000), 8_000), "sample rate")
    assert "192000 Hz" in refused(wav_bytes(tone(1.5, 192_000), 192_000), "sample rate")
    refused(wav_bytes(tone(1.5, 11_025), 11_025), r"\[16000, 96000\] Hz")


def test_bad_samples_and_silence_are_refused():
    x = tone(2.0)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[1000] = bad
        refused(wav_bytes(y, subtype="FLOAT"), "NaN or infinite")
    assert "-inf dBFS" in refused(wav_bytes(np.zeros(RATE * 2, dtype=np.float32)), "silent")
    refused(wav_bytes(tone(2.0, amplitude=0.0005), subtype="FLOAT"), r"silent \(peak -66.0 dBFS, below -60 dBFS\)")



def pcm_wav_header_only_lies(bits: int, data: bytes) -> bytes:
    """A hand-made PCM WAV whose fmt chunk says ``bits`` bits per sample (0: no codec FFmpeg can open)."""
    import struct

    fmt = struct.pack("<HHIIHH", 1, 1, RATE, 0, 0, bits)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_a_header_naming_no_decoder_is_refused():
    """FFmpeg opens a WAV of 0-bit PCM but gives its stream no codec context (was an AttributeError: a 500)."""
    refused(pcm_wav_header_only_lies(0, b"\0\1" * RATE), "could not be decoded")


def test_mutated_headers_are_refused_or_decoded_never_crash():
    """Random bytes written over the first 200 bytes of wav, flac, ogg/opus and mp3 clips: each one decodes or is
    refused with InvalidRequestError, never another exception (a fuzz of 6000 such clips found the case above)."""
    rng = np.random.default_rng(7)
    x = tone(1.5)
    clips = [wav_bytes(x), wav_bytes(x, subtype="FLOAT"), av_bytes(x[None], "flac", "flac"),
             av_bytes(x[None], "ogg", "libopus", 48_000), av_bytes(x[None], "mp3", "libmp3lame")]
    outcomes = {"decoded": 0, "refused": 0}
    for clip in clips:
        for _ in range(120):
            data = bytearray(clip)
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(0, 200))] = int(rng.integers(0, 256))
            try:
                with np.errstate(invalid="ignore"):
                    decode(bytes(data))
                outcomes["decoded"] += 1
            except InvalidRequestError:
                outcomes["refused"] += 1
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0, outcomes

# --- without PyAV ----------------------------------------------------------------------------------------------

def test_without_pyav_wav_and_flac_decode_and_the_rest_name_the_package(monkeypatch):
    x = tone()
    stereo = np.stack([x, 0.5 * x], axis=1)
    expected = {name: decode(data)[0] for name, data in (("wav", wav_bytes(stereo)),
                                                         ("flac", wav_bytes(stereo, fmt="FLAC")))}
    mp3 = av_bytes(x[None], "mp3", "libmp3lame")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError now
    with pytest.raises(ImportError):
        import av  # noqa: F401
    for name, data in (("wav", wav_bytes(stereo)), ("flac", wav_bytes(stereo, fmt="FLAC"))):
        audio, rate = decode(data)
        assert rate == RATE
        np.testing.assert_allclose(audio, expected[name], atol=1e-6)  # the same samples as through PyAV
    with pytest.raises(MissingPackage) as info:
        decode(mp3)
    assert info.value.package == "av" and "PyAV" in str(info.value)
    assert not isinstance(info.value, InvalidRequestError)  # a 503 (the host), not a 4xx (the upload)
    # the upload's own faults are still the upload's
    refused(b"", "empty")
    assert "8 channels" in refused(wav_bytes(np.stack([x] * 8, axis=1)), "channels")
    refused(wav_bytes(tone(1.5, 8_000), 8_000), "sample rate")
    refused(wav_bytes(tone(5.0)), "longer than 4 s", max_s=4.0)
    refused(wav_bytes(np.zeros(RATE * 2, dtype=np.float32)), "silent")
    refused(b"RIFF" + b"\0" * 100, "could not be decoded")


# --- resampling --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src,dst,up,down", [(44_100, 16_000, 160, 441), (48_000, 24_000, 1, 2),
                                             (22_050, 24_000, 160, 147), (16_000, 24_000, 3, 2)])
def test_resample_is_exact_rational_polyphase(src, dst, up, down):
    from scipy.signal import resample_poly

    x = tone(1.3, src)
    y = resample(x, src, dst)
    assert y.dtype == np.float32 and len(y) == -(-len(x) * up // down)
    np.testing.assert_allclose(y, resample_poly(x, up, down).astype(np.float32), rtol=0, atol=0)
    t = np.arange(len(y)) / dst
    mid = slice(len(y) // 4, 3 * len(y) // 4)  # away from the filter's edges
    expected = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    assert np.abs(y[mid] - expected[mid]).max() < 0.01
    np.testing.assert_array_equal(resample(x, src, src), x)
