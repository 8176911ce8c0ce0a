"""Audio encoding for responses and files: wav, flac, mp3, opus (soundfile/libsndfile) and raw pcm.

``pcm`` is what OpenAI's audio API calls pcm: 16-bit signed little-endian mono
samples at the model's rate (24 kHz for Bark), no header.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

from bark_serve.stages.types import InvalidRequestError

# format -> (libsndfile container, subtype, media type)
FORMATS: dict[str, tuple[str | None, str | None, str]] = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
    "pcm": (None, None, "audio/pcm"),
}
EXTENSIONS = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".ogg": "opus", ".opus": "opus", ".pcm": "pcm",
              ".raw": "pcm"}


def check_format(fmt: str) -> str:
    fmt = (fmt or "wav").lower()
    if fmt not in FORMATS:
        raise InvalidRequestError(f"unsupported response_format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def media_type(fmt: str) -> str:
    return FORMATS[check_format(fmt)][2]


def format_for_path(path: str) -> str:
    """Audio format from a file name's extension (wav if unknown)."""
    for ext, fmt in EXTENSIONS.items():
        if str(path).lower().endswith(ext):
            return fmt
    raise InvalidRequestError(f"cannot tell the audio format of {path!r}: use one of {', '.join(EXTENSIONS)}")


def to_pcm16(audio: np.ndarray) -> bytes:
    """float waveform in [-1, 1] -> 16-bit little-endian PCM bytes."""
    clipped = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return (clipped * 32767.0).round().astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0


def encode(audio: np.ndarray, sample_rate: int, fmt: str = "wav") -> bytes:
    """Encode a mono float waveform in the given format."""
    fmt = check_format(fmt)
    if fmt == "pcm":
        return to_pcm16(audio)
    container, subtype, _ = FORMATS[fmt]
    buf = io.BytesIO()
    data = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    if data.size == 0 and fmt != "wav":  # flac/mp3/opus cannot hold zero frames: 10 ms of silence stands in
        data = np.zeros((sample_rate // 100,), dtype=np.float32)
    sf.write(buf, data, sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header of unknown length, for streaming (players read to the end)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", unknown))
