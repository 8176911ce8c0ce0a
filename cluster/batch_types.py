"""Types of durable batch jobs: wire-level item model, stored records, states, Redis key layout.

How an item travels::

    POST /v1/batches ──parse_items──▶ ItemRecord (msgpack in Redis) ──worker claims──▶ Lease
        ──BatchItem──▶ synthesize(item) ──SynthesisResult──▶ result record (written once)

User input is checked here (``parse_item``): a malformed item becomes an
``ItemRecord`` with ``error`` set, which the store records as failed at once,
so it fails alone while the rest of the job runs.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import msgpack
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_validator

from bark_serve.schema.fields import NullMeansDefault, Script, VoiceRef, check_text_or_script
from bark_serve.schema.formats import FORMAT_NAMES, FORMATS, FormatName
from bark_serve.schema.untrusted import check_plain_data, clip, validation_message
from bark_serve.stages.types import InvalidRequestError, Priority, check_seed

AUDIO_FORMATS = FORMAT_NAMES
MEDIA_TYPES = {name: f.media_type for name, f in FORMATS.items()}
# Item ids name files on the client (DIR/<id>.<format>), so they stay filename-safe.
ITEM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
JOB_ID_RE = re.compile(r"^b_[0-9a-f]{32}$")
JOB_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces
MAX_ITEM_ERROR_CHARS = 500  # an item's error message (stored in Redis, sent back with its result)


class ItemState(str, enum.Enum):
    """Where one item is. SUCCEEDED, FAILED and CANCELLED are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (ItemState.SUCCEEDED, ItemState.FAILED, ItemState.CANCELLED)


class JobState(str, enum.Enum):
    """Where a job is, derived from its counts (only CANCELLED is stored)."""

    QUEUED = "queued"  # no item started yet
    RUNNING = "running"
    COMPLETED = "completed"  # every item succeeded or failed
    CANCELLED = "cancelled"


class ErrorType(str, enum.Enum):
    """Why an item failed (the ``type`` of its error)."""

    INVALID_ITEM = "invalid_item"  # rejected at submission or by synthesize (InvalidRequestError)
    SYNTHESIS_ERROR = "synthesis_error"  # raised max_attempts times
    WORKER_LOST = "worker_lost"  # its worker vanished max_attempts times (a poison item)


