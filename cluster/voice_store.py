"""The voice store: registered (cloned) voices, durable, owned by a tenant, in Redis or in a directory.

A registered voice is Bark's own voice format as ``.npz`` bytes (made elsewhere) plus its metadata
(:class:`StoredVoice`). It belongs to an owner, the tenant string of the batch jobs (a hash of the API key;
"" when no keys are configured: the one shared owner). Another owner never sees, reads or deletes it: for
them ``get``/``npz``/``delete`` answer exactly as for a voice that does not exist.

Names are unique per owner and checked by :func:`check_name`; ids are made here (``voice_`` + 24 random
base32 characters) and never look like a name. This module holds that contract (names, ids, records, the
abstract :class:`VoiceStore`); the two backends, cluster/voice_backends.py (Redis) and cluster/voice_dir.py
(a folder), give the same answers
(one test suite runs against both):

- :class:`RedisVoiceStore` (when the config names a Redis), keys under ``<prefix>`` (``bark:voices``)::

      <prefix>:voice:<id>      hash: id, name, owner, created_at, duration_s, bytes, meta (JSON)
      <prefix>:npz:<id>        string: the .npz bytes
      <prefix>:names:<tag>     hash: name -> id, the owner's name index
      <prefix>:owner:<tag>     sorted set: the owner's ids by created_at (its size is what the quota counts)

  ``<tag>`` is :func:`owner_tag` (the owner, "_shared" for ""). One Lua script adds a voice: the name index
  (taken?), the quota (the owner's count) and every write happen in one atomic step, so of concurrent adds of
  one name exactly one wins, concurrent adds cannot pass the quota, and a refused add writes nothing. Another
  script deletes.

- :class:`DirVoiceStore` (else), under ``<state dir>/voices``, one folder per owner::

      <root>/<tag>/.lock                 the owner's lock file (fcntl.flock: adds and deletes)
      <root>/<tag>/names/<sha256(name)>  the name file: the voice's id (created with O_CREAT|O_EXCL)
      <root>/<tag>/voices/<id>.npz       the .npz bytes
      <root>/<tag>/voices/<id>.json      the metadata: written last, so it is the voice's commit mark

  Every file is written to a temporary name, fsynced and moved into place (``os.replace``). Adds and deletes
  of one owner hold its lock (threads and processes alike); the name file is created exclusively, so a name
  has one winner even without it. A name file whose voice has no metadata (an add killed half-way) is taken
  over by the next add of that name. Readers take no lock. One host: flock does not reach across machines.
  File work runs in threads (``asyncio.to_thread``); ``list_sync``/``get_sync``/``load_npz_sync`` serve
  in-process callers (``synth``, ``dataset`` rows) without a server or an event loop.

:func:`open_voice_store` picks the backend from the config.
"""

from __future__ import annotations

import abc
import base64
import builtins
import hashlib
import json
import math
import re
import secrets
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bark_serve.stages.types import InvalidRequestError

NAME_MAX = 64  # characters
ID_PREFIX = "voice_"
ID_RANDOM_CHARS = 24  # base32: 120 random bits
META_MAX_BYTES = 16 * 1024  # the metadata as JSON
DEFAULT_PREFIX = "bark:voices"
VOICES_DIRNAME = "voices"  # the directory store's folder under the state dir
SHARED_TAG = "_shared"  # the folder / key part of the shared owner ""

_ID_RE = re.compile(rf"{ID_PREFIX}[a-z2-7]{{{ID_RANDOM_CHARS}}}\Z")
_SAFE_OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}\Z")
_NAME_PUNCTUATION = frozenset("_-. ")


class InvalidVoiceName(InvalidRequestError):
    """A voice name breaks the naming rules of :func:`check_name` (HTTP 400/422)."""


class VoiceStoreError(Exception):
    """A refused add (base of :class:`VoiceNameTaken` and :class:`VoiceQuotaExceeded`)."""


class VoiceNameTaken(VoiceStoreError):
    """The owner already has a voice of this name, or it is a preset's or an alias's name (HTTP 409).

    ``name``: the (normalized) name; ``reserved``: True when a preset or alias holds it."""

    def __init__(self, name: str, reserved: bool = False):
        self.name, self.reserved = name, reserved
        if reserved:
            message = f"voice name {name!r} is the name of a preset or an alias; choose another name"
        else:
            message = f"you already have a voice named {name!r}; delete it first or choose another name"
        super().__init__(message)


