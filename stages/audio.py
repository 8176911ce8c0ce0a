"""Audio output, the one module: what happens to the model's samples on their way to a listener or a file.

Used alike by the served app (serving/http_api.py), the batch worker (serving/batch_app.py), ``dataset``
(offline/) and the in-process ``synth`` command, so all of them give the same audio and the same bytes.
Numpy plus maintained libraries imported lazily (pedalboard, pyloudnorm, PyAV), no Ray and no torch.

## Post-processing and joins

Long-form post-processing of the model's audio: trim, time-stretch, loudness, crossfade joins.

Pure numpy plus two maintained libraries, no Ray and no torch, so the served app, the batch
worker and the in-process ``synth`` command give the same audio:

- time-stretch: Rubber Band through Spotify's ``pedalboard`` (``pedalboard.time_stretch``), a
  pitch-preserving phase-vocoder stretcher with transient handling, offline per segment;
- loudness: ITU-R BS.1770-4 integrated loudness (K-weighting, 400 ms gated blocks) from ``pyloudnorm``.

A request's segments go through one ``SegmentJoiner``, in order, each as soon as it exists:
``push`` returns the audio that is final and keeps back only the last ``crossfade_ms`` (the next
segment fades in over it), ``finish`` returns that tail. Per segment: trim the leading and
trailing silence, stretch to ``speed``, apply the request's gain, crossfade onto the previous one.

The loudness gain is chosen once per request, on the first segment loud enough to measure (above
BS.1770's -70 LUFS absolute gate), and held for the rest: streamed audio cannot wait for the whole
text, and one gain for the whole request keeps the level differences between segments as Bark made
them (no pumping). The gain is capped at ``max_gain_db`` and so that that segment peaks at or below
-1 dBFS. What still goes over -1 dBFS (a crossfade seam, a later and louder segment) goes through a
soft-knee limiter (``limit``) whose output stays under -0.1 dBFS: nothing reaches the encoders clipped.
A full answer is joined the same way, so streamed and full answers are the same audio.

## Encoding

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
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .types import InvalidRequestError

FRAME_MS = 10.0  # the trimmer's energy frames
GATE_LUFS = -70.0  # BS.1770's absolute gate: quieter audio is not measured (nor amplified)
PEAK_CEILING = 10 ** (-1.0 / 20)  # -1 dBFS: the loudness gain never pushes the measured segment above it
BLOCK_S = 0.4  # one BS.1770 gating block


@dataclass(frozen=True)
class PostProcess:
    """What is done to a request's audio. ``PostProcess.raw()`` leaves the model's samples as they are."""

    trim_silence: bool = True
    trim_threshold_db: float = -40.0  # a frame is silent below the segment's loudest frame (RMS) + this
    trim_margin_ms: float = 40.0  # kept on each side of the first/last loud frame
    crossfade_ms: float = 20.0  # 0: plain concatenation
    normalize_loudness: bool = True
    target_lufs: float = -18.0
    max_gain_db: float = 30.0
    speed: float = 1.0  # 2.0: twice as fast, half as long, same pitch

    @classmethod
    def raw(cls, speed: float = 1.0) -> PostProcess:
        return cls(trim_silence=False, crossfade_ms=0.0, normalize_loudness=False, speed=speed)

    @property
    def is_identity(self) -> bool:
        return not self.trim_silence and self.crossfade_ms <= 0 and not self.normalize_loudness and self.speed == 1.0


def trim_silence(audio: np.ndarray, sample_rate: int, threshold_db: float = -40.0,
                 margin_ms: float = 40.0) -> np.ndarray:
    """``audio`` without its leading and trailing silence: the frames (10 ms) whose RMS is more than
    ``-threshold_db`` below the segment's loudest frame. ``margin_ms`` is kept around the sound; an
    all-silent segment becomes empty."""
    audio = np.asarray(audio, dtype=np.float32)
    frame = max(1, int(sample_rate * FRAME_MS / 1000))
    n_frames = len(audio) // frame + (len(audio) % frame > 0)
    if n_frames == 0:
        return audio
    padded = np.zeros(n_frames * frame, dtype=np.float64)
    padded[:len(audio)] = audio
    rms = np.sqrt(np.mean(padded.reshape(n_frames, frame) ** 2, axis=1))  # (n_frames,)
    peak = float(rms.max())
    if peak <= 0:
        return audio[:0]
    loud = np.flatnonzero(rms >= peak * 10 ** (threshold_db / 20))
    margin = int(sample_rate * margin_ms / 1000)
    start = max(0, int(loud[0]) * frame - margin)
    end = min(len(audio), (int(loud[-1]) + 1) * frame + margin)
    return audio[start:end]


def time_stretch(audio: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """Pitch-preserving time-stretch: ``speed`` 2.0 plays twice as fast (half the samples)."""
    audio = np.asarray(audio, dtype=np.float32)
    if speed == 1.0 or len(audio) == 0:
        return audio
    from pedalboard import time_stretch as rubberband  # imported on first use: a big native library

    out = rubberband(audio[None, :], float(sample_rate), stretch_factor=float(speed))  # (1, n / speed)
    return np.ascontiguousarray(out[0], dtype=np.float32)


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> float:
    """BS.1770-4 integrated loudness (LUFS); -inf for silence. Audio shorter than one 400 ms block is
    measured looped to that length (a short segment has the loudness of its sound, not of silence)."""
    import pyloudnorm

    audio = np.asarray(audio, dtype=np.float64)
    if len(audio) == 0 or not np.any(audio):
        return -math.inf
    block = int(math.ceil(BLOCK_S * sample_rate)) + 1
    if len(audio) < block:
        audio = np.tile(audio, block // len(audio) + 1)[:block]
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(audio))


def loudness_gain(audio: np.ndarray, sample_rate: int, target_lufs: float, max_gain_db: float) -> float | None:
    """The linear gain that brings ``audio`` to ``target_lufs``, capped at ``max_gain_db`` and so that its
    peak stays at or below -1 dBFS; None if it is too quiet to measure."""
    lufs = loudness_lufs(audio, sample_rate)
    if not math.isfinite(lufs) or lufs < GATE_LUFS:
        return None
    gain = 10 ** (min(target_lufs - lufs, max_gain_db) / 20)
    return min(gain, PEAK_CEILING / float(np.max(np.abs(audio))))


LIMIT_CEILING = 10 ** (-0.1 / 20)  # the limiter's output never reaches this (-0.1 dBFS)


def limit(audio: np.ndarray) -> np.ndarray:
    """A soft-knee sample-peak limiter: samples up to -1 dBFS pass unchanged, louder ones are bent by a
    tanh knee toward -0.1 dBFS and never reach it. Memoryless, so a stream and a whole answer limit the
    same samples the same way. It catches what the per-request gain cannot: equal-power crossfades sum
    two segments (up to +3 dB at the seam) and later segments may peak higher than the first."""
    over = np.abs(audio) > PEAK_CEILING
    if not over.any():
        return audio
    out = audio.copy()
    room = LIMIT_CEILING - PEAK_CEILING
    excess = np.abs(audio[over]) - PEAK_CEILING
    out[over] = np.sign(audio[over]) * (PEAK_CEILING + room * np.tanh(excess / room))
    return out


def _fades(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-power (sine/cosine) fade-out and fade-in of ``n`` samples: segments are uncorrelated sound."""
    t = (np.arange(n, dtype=np.float32) + 0.5) / n * (np.pi / 2)
    return np.cos(t), np.sin(t)