class ItemIn(NullMeansDefault):
    """One item as a client sends it (a JSONL line or a msgpack map): ``text`` or a multi-speaker ``script``.

    An optional field sent as null takes its default.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str | int | None = None
    text: str | None = None
    script: Script | None = None  # [{voice, text}, ...] instead of text
    voice: VoiceRef | None = None
    seed: Annotated[int | None, AfterValidator(check_seed)] = None
    format: FormatName = "wav"
    options: dict[str, Any] = Field(default_factory=dict)  # per-stage temperatures etc., passed through

    @model_validator(mode="after")
    def _text_or_script(self):
        check_text_or_script(self.text, self.script, self.voice)
        return self

    def stored_script(self) -> list[dict] | None:
        return None if self.script is None else [line.model_dump() for line in self.script]


class InvalidBatchError(ValueError):
    """The submission as a whole is unusable (HTTP 422), as opposed to one bad item."""


@dataclass(frozen=True)
class ItemRecord:
    """An item as stored (msgpack) in Redis; ``error`` set means it failed validation."""

    id: str
    index: int  # its line (JSONL) or list position (msgpack) in the submission
    text: str = ""
    voice: str | None = None
    seed: int | None = None
    format: str = "wav"
    options: dict = field(default_factory=dict)
    error: str | None = None
    script: list[dict] | None = None  # [{"voice", "text"}, ...] instead of text (then text is "")

    def pack(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> "ItemRecord":
        raw = msgpack.unpackb(data, raw=False)
        # Unknown fields are dropped, so records written by a newer version still load.
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class BatchItem:
    """What the worker hands to ``synthesize``: one validated item of one job."""

    job_id: str
    item_id: str
    text: str
    voice: str | None
    seed: int | None
    format: str
    options: dict
    attempt: int = 1
    priority: Priority = Priority.BATCH  # stage servers schedule batch work behind interactive requests
    script: list[dict] | None = None  # [{"voice", "text"}, ...] instead of text
    owner: str = ""  # the job's tenant: its items may name that tenant's registered voices


@dataclass(frozen=True)
class SynthesisResult:
    """What ``synthesize`` returns: audio already encoded in ``item.format``."""

    audio: bytes
    sample_rate: int
    duration_s: float
    media_type: str
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QueueEntry:
    """One delivery of a work-stream entry: which item of which job."""

    entry_id: str
    job_id: str
    item_id: str


@dataclass(frozen=True)
class Lease:
    """A claimed item: the entry that carries it, its attempt number and its record."""

    entry: QueueEntry
    attempt: int
    record: ItemRecord
    owner: str = ""  # the job's tenant ("" without API keys): whose registered voices its items may use

    def batch_item(self) -> BatchItem:
        r = self.record
        return BatchItem(job_id=self.entry.job_id, item_id=r.id, text=r.text, voice=r.voice,
                         seed=r.seed, format=r.format, options=dict(r.options), attempt=self.attempt,
                         script=r.script, owner=self.owner)


@dataclass(frozen=True)
class BatchKeys:
    """The Redis key layout (one place; the Lua scripts build the same names from the prefix).

    ``{p}:queue`` stream + group ``{p}:workers``: work entries {job, item}.
    ``{p}:dead`` stream: dead-lettered items {job, item, reason} (capped).
    ``{p}:jobkey:{key}`` string: idempotency key -> job id.
    ``{p}:job:{id}`` hash: meta (msgpack), cancelled flag, counts, timestamps.
    ``{p}:job:{id}:items`` hash item id -> ItemRecord (msgpack).
    ``{p}:job:{id}:state`` hash item id -> ItemState value.
    ``{p}:job:{id}:attempts`` hash item id -> attempt number.
    ``{p}:job:{id}:results`` stream: one entry per finished item (the resume cursor is its id).
    """

    prefix: str = "bark"

    @property
    def queue(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def group(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    def jobkey(self, key: str) -> str:
        return f"{self.prefix}:jobkey:{key}"

    def owner_jobs(self, owner: str) -> str:
        """The sorted set of an owner's job ids by creation time (``GET /v1/batches`` lists it)."""
        return f"{self.prefix}:owner:{owner or '-'}"

    def job(self, job_id: str, part: str = "") -> str:
        """``part`` is one of "", "items", "state", "attempts", "results"."""
        return f"{self.prefix}:job:{job_id}" + (f":{part}" if part else "")


def _failed(item_id: str, index: int, error: str) -> ItemRecord:
    return ItemRecord(id=item_id, index=index, error=clip(error, MAX_ITEM_ERROR_CHARS))


def item_id_of(raw: Any, index: int) -> str:
    """The item's id: the client's (string or integer) or its line index; InvalidBatchError if unusable."""
    value = raw.get("id") if isinstance(raw, dict) else None
    if value is None:
        return str(index)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidBatchError(f"item {index}: id must be a string or an integer")
    text = str(value)
    if not ITEM_ID_RE.match(text):
        raise InvalidBatchError(f"item {index}: id {text[:40]!r} must match {ITEM_ID_RE.pattern}")
    return text


