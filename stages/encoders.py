"""Audio out, part two: the encoders' format table and the encoders (the joins they encode are in
stages/audio.py; ``AudioOut`` does both for one request).


Audio encoding for responses and files: mp3, opus, aac, flac (PyAV / FFmpeg), wav and raw pcm.

Every format is encoded incrementally: ``open_encoder(fmt, sr, stream=True)`` takes the audio a
piece at a time (``feed``) and returns the bytes that are ready, so a stream's first bytes leave
as soon as its first segment is decoded; ``close`` returns the rest. Concatenated, the pieces are
one valid file. ``encode`` is the whole-file case (seekable output, so mp3/flac headers carry the
final length).

Why PyAV: its wheels bundle FFmpeg with libmp3lame, libopus, FFmpeg's native AAC encoder and FLAC,
one maintained library for every format OpenAI's API names, with muxers that write to a
non-seekable stream (mp3 frames, Ogg pages, ADTS frames, FLAC frames). libsndfile (soundfile) has
no AAC and encodes only whole files.

Containers: mp3 is MPEG layer III frames, opus is Ogg Opus (pages of at most 60 ms, so they leave
with the segment that filled them), aac is ADTS (what ``audio/aac`` means), flac is native FLAC,
wav is 16-bit PCM (a stream's header says "unknown length", as players expect), ``pcm`` is what
OpenAI's API calls pcm: 16-bit signed little-endian mono samples at the model's rate (24 kHz for
Bark), no header. A whole mp3, and a streamed one through ``mp3_stream_info_frame``, tell decoders the
encoder delay; aac (ADTS) cannot, so decoders keep its 1024 priming samples.

Encoder delay, measured with PyAV (tests/serving/test_encoder_delay.py): FFmpeg's mp3 muxer writes a
LAME "Info" frame (its ``write_xing`` option, on by default) only to a seekable output, because it fills
in the frame count and the end padding when the file ends; ``encode`` writes to a BytesIO, so a whole
mp3 (of a frame or more) decodes to exactly its samples. A stream cannot be rewritten, so ours gets that
frame with the delay and the counts unknown (``mp3_stream_info_frame``): aligned, and at most one
576-sample frame long. For aac an MP4/M4A file would say the delay in an edit list, but it is
``audio/mp4`` rather than the ``audio/aac`` that OpenAI's ``aac`` means, it cannot be streamed as one
without fragmenting, and FFmpeg's decoders trim only its priming, not its end: ``aac`` stays ADTS, with
its limit documented.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass, field

import numpy as np

from .audio import PostProcess, SegmentJoiner, finite, optional_package
from .types import InvalidRequestError


# The encoders' table: every format a caller may ask for (schema/formats.py derives the API's list from it).
@dataclass(frozen=True)
class AudioFormat:
    media_type: str
    container: str | None = None  # FFmpeg muxer; None: written here (wav, pcm)
    codec: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # muxer options


FORMATS: dict[str, AudioFormat] = {
    "mp3": AudioFormat("audio/mpeg", "mp3", "libmp3lame"),
    "opus": AudioFormat("audio/ogg", "ogg", "libopus", {"page_duration": "60000"}),
    "aac": AudioFormat("audio/aac", "adts", "aac"),
    "flac": AudioFormat("audio/flac", "flac", "flac"),
    "wav": AudioFormat("audio/wav"),
    "pcm": AudioFormat("audio/pcm"),
}
EXTENSIONS = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".ogg": "opus", ".opus": "opus", ".aac": "aac",
              ".pcm": "pcm", ".raw": "pcm"}


def check_format(fmt: str) -> str:
    """``fmt`` lowered (empty: wav), or a clear error naming the formats."""
    fmt = (fmt or "wav").lower()
    if fmt not in FORMATS:
        raise InvalidRequestError(f"unsupported response_format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt



def media_type(fmt: str) -> str:
    """The Content-Type of ``fmt``."""
    return FORMATS[check_format(fmt)].media_type


def format_for_path(path: str) -> str:
    """Audio format from a file name's extension."""
    for ext, fmt in EXTENSIONS.items():
        if str(path).lower().endswith(ext):
            return fmt
    raise InvalidRequestError(f"cannot tell the audio format of {path!r}: use one of {', '.join(EXTENSIONS)}")


EMPTY_STAND_IN_S = 0.01  # mp3/opus/aac/flac cannot hold zero samples: 10 ms of silence stands in


def full_scale(audio: np.ndarray) -> np.ndarray:
    """float32 samples clipped to [-1, 1]; NaN becomes silence and infinities full scale (no encoder sees
    them). Finite samples are only clipped, exactly as before."""
    return np.clip(finite(audio), -1.0, 1.0)