class VoiceQuotaExceeded(VoiceStoreError):
    """The owner holds ``limit`` voices already (``count``: how many it holds) (HTTP 429)."""

    def __init__(self, limit: int, count: int):
        self.limit, self.count = limit, count
        super().__init__(f"voice quota reached: you have {count} registered voices and the limit is {limit} "
                         "per API key; delete one first")


def check_name(name: object) -> str:
    """The name, NFC-normalized, if it is a valid voice name; else :class:`InvalidVoiceName` saying why.

    1 to 64 characters: letters (with combining marks), digits, ``_``, ``-``, ``.`` and spaces, the spaces
    only inside; no path characters (``/``, ``\\``, ``..``), no leading dot, no control characters, NUL or
    surrogates, and not beginning with ``voice_`` (ids do)."""
    if not isinstance(name, str):
        raise InvalidVoiceName(f"a voice name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidVoiceName("a voice name may not be empty")
    if len(name) > NAME_MAX:
        raise InvalidVoiceName(f"a voice name has at most {NAME_MAX} characters, got {len(name)}")
    for ch in name:
        category = unicodedata.category(ch)
        if category == "Cs":
            raise InvalidVoiceName("a voice name must be valid Unicode (it has a lone surrogate)")
        if category == "Cc":
            raise InvalidVoiceName(f"a voice name may not contain control characters (U+{ord(ch):04X})")
        if ch in "/\\":
            raise InvalidVoiceName(f"a voice name may not contain path characters ({ch!r})")
        if not (category[0] in "LMN" or ch in _NAME_PUNCTUATION):  # letters (with their marks), digits
            raise InvalidVoiceName(f"a voice name may contain letters, digits, '_', '-', '.' and spaces, "
                                   f"not U+{ord(ch):04X} ({ch!r})")
    name = unicodedata.normalize("NFC", name)
    if len(name) > NAME_MAX:
        raise InvalidVoiceName(f"a voice name has at most {NAME_MAX} characters, got {len(name)}")
    if name != name.strip(" "):
        raise InvalidVoiceName("a voice name may not begin or end with a space")
    if ".." in name:
        raise InvalidVoiceName("a voice name may not contain '..'")
    if name.startswith("."):
        raise InvalidVoiceName("a voice name may not begin with '.'")
    if name.lower().startswith(ID_PREFIX):
        raise InvalidVoiceName(f"a voice name may not begin with {ID_PREFIX!r} (voice ids do)")
    return name


def is_voice_id(value: str) -> bool:
    """Whether ``value`` has the form of a voice id (``voice_`` + 24 base32 characters)."""
    return bool(_ID_RE.match(value))


def new_voice_id() -> str:
    """A fresh id: URL-safe and unguessable (120 bits from ``secrets``)."""
    raw = base64.b32encode(secrets.token_bytes(15)).decode("ascii").lower()
    return ID_PREFIX + raw[:ID_RANDOM_CHARS]


def owner_tag(owner: str) -> str:
    """The owner as a key part and folder name: ``_shared`` for "", a plain tag (an API key's hash) as it
    is, anything else as ``_`` + its SHA-256 (hex), so no owner string can reach outside its folder."""
    if owner == "":
        return SHARED_TAG
    if _SAFE_OWNER_RE.match(owner):
        return owner
    return "_" + hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()


def _lookup(name_or_id: str) -> tuple[str, str] | None:
    """("id", id) or ("name", normalized name); None for a string that can name no voice."""
    if not isinstance(name_or_id, str):
        return None
    if is_voice_id(name_or_id):
        return "id", name_or_id
    try:
        return "name", check_name(name_or_id)
    except InvalidVoiceName:
        return None


@dataclass(frozen=True)
class StoredVoice:
    """One registered voice's metadata (the .npz bytes are read with ``npz``)."""

    id: str
    name: str
    owner: str  # the tenant; never shown to clients
    created_at: float  # unix seconds
    duration_s: float  # of the source clip
    bytes: int  # size of the .npz
    meta: dict[str, Any] = field(default_factory=dict, hash=False)  # small, JSON-safe

    def to_public(self) -> dict[str, Any]:
        """The API's view (no owner)."""
        return {"id": self.id, "object": "voice", "name": self.name, "created_at": self.created_at,
                "duration_s": self.duration_s, "bytes": self.bytes, "meta": json.loads(json.dumps(self.meta))}

    def to_record(self) -> dict[str, Any]:
        """Everything, as stored (JSON-safe)."""
        return {"id": self.id, "name": self.name, "owner": self.owner, "created_at": self.created_at,
                "duration_s": self.duration_s, "bytes": self.bytes, "meta": self.meta}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> StoredVoice:
        meta = record.get("meta") or {}
        return cls(id=str(record["id"]), name=str(record["name"]), owner=str(record["owner"]),
                   created_at=float(record["created_at"]), duration_s=float(record["duration_s"]),
                   bytes=int(record["bytes"]), meta=dict(meta) if isinstance(meta, dict) else {})


@dataclass(frozen=True)
class _NewVoice:
    """A checked add: the name, the bytes, the record to write."""

    voice: StoredVoice
    npz: builtins.bytes
    meta_json: str


def _prepare(owner: str, name: str, npz: builtins.bytes, duration_s: float, meta: Mapping[str, Any] | None,
             quota: int | None, reserved: Callable[[str], bool] | None) -> _NewVoice:
    """Every check of an add that needs no store, then the record (with a fresh id) to write."""
    if not isinstance(owner, str):
        raise TypeError(f"owner must be a string, got {type(owner).__name__}")
    name = check_name(name)
    if reserved is not None and reserved(name):
        raise VoiceNameTaken(name, reserved=True)
    if not isinstance(npz, (builtins.bytes, bytearray, memoryview)):
        raise TypeError(f"npz must be bytes, got {type(npz).__name__}")
    data = builtins.bytes(npz)
    if not data:
        raise ValueError("npz is empty")
    duration = float(duration_s)
    if not math.isfinite(duration) or duration < 0:
        raise ValueError(f"duration_s must be a finite number >= 0, got {duration_s!r}")
    if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 0):
        raise ValueError(f"quota must be None or an integer >= 0, got {quota!r}")
    meta_json = json.dumps(dict(meta or {}), allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    if len(meta_json.encode("utf-8")) > META_MAX_BYTES:
        raise ValueError(f"voice metadata is over {META_MAX_BYTES} bytes as JSON")
    voice = StoredVoice(id=new_voice_id(), name=name, owner=owner, created_at=time.time(), duration_s=duration,
                        bytes=len(data), meta=json.loads(meta_json))
    return _NewVoice(voice, data, meta_json)


def _sorted(voices: builtins.list[StoredVoice]) -> builtins.list[StoredVoice]:
    return sorted(voices, key=lambda v: (v.created_at, v.id))


class VoiceStore(abc.ABC):
    """Registered voices of every owner. All methods of one owner see only that owner's voices."""

    @abc.abstractmethod
    async def add(self, owner: str, name: str, npz: builtins.bytes, duration_s: float,
                  meta: Mapping[str, Any] | None = None, quota: int | None = None,
                  reserved: Callable[[str], bool] | None = None) -> StoredVoice:
        """Store a new voice of ``owner`` named ``name``; its :class:`StoredVoice` (with a fresh id).

        Raises :class:`InvalidVoiceName` (see :func:`check_name`), :class:`VoiceNameTaken` when the owner has
        a voice of that name or ``reserved(name)`` is true (a preset or alias), :class:`VoiceQuotaExceeded`
        when the owner already holds ``quota`` voices. Of concurrent adds of one name exactly one wins, and
        concurrent adds never take the owner past ``quota``. A refused or failed add leaves nothing."""

    @abc.abstractmethod
    async def list(self, owner: str) -> builtins.list[StoredVoice]:
        """The owner's voices, oldest first."""

    @abc.abstractmethod
    async def get(self, owner: str, name_or_id: str) -> StoredVoice | None:
        """The owner's voice of that id or name; None when the owner has none (whoever else has it)."""

    @abc.abstractmethod
    async def npz(self, owner: str, name_or_id: str) -> builtins.bytes | None:
        """The .npz bytes of the owner's voice of that id or name; None when the owner has none."""

    @abc.abstractmethod
    async def delete(self, owner: str, name_or_id: str) -> bool:
        """Delete the owner's voice of that id or name; False when the owner has none."""

    @abc.abstractmethod
    def list_sync(self, owner: str) -> builtins.list[StoredVoice]:
        """:meth:`list` for callers without an event loop."""

    @abc.abstractmethod
    def get_sync(self, owner: str, name_or_id: str) -> StoredVoice | None:
        """:meth:`get` for callers without an event loop."""

    @abc.abstractmethod
    def load_npz_sync(self, owner: str, name_or_id: str) -> builtins.bytes | None:
        """:meth:`npz` for callers without an event loop (``synth``, ``dataset`` rows)."""

    async def aclose(self) -> None:
        """Release connections (a no-op for the directory store)."""
        return None

    def close(self) -> None:
        """Release the blocking connections of the ``*_sync`` methods."""
        return None