def parse_item(raw: Any, index: int, max_text_chars: int, parse_error: str | None = None) -> ItemRecord:
    """Validate one raw item. Never raises for a bad item: the record carries ``error`` instead."""
    item_id = item_id_of(raw, index)
    if parse_error is not None:
        return _failed(item_id, index, parse_error)
    if not isinstance(raw, dict):
        return _failed(item_id, index, f"item {index}: expected an object")
    try:
        check_plain_data(raw)  # nesting, lone surrogates (unstorable), msgpack extension types
        item = ItemIn.model_validate(raw)
    except InvalidRequestError as exc:
        return _failed(item_id, index, f"item {index}: {exc}")
    except ValidationError as exc:
        return _failed(item_id, index, f"item {index}: {validation_message(exc)}")
    if item.script is None:
        assert item.text is not None, "ItemIn holds a text or a script"
        texts = [item.text]
    else:
        texts = [line.text for line in item.script]
    for n, text in enumerate(texts):
        if not text.strip():
            where = "text" if item.script is None else f"script line {n}: text"
            return _failed(item_id, index, f"item {index}: {where} is empty")
    chars = sum(len(t) for t in texts)
    if chars > max_text_chars:
        return _failed(item_id, index, f"item {index}: text has {chars} characters (max {max_text_chars})")
    return ItemRecord(id=item_id, index=index, text=item.text or "", voice=item.voice, seed=item.seed,
                      format=item.format, options=item.options, script=item.stored_script())


def check_unique(records: list[ItemRecord]) -> None:
    """Item ids are unique within a submission (they are the idempotency keys)."""
    seen: set[str] = set()
    dups = []
    for r in records:
        if r.id in seen:
            dups.append(r.id)
        seen.add(r.id)
    if dups:
        shown = ", ".join(repr(d) for d in dups[:5])
        raise InvalidBatchError(f"duplicate item ids in the submission: {shown}"
                                + (f" and {len(dups) - 5} more" if len(dups) > 5 else ""))


# Lua helpers shared by every script (cluster/jobs.py, cluster/queue.py). Scripts build
# job keys from the prefix as BatchKeys does, so they need a standalone Redis (or
# Sentinel), not Redis Cluster. Every script takes ARGV[1..3] = prefix, ttl, now.
LUA_PRELUDE = """
local P, TTL, NOW = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local function jk(jid, part)
  if part then return P .. ':job:' .. jid .. ':' .. part end
  return P .. ':job:' .. jid
end
-- every write refreshes the TTL of the whole job, so results expire TTL after the last activity
local function touch(jid)
  local h = jk(jid)
  redis.call('EXPIRE', h, TTL)
  for _, part in ipairs({'items', 'state', 'attempts', 'results'}) do redis.call('EXPIRE', jk(jid, part), TTL) end
  local key = redis.call('HGET', h, 'jobkey')
  if key and key ~= '' then redis.call('EXPIRE', P .. ':jobkey:' .. key, TTL) end
  local owner = redis.call('HGET', h, 'owner')
  if owner then redis.call('EXPIRE', P .. ':owner:' .. owner, TTL) end
end
local function terminal(st) return st == 'succeeded' or st == 'failed' or st == 'cancelled' end
local function settle(jid)
  local v = redis.call('HMGET', jk(jid), 'total', 'succeeded', 'failed', 'cancelled')
  if tonumber(v[1]) == tonumber(v[2]) + tonumber(v[3]) + tonumber(v[4]) then
    redis.call('HSET', jk(jid), 'finished_at', NOW)
  end
end
local function ack(queue, group, entry)
  redis.call('XACK', queue, group, entry)
  redis.call('XDEL', queue, entry)
end
-- st is the item's current non-terminal state ('queued' or 'running'), a count field of the job hash
local function fail_item(jid, iid, st, attempt, reason, etype)
  redis.call('HINCRBY', jk(jid), st, -1)
  redis.call('HINCRBY', jk(jid), 'failed', 1)
  redis.call('HSET', jk(jid, 'state'), iid, 'failed')
  redis.call('XADD', jk(jid, 'results'), '*', 'id', iid, 'state', 'failed', 'attempts', attempt,
             'error', reason, 'error_type', etype)
  settle(jid)
end
"""