def to_pcm16(audio: np.ndarray) -> bytes:
    """float waveform in [-1, 1] -> 16-bit little-endian PCM bytes."""
    return (full_scale(audio) * 32767.0).round().astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0


def wav_header(sample_rate: int, n_samples: int | None = None) -> bytes:
    """A 16-bit mono WAV header; ``n_samples`` None: unknown length, for streaming (players read to the end)."""
    data = 0xFFFFFFFF if n_samples is None else 2 * n_samples
    riff = 0xFFFFFFFF if n_samples is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", data))


class PcmEncoder:
    """pcm (and wav, with a header first): samples out as they come in."""

    def __init__(self, sample_rate: int, header: bytes = b""):
        self.sample_rate, self._pending = sample_rate, header

    def feed(self, audio: np.ndarray) -> bytes:
        out, self._pending = self._pending + to_pcm16(audio), b""
        return out

    def close(self) -> bytes:
        out, self._pending = self._pending, b""
        return out


class _Sink:
    """A write-only, non-seekable file for FFmpeg's muxers: what they write is taken out piece by piece."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def _id3_length(data: bytes) -> int:
    """Bytes of the ID3v2 tag at the head of an mp3 (0 without one)."""
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    size = 0
    for byte in data[6:10]:  # syncsafe: 7 bits a byte
        size = (size << 7) | (byte & 0x7F)
    return 10 + size + (10 if data[5] & 0x10 else 0)


def _crc16(data: bytes) -> int:
    """CRC-16/ARC (FFmpeg's AV_CRC_16_ANSI_LE), the LAME tag's checksum."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


# The Xing seek table of a constant-bitrate mp3 of any length: entry i is where i % of the audio starts, in
# 256ths of the file (libmp3lame here encodes at a constant bitrate; the table FFmpeg wrote was its sample's).
CBR_SEEK_TABLE = bytes(round(i * 2.56) for i in range(100))


@functools.lru_cache(maxsize=4)
def mp3_stream_info_frame(sample_rate: int) -> bytes:
    """The LAME "Info" frame that FFmpeg writes at the head of a whole mp3 file, made fit for a stream whose
    end is not known yet: the encoder delay is kept (decoders skip it, so the audio starts where it
    should), the frame and byte counts, the end padding and the music length are 0 (unknown), the seek
    table is a constant bitrate's (``CBR_SEEK_TABLE``), and the tag's CRC is computed again. Without it
    a streamed mp3 decoded 56 ms long and late by the delay."""
    whole = encode(np.zeros(sample_rate // 10, np.float32), sample_rate, "mp3")
    start = _id3_length(whole)
    header = whole[start:start + 2]
    end = whole.find(header, start + 4)  # the next frame
    frame = bytearray(whole[start:end])
    tag = max(frame.find(b"Info"), frame.find(b"Xing"))
    lame = tag + 120  # after "Info", flags, frames, bytes, the 100-byte TOC and the quality
    if tag < 0 or int.from_bytes(frame[tag + 4:tag + 8], "big") != 0xF or len(frame) < max(lame + 36, 190):
        return b""  # an FFmpeg that writes another layout: stream without it (decoders add the delay)
    frame[tag + 8:tag + 16] = bytes(8)  # frames, bytes: unknown
    frame[tag + 16:tag + 116] = CBR_SEEK_TABLE  # the sample file's table would send seeks to wrong places
    delay = int.from_bytes(frame[lame + 21:lame + 24], "big") >> 12
    frame[lame + 21:lame + 24] = (delay << 12).to_bytes(3, "big")  # end padding: unknown
    frame[lame + 28:lame + 32] = bytes(4)  # music length: unknown
    frame[lame + 34:lame + 36] = bytes(2)
    frame[lame + 34:lame + 36] = _crc16(bytes(frame[:190])).to_bytes(2, "big")
    return bytes(frame)


class AvEncoder:
    """mp3 / opus / aac / flac through PyAV: an FFmpeg encoder and muxer kept open across ``feed`` calls.

    A streamed mp3 gets the LAME Info frame a whole file has (``mp3_stream_info_frame``), after its ID3
    tag, so that decoders skip the encoder delay as they do for a file. ADTS (aac) has no place for the
    delay: decoders keep AAC's 1024 priming samples (43 ms at 24 kHz) and the last frame's padding."""

    def __init__(self, fmt: str, sample_rate: int, stream: bool = True):
        av = optional_package("av", f"{fmt} output (PyAV)")  # wav and pcm need no PyAV
        spec = FORMATS[fmt]
        if spec.codec is None:
            raise ValueError(f"{fmt!r} is not encoded through PyAV (open_encoder picks its encoder)")
        self.sample_rate, self.samples, self._closed = sample_rate, 0, False
        self._fmt, self._streaming = fmt, stream
        self._info = mp3_stream_info_frame(sample_rate) if fmt == "mp3" and stream else b""
        self._out = _Sink() if stream else io.BytesIO()  # BytesIO is seekable: headers get the final length
        self._container = av.open(self._out, mode="w", format=spec.container, options=dict(spec.options))
        audio = self._container.add_stream(spec.codec, rate=sample_rate, layout="mono")
        assert isinstance(audio, av.AudioStream), f"{spec.codec} is not an audio codec"
        self._stream = audio

    def _taken(self) -> bytes:
        out = self._out.take() if isinstance(self._out, _Sink) else b""
        if self._info and out:  # the muxer's first bytes: the ID3 tag, then the Info frame goes in
            head = _id3_length(out)
            out, self._info = out[:head] + self._info + out[head:], b""
        return out

    def feed(self, audio: np.ndarray) -> bytes:
        import av

        data = full_scale(audio)
        if data.size:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[None, :]), format="flt", layout="mono")
            frame.sample_rate, frame.pts = self.sample_rate, self.samples
            self.samples += data.size
            for packet in self._stream.encode(frame):  # PyAV converts and cuts frames to the codec's size
                self._container.mux(packet)
        return self._taken()

    def _trims_empty_tail(self) -> bool:
        """Leave out the flush's packets of no duration? libmp3lame's last frame, when the one before it holds
        the end (n + 1105 just past a multiple of 576), decodes to padding only, and FFmpeg's muxer takes the
        end padding from the last packet alone: with it, a whole mp3 decoded up to 46 samples long and a
        stream up to 622. A whole file under one frame keeps it (FFmpeg's demuxer would then trim less)."""
        return self._fmt == "mp3" and (self._streaming or self.samples >= self._stream.codec_context.frame_size)

    def close(self) -> bytes:
        """Flush the encoder and end the container: the last bytes (the whole file when not streaming)."""
        if self._closed:
            return b""
        out = b""
        if self.samples == 0:
            out += self.feed(np.zeros(max(1, int(self.sample_rate * EMPTY_STAND_IN_S)), np.float32))
        for packet in self._stream.encode(None):
            if packet.duration != 0 or not self._trims_empty_tail():  # None (not known): kept
                self._container.mux(packet)
        self._container.close()
        self._closed = True
        return out + (self._taken() if isinstance(self._out, _Sink) else self._out.getvalue())


def open_encoder(fmt: str, sample_rate: int, stream: bool = True) -> PcmEncoder | AvEncoder:
    """An incremental encoder of ``fmt``; ``stream`` False: the whole file comes at ``close`` (seekable)."""
    fmt = check_format(fmt)
    if fmt == "pcm":
        return PcmEncoder(sample_rate)
    if fmt == "wav":
        return PcmEncoder(sample_rate, wav_header(sample_rate))
    return AvEncoder(fmt, sample_rate, stream)


def encode(audio: np.ndarray, sample_rate: int, fmt: str = "wav") -> bytes:
    """Encode a whole mono float waveform in the given format."""
    fmt = check_format(fmt)
    if fmt == "wav":
        return wav_header(sample_rate, len(audio)) + to_pcm16(audio)
    enc = open_encoder(fmt, sample_rate, stream=False)
    return enc.feed(audio) + enc.close()


class AudioOut:
    """One request's audio on its way out: segments joined (``SegmentJoiner``) and encoded as each arrives.

    ``join(segment, last)`` gives the joined samples that are final (all the rest with the last segment),
    ``encode(samples, last)`` their bytes in ``fmt`` (the end of the file with the last). One per request,
    called from one thread at a time.
    """

    def __init__(self, fmt: str, sample_rate: int, post: PostProcess):
        self.sample_rate = sample_rate
        self.joiner = SegmentJoiner(sample_rate, post)
        self.encoder = open_encoder(fmt, sample_rate, stream=True)

    def join(self, segment: np.ndarray, last: bool) -> np.ndarray:
        out = self.joiner.push(segment)
        return np.concatenate([out, self.joiner.finish()]) if last else out

    def encode(self, samples: np.ndarray, last: bool) -> bytes:
        data = self.encoder.feed(samples)
        return data + self.encoder.close() if last else data

    def __call__(self, segment: np.ndarray, last: bool) -> bytes:
        return self.encode(self.join(segment, last), last)
