"""Checks for decoded, untrusted request data (JSON / msgpack), before any model or library sees it,
and the one formatter of validation errors.

Python's json module and msgpack decode whatever they are given: nesting a
thousand levels deep (recursive code downstream, even ``repr``, then raises
RecursionError), strings with lone surrogates (which no encoder, tokenizer or
Redis client accepts), and msgpack extension objects. ``check_plain_data``
walks a decoded value once, without recursion, and refuses all of that with an
InvalidRequestError; ``short_repr`` keeps user values in error messages short.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from bark_serve.stages.types import MAX_REPR_CHARS, InvalidRequestError, clip, short_repr

__all__ = ["MAX_DEPTH", "MAX_REPR_CHARS", "UntrustedDataError", "check_plain_data", "clip", "invalid_request",
           "short_repr", "summarize_errors", "validation_message"]

MAX_DEPTH = 32  # the deepest legitimate input is an inline voice inside a batch item's options (4 levels)
_SCALARS = (str, bytes, int, float, bool, type(None))


class UntrustedDataError(InvalidRequestError):
    """Decoded request data that no part of the server should see (too deep, invalid strings, odd types)."""


def _check_str(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UntrustedDataError(f"{_where(where)}: strings must be valid Unicode (a lone surrogate "
                                 "such as \\ud800 is not)") from None


def _where(path: str) -> str:
    return clip(path, 100) or "body"


def check_plain_data(value: Any, max_depth: int = MAX_DEPTH, where: str = "") -> None:
    """Raise UntrustedDataError unless ``value`` is plain data: dicts with string keys, lists, and scalars.

    Iterative (an explicit stack), so a value of any depth is checked without recursion.
    """
    stack: list[tuple[Any, int, str]] = [(value, 0, where)]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            _check_str(item, path)
        elif isinstance(item, _SCALARS):
            continue
        elif depth >= max_depth:
            raise UntrustedDataError(f"{_where(path)}: nested more than {max_depth} levels deep")
        elif isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise UntrustedDataError(f"{_where(path)}: object keys must be strings")
                _check_str(key, path)
                stack.append((sub, depth + 1, f"{path}.{key[:40]}" if path else key[:40]))
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, depth + 1, path) for sub in item)
        else:  # e.g. a msgpack ExtType or Timestamp
            raise UntrustedDataError(f"{_where(path)}: unsupported value of type {type(item).__name__}")


MAX_LISTED_ERRORS = 5  # a validation message names this many problems, then counts the rest


def summarize_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """pydantic's ``ValidationError.errors()`` on one short line: the first few problems, each cut short.

    The one formatter of validation errors (HTTP answers, batch items, the config file, the CLI):
    the message never grows with the input, however many fields were wrong.
    """
    parts = []
    for e in errors[:MAX_LISTED_ERRORS]:
        loc = clip(".".join(str(p) for p in e.get("loc", ())), 60)
        msg = clip(str(e.get("msg", "invalid")), 160)
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(errors) > MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_LISTED_ERRORS} more errors")
    return "; ".join(parts)


def validation_message(exc: ValidationError) -> str:
    """A pydantic ValidationError as our one-line message (``summarize_errors``)."""
    return summarize_errors(exc.errors(include_url=False, include_input=False))


def invalid_request(exc: ValidationError) -> InvalidRequestError:
    """A pydantic ValidationError as the InvalidRequestError every path answers with (HTTP 422, a failed item)."""
    return InvalidRequestError(validation_message(exc))
