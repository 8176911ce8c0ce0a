"""Audio in: an uploaded clip decoded to mono float32 samples, or refused with a clear message.

The one door for a recording that becomes a voice (voice cloning, stages/cloning.py). Any format PyAV
(FFmpeg) reads is taken: wav, flac, mp3, ogg (Opus, Vorbis), m4a/mp4 (AAC), webm, aiff. Where PyAV is not
installed, wav and flac are read through soundfile and anything else raises :class:`MissingPackage`
(the server answers 503 naming the package: the host lacks it, the upload is not at fault).

Refused with :class:`InvalidRequestError` (a 4xx; nothing is decoded further and nothing stored): an empty
upload, more than ``max_bytes``, not audio or undecodable, more than 2 channels (mono and stereo are
taken; stereo is mixed to mono), a sample rate outside [16 kHz, 96 kHz], NaN or infinite samples,
shorter than ``min_s`` or longer than ``max_s`` (checked while decoding, so a small file that unpacks to
hours stops early), and silence (peak below -60 dBFS).

FFmpeg probes the format of the bytes itself: only the audio demuxers of ``AUDIO_DEMUXERS`` are accepted
(a playlist, an image or a video container is refused), and no nested file or network protocol may be
opened (``protocol_whitelist``), so an upload can never make the server read anything else.
"""

from __future__ import annotations

import io
import math
import re
from fractions import Fraction
from types import ModuleType

import numpy as np

from .types import InvalidRequestError

