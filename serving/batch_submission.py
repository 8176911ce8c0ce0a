"""What a batch submission may be, and reading one: ``BatchLimits`` and ``parse_submission``.

A body is JSONL (one item object a line, blank lines skipped) or msgpack (an array of item maps). The
body as a whole is refused with an APIError (400 unreadable, 413 too many items, 415 unsupported type,
422 no items or unusable ids); a malformed item fails alone, with its reason in its record. The router
(serving/batch_api.py) reads the body within ``max_body_bytes`` and hands it here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from bark_serve.cluster.batch_types import MAX_ITEM_ERROR_CHARS, InvalidBatchError, ItemRecord, check_unique, parse_item
from bark_serve.cluster.quotas import Quota
from bark_serve.schema.request import item_request
from bark_serve.schema.untrusted import clip
from bark_serve.stages.types import InvalidRequestError

from .errors import APIError
from .http_api import MSGPACK_TYPES

JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines", "application/jsonlines")


@dataclass(frozen=True)
class BatchLimits:
    """What one submission and one results stream may be."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_items: int = 100_000
    max_text_chars: int = 20_000  # as OrchestratorConfig.max_text_chars
    follow_max_s: float = 300.0  # a followed stream ends after this; the client resumes from its cursor
    page_size: int = 64  # results read from Redis at once
    quota: Quota | None = None  # per tenant, checked by the store at submission
    max_follow_streams: int | None = None  # per tenant, on this replica

    @classmethod
    def from_config(cls, cfg) -> "BatchLimits":
        """From a :class:`serving.config.BarkConfig` (items obey the orchestrator's text limit)."""
        quota = cfg.batch.quota
        return cls(max_text_chars=cfg.orchestrator.max_text_chars, max_items=cfg.batch.max_items,
                   max_body_bytes=cfg.batch.max_body_bytes, quota=quota.store_quota(),
                   max_follow_streams=quota.max_follow_streams)


def _jsonl_items(body: bytes) -> list[tuple[int, Any, str | None]]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "JSONL body is not valid UTF-8", "invalid_body") from None
    out: list[tuple[int, Any, str | None]] = []
    for index, line in enumerate(text.split("\n")):
        line = line.strip()
        if not line:
            continue
        try:
            out.append((index, json.loads(line), None))
        except RecursionError:  # this line fails alone
            out.append((index, None, f"item {index} (line {index + 1}): nested too deeply"))
        except ValueError as exc:
            out.append((index, None, f"item {index} (line {index + 1}): not valid JSON ({clip(str(exc))})"))
    return out


def _msgpack_items(body: bytes) -> list[tuple[int, Any, str | None]]:
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types for bad input (too deep included)
        raise APIError(400, "body is not valid msgpack", "invalid_body") from None
    if not isinstance(data, list):
        raise APIError(400, "a msgpack body must be an array of item maps", "invalid_body")
    return [(index, raw, None) for index, raw in enumerate(data)]


def _check_options(record: ItemRecord) -> ItemRecord:
    """An item whose options the worker would refuse fails now, alone (NaN temperatures, unknown keys...):
    the worker builds the same request (``SynthesisRequest.of_item``, serving/batch_app.py ``item_request``)."""
    if record.error is not None:
        return record
    try:
        item_request(record.text, record.script, record.voice, record.format, record.seed, record.options)
    except InvalidRequestError as exc:
        return replace(record, text="", voice=None, seed=None, options={}, script=None,
                       error=clip(f"item {record.index}: {exc}", MAX_ITEM_ERROR_CHARS))
    return record


def media_type(content_type: str) -> str:
    """The submission's media type, or 415 (checked before the body is read)."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype not in JSONL_TYPES and ctype not in MSGPACK_TYPES:
        raise APIError(415, f"unsupported Content-Type {clip(ctype, 60) or '(none)'!r}: use application/jsonl, "
                            "application/x-ndjson or application/msgpack", "unsupported_media_type")
    return ctype


def parse_submission(body: bytes, content_type: str, limits: BatchLimits) -> list[ItemRecord]:
    """Validate a whole submission; APIError for the body as a whole, failed records for bad items."""
    ctype = media_type(content_type)
    raws = _jsonl_items(body) if ctype in JSONL_TYPES else _msgpack_items(body)
    if not raws:
        raise APIError(422, "the submission has no items", "invalid_items")
    if len(raws) > limits.max_items:
        raise APIError(413, f"{len(raws)} items exceed the limit of {limits.max_items} per submission; "
                            "split them over several submissions with the same Idempotency-Key", "too_many_items")
    try:
        records = [_check_options(parse_item(raw, index, limits.max_text_chars, error)) for index, raw, error in raws]
        check_unique(records)
    except InvalidBatchError as exc:
        raise APIError(422, clip(str(exc), 500), "invalid_items") from None
    return records

