"""Audio out, part one: post-processing of the model's samples and the joins of a request's segments
(the encoders are in stages/encoders.py).

Used alike by the served app (serving/http_api.py), the batch worker (serving/batch_app.py), ``dataset``
(offline/) and the in-process ``synth`` command, so all of them give the same audio and the same bytes.
Numpy plus maintained libraries imported lazily (pedalboard, pyloudnorm, PyAV), no Ray and no torch.


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
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .audio_in import MissingPackage

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


def optional_package(name: str, needed_for: str) -> ModuleType:
    """An optional package, imported on first use; on a host without it, MissingPackage naming it (HTTP 503)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingPackage(name, f"{needed_for} needs the `{name}` package, which is not installed on this server; "
                                   "the rest of the API works without it") from None


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
    rubberband = optional_package("pedalboard", "a speed other than 1").time_stretch  # a big native library

    out = rubberband(audio[None, :], float(sample_rate), stretch_factor=float(speed))  # (1, n / speed)
    return np.ascontiguousarray(out[0], dtype=np.float32)


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> float:
    """BS.1770-4 integrated loudness (LUFS); -inf for silence. Audio shorter than one 400 ms block is
    measured looped to that length (a short segment has the loudness of its sound, not of silence)."""
    pyloudnorm = optional_package("pyloudnorm", "loudness normalization")
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
        if options.speed != 1.0:  # a missing package is an answer (503) before any audio, not a broken stream
            optional_package("pedalboard", "a speed other than 1")
        if options.normalize_loudness:
            optional_package("pyloudnorm", "loudness normalization")
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
