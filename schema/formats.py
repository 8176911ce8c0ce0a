"""The audio formats a caller may ask for: the encoders' table (serving/audio.py encodes each).

The one list of formats: the HTTP models, batch items, dataset rows and the CLI take their choices
from ``FORMATS`` (``FormatName`` is checked against it at import).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from bark_serve.stages.types import InvalidRequestError


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
    fmt = (fmt or "wav").lower()
    if fmt not in FORMATS:
        raise InvalidRequestError(f"unsupported response_format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def media_type(fmt: str) -> str:
    return FORMATS[check_format(fmt)].media_type


def format_for_path(path: str) -> str:
    """Audio format from a file name's extension."""
    for ext, fmt in EXTENSIONS.items():
        if str(path).lower().endswith(ext):
            return fmt
    raise InvalidRequestError(f"cannot tell the audio format of {path!r}: use one of {', '.join(EXTENSIONS)}")


FormatName = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]  # for the pydantic models: FORMATS' keys
assert set(get_args(FormatName)) == set(FORMATS), "FormatName must list exactly the encoders' formats"
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)
