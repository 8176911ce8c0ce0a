"""The audio formats a caller may ask for: the encoders' own table (stages/encoders.py, which encodes each).

The one list of formats: the HTTP models, batch items, dataset rows and the CLI take their choices
from ``FORMATS`` (``FormatName`` is checked against it at import).
"""

from __future__ import annotations

from typing import Literal, get_args

from bark_serve.stages.encoders import EXTENSIONS, FORMATS, AudioFormat, check_format, format_for_path, media_type

__all__ = ["EXTENSIONS", "FORMATS", "FORMAT_NAMES", "AudioFormat", "FormatName", "check_format", "format_for_path",
           "media_type"]


FormatName = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]  # for the pydantic models: FORMATS' keys
assert set(get_args(FormatName)) == set(FORMATS), "FormatName must list exactly the encoders' formats"
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)