MIN_SAMPLE_RATE = 16_000  # HuBERT's rate: anything lower has lost what the semantic tokens describe
MAX_SAMPLE_RATE = 96_000
MAX_CHANNELS = 2
SILENCE_DBFS = -60.0  # a clip whose peak is below this is taken for silence
DEFAULT_MAX_BYTES = 20 << 20  # what the CLI reads at most (the server configures its own limit)
DEFAULT_MAX_SECONDS = 120.0
# FFmpeg's demuxer names (``container.format.name``) of audio files; everything else is refused.
AUDIO_DEMUXERS = frozenset({
    "wav", "w64", "flac", "mp3", "ogg", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "aac", "aiff", "caf",
})
_SNIFF_WAV = (b"RIFF", b"RF64", b"BW64")
_SNIFF_FLAC = b"fLaC"
_INT_SCALE = {"s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


class MissingPackage(RuntimeError):
    """A package this host lacks is needed for the request (e.g. PyAV for mp3): a 503 naming ``package``."""

    def __init__(self, package: str, message: str):
        super().__init__(message)
        self.package = package


def decode_clip(data: bytes, *, max_bytes: int, min_s: float = 1.0, max_s: float) -> tuple[np.ndarray, int]:
    """An uploaded audio file -> (mono float32 samples in [-1, 1], sample rate), or InvalidRequestError."""
    if not data:
        raise InvalidRequestError("the audio upload is empty")
    if len(data) > max_bytes:
        raise InvalidRequestError(f"the audio upload is {len(data)} bytes; at most {max_bytes} bytes are accepted")
    av = _import_av()
    if av is not None:
        audio, rate = _decode_av(av, data, max_s)
    else:
        audio, rate = _decode_soundfile(data, max_s)
    return check_clip(audio, rate, min_s=min_s, max_s=max_s), rate


def check_clip(audio: np.ndarray, sample_rate: int, *, min_s: float = 1.0, max_s: float = math.inf) -> np.ndarray:
    """The checks every decoded clip passes (rate, finite samples, length, not silent); mono float32 back."""
    _check_rate(sample_rate)
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise InvalidRequestError(f"a clip must be mono samples (one dimension), got shape {audio.shape}")
    if audio.size == 0:
        raise InvalidRequestError("the audio holds no samples")
    if not np.isfinite(audio).all():
        raise InvalidRequestError("the audio holds NaN or infinite samples")
    seconds = audio.size / sample_rate
    if seconds < min_s:
        raise InvalidRequestError(f"the audio is {seconds:.2f} s long; at least {min_s:g} s is needed")
    if seconds > max_s:
        raise InvalidRequestError(f"the audio is {seconds:.1f} s long; at most {max_s:g} s is accepted")
    peak = float(np.abs(audio).max())
    if peak < 10.0 ** (SILENCE_DBFS / 20.0):
        level = "-inf" if peak == 0.0 else f"{20.0 * math.log10(peak):.1f}"
        raise InvalidRequestError(f"the audio is silent (peak {level} dBFS, below {SILENCE_DBFS:g} dBFS)")
    return audio.astype(np.float32, copy=False)


def resample(audio: np.ndarray, from_sr: int, to_sr: int) -> np.ndarray:
    """Polyphase resampling by the exact ratio to_sr / from_sr (reduced by their gcd); float32 out."""
    from scipy.signal import resample_poly

    if from_sr <= 0 or to_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {from_sr} -> {to_sr}")
    audio = np.asarray(audio, dtype=np.float32)
    if from_sr == to_sr:
        return audio.copy()
    ratio = Fraction(to_sr, from_sr)
    out = resample_poly(audio, ratio.numerator, ratio.denominator, axis=-1)
    return np.asarray(out, dtype=np.float32)


def _import_av() -> ModuleType | None:
    try:
        import av
    except ImportError:
        return None
    return av


def _check_rate(rate: int) -> None:
    if not (MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE):
        raise InvalidRequestError(f"the audio's sample rate is {rate} Hz; it must be in "
                                  f"[{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz")


def _check_channels(channels: int) -> None:
    if channels > MAX_CHANNELS:
        raise InvalidRequestError(f"the audio has {channels} channels; only mono or stereo is accepted")


def _too_long(max_s: float) -> InvalidRequestError:
    return InvalidRequestError(f"the audio is longer than {max_s:g} s; at most {max_s:g} s is accepted")


def _decode_av(av: ModuleType, data: bytes, max_s: float) -> tuple[np.ndarray, int]:
    """PyAV: the first audio stream, frame by frame, stopped as soon as it passes ``max_s``."""
    try:
        container = av.open(io.BytesIO(data), mode="r", options={"protocol_whitelist": "none"})
    except (av.FFmpegError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the upload is not an audio file that can be read ({_reason(exc)})") from None
    with container:
        fmt = container.format.name
        if fmt not in AUDIO_DEMUXERS:
            raise InvalidRequestError(f"the upload is not an audio file (FFmpeg reads it as {fmt!r})")
        if not container.streams.audio:
            raise InvalidRequestError("the upload has no audio stream")
        stream = container.streams.audio[0]
        codec = stream.codec_context  # None where FFmpeg has no decoder for what the header says (e.g. 0-bit PCM)
        if codec is None:
            raise InvalidRequestError("the audio could not be decoded (its header names no codec that can be read)")
        rate = int(codec.sample_rate or 0)
        if rate:
            _check_rate(rate)
        _check_channels(int(codec.channels or 0))
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                rate = rate or int(frame.sample_rate)
                if int(frame.sample_rate) != rate:
                    raise InvalidRequestError("the audio changes its sample rate midway")
                _check_rate(rate)
                samples = _frame_samples(frame)  # (channels, n)
                _check_channels(samples.shape[0])
                chunks.append(samples.mean(axis=0, dtype=np.float64).astype(np.float32))
                total += samples.shape[1]
                if total > max_s * rate:
                    raise _too_long(max_s)
        except InvalidRequestError:  # a ValueError too: ours, as it is
            raise
        except (av.FFmpegError, ValueError, OSError) as exc:
            raise InvalidRequestError(f"the audio could not be decoded ({_reason(exc)})") from None
    if not chunks:
        raise InvalidRequestError("the audio holds no samples")
    return np.concatenate(chunks), rate


def _frame_samples(frame) -> np.ndarray:
    """One decoded frame as float (channels, n) in [-1, 1], whatever its sample format."""
    channels = frame.layout.nb_channels
    _check_channels(channels)
    arr = frame.to_ndarray()
    if not frame.format.is_planar:  # packed: (1, n * channels), interleaved
        arr = arr.reshape(-1, channels).T
    name = frame.format.name.rstrip("p")
    if name in ("flt", "dbl"):
        return arr.astype(np.float32, copy=False)
    if name == "u8":
        return (arr.astype(np.float32) - 128.0) / 128.0
    if name in _INT_SCALE:
        return (arr.astype(np.float64) / _INT_SCALE[name]).astype(np.float32)
    raise InvalidRequestError(f"the audio's sample format {frame.format.name!r} is not supported")


def _decode_soundfile(data: bytes, max_s: float) -> tuple[np.ndarray, int]:
    """Without PyAV: wav and flac through soundfile; any other format needs PyAV (MissingPackage)."""
    import soundfile as sf

    if not (data[:4] in _SNIFF_WAV or data[:4] == _SNIFF_FLAC):
        raise MissingPackage("av", "reading this audio format needs PyAV (the `av` package), which is not "
                                   "installed on this server; wav and flac are read without it")
    try:
        info = sf.info(io.BytesIO(data))
        _check_rate(int(info.samplerate))
        _check_channels(int(info.channels))
        if info.frames > max_s * info.samplerate:
            raise _too_long(max_s)
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (n, channels)
    except InvalidRequestError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        raise InvalidRequestError(f"the audio could not be decoded ({_reason(exc)})") from None
    return samples.mean(axis=1, dtype=np.float64).astype(np.float32), int(rate)


def _reason(exc: Exception) -> str:
    """FFmpeg's or libsndfile's words, without the errno and the stand-in file name."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)).split(": '<none>'")[0].strip()
    return (text or type(exc).__name__)[:200]