def finite(audio: np.ndarray) -> np.ndarray:
    """float32 samples with NaN as silence and infinities at full scale; finite audio is returned as it is."""
    data = np.asarray(audio, dtype=np.float32)
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=1.0, neginf=-1.0)
    return data


class SegmentJoiner:
    """Joins a request's segments one by one (see the module docstring). Not thread-safe: one per request."""

    def __init__(self, sample_rate: int, options: PostProcess):
        self.sample_rate, self.options = sample_rate, options
        self.fade = int(round(sample_rate * max(0.0, options.crossfade_ms) / 1000))
        self.gain: float | None = None if options.normalize_loudness else 1.0
        self.tail: np.ndarray | None = None  # the last ``fade`` samples so far, not yet final

    def prepare(self, segment: np.ndarray) -> np.ndarray:
        """One segment trimmed, stretched and at the request's gain (chosen here, on the first loud segment)."""
        o = self.options
        audio = finite(segment)  # NaN would defeat the trim and infinities the gain
        if o.trim_silence:
            audio = trim_silence(audio, self.sample_rate, o.trim_threshold_db, o.trim_margin_ms)
        audio = time_stretch(audio, self.sample_rate, o.speed)
        if self.gain is None:
            self.gain = loudness_gain(audio, self.sample_rate, o.target_lufs, o.max_gain_db)
        return audio if self.gain in (None, 1.0) else audio * np.float32(self.gain)

    def push(self, segment: np.ndarray) -> np.ndarray:
        """The audio that is final once ``segment`` is added (everything but the new tail)."""
        audio = self.prepare(segment)
        if self.tail is None or len(self.tail) == 0:
            body = audio
        else:
            n = min(len(self.tail), len(audio))
            fade_out, fade_in = _fades(n)
            keep = len(self.tail) - n
            body = np.concatenate([self.tail[:keep], self.tail[keep:] * fade_out + audio[:n] * fade_in, audio[n:]])
        held = min(self.fade, len(body))
        self.tail = body[len(body) - held:]
        return limit(body[:len(body) - held])

    def finish(self) -> np.ndarray:
        """The held-back tail: the end of the request's audio."""
        tail, self.tail = self.tail, np.zeros((0,), np.float32)
        return np.zeros((0,), np.float32) if tail is None else limit(tail)


def join_segments(segments: Iterable[np.ndarray], sample_rate: int, options: PostProcess) -> np.ndarray:
    """All segments through one joiner: the audio a stream of the same segments gives."""
    segments = [np.asarray(s, dtype=np.float32) for s in segments]
    if options.is_identity:
        return np.concatenate(segments) if segments else np.zeros((0,), np.float32)
    joiner = SegmentJoiner(sample_rate, options)
    parts = [joiner.push(s) for s in segments]
    return np.concatenate([*parts, joiner.finish()])

# --- encoding ---------------------------------------------------------------------------------------

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
        import av

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
