"""The Redis backend of the voice store (cluster/voice_store.py has the contract, names, ids and records):
``RedisVoiceStore``, one Lua script per add and per delete; and ``open_voice_store``, which picks Redis or
the folder backend (``DirVoiceStore``, cluster/voice_dir.py)."""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from bark_serve.cluster import redis_conn
from bark_serve.cluster.redis_conn import RedisSettings

from .voice_dir import DirVoiceStore
from .voice_store import (
    DEFAULT_PREFIX,
    VOICES_DIRNAME,
    StoredVoice,
    VoiceNameTaken,
    VoiceQuotaExceeded,
    VoiceStore,
    _lookup,
    _prepare,
    _sorted,
    owner_tag,
)

# --- Redis -------------------------------------------------------------------------------------------------

# KEYS: names index, owner's sorted set, voice hash, npz string.
# ARGV: name, id, quota (-1: none), created_at, owner, duration_s, bytes, meta JSON, npz.
# -> {1, id} added | {0, id of the holder} name taken | {-1, count} quota reached. Checks first, then writes.
_ADD = """
local taken = redis.call('HGET', KEYS[1], ARGV[1])
if taken then return {0, taken} end
local quota = tonumber(ARGV[3])
if quota >= 0 then
  local n = redis.call('ZCARD', KEYS[2])
  if n >= quota then return {-1, n} end
end
redis.call('SET', KEYS[4], ARGV[9])
redis.call('HSET', KEYS[3], 'id', ARGV[2], 'name', ARGV[1], 'owner', ARGV[5], 'created_at', ARGV[4],
           'duration_s', ARGV[6], 'bytes', ARGV[7], 'meta', ARGV[8])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
return {1, ARGV[2]}
"""

# KEYS: names index, owner's sorted set. ARGV: prefix, id ('' to look up the name), name, owner.
# -> 1 deleted, 0 the owner has no such voice.
_DELETE = """
local id = ARGV[2]
if id == '' then
  id = redis.call('HGET', KEYS[1], ARGV[3])
  if not id then return 0 end
end
local vk = ARGV[1] .. ':voice:' .. id
local v = redis.call('HMGET', vk, 'owner', 'name')
if v[1] ~= ARGV[4] then return 0 end
redis.call('DEL', vk, ARGV[1] .. ':npz:' .. id)
if v[2] and redis.call('HGET', KEYS[1], v[2]) == id then redis.call('HDEL', KEYS[1], v[2]) end
redis.call('ZREM', KEYS[2], id)
return 1
"""

_LIST_CHUNK = 200  # voices read per round trip


@dataclass(frozen=True)
class VoiceKeys:
    """The Redis key layout of the voice store (the delete script builds voice keys from the prefix too)."""

    prefix: str = DEFAULT_PREFIX

    def voice(self, voice_id: str) -> str:
        return f"{self.prefix}:voice:{voice_id}"

    def npz(self, voice_id: str) -> str:
        return f"{self.prefix}:npz:{voice_id}"

    def names(self, owner: str) -> str:
        return f"{self.prefix}:names:{owner_tag(owner)}"

    def owner(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner_tag(owner)}"


def _text(value: Any) -> str:
    """A Redis reply (bytes: no client here decodes) as text."""
    return value.decode("utf-8", "surrogatepass") if isinstance(value, (builtins.bytes, bytearray)) else str(value)


def _voice_from_hash(raw: Mapping[Any, Any], owner: str) -> StoredVoice | None:
    """The voice a ``HGETALL`` read, if it exists and ``owner`` owns it."""
    if not raw:
        return None
    h = {_text(k): _text(v) for k, v in raw.items()}
    if h.get("owner") != owner:
        return None
    try:
        return StoredVoice.from_record({**h, "meta": json.loads(h.get("meta") or "{}")})
    except (KeyError, ValueError):
        return None


class RedisVoiceStore(VoiceStore):
    """Voices in Redis (see the module docstring for the keys). Give ``settings`` (the clients are made when
    first needed, the asyncio one in the loop that uses it) or ready clients."""

    def __init__(self, settings: RedisSettings | None = None, *, prefix: str = DEFAULT_PREFIX,
                 client: aioredis.Redis | None = None, sync_client: redis.Redis | None = None):
        if settings is None and client is None and sync_client is None:
            raise ValueError("RedisVoiceStore needs RedisSettings or a client")
        self.settings = settings
        self.keys = VoiceKeys(prefix)
        self._client = client
        self._own_client = client is None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._sync = sync_client
        self._own_sync = sync_client is None

    def _aclient(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or (self._own_client and self._client_loop is not loop):
            if self.settings is None:
                raise ValueError("RedisVoiceStore was given no asyncio client and no settings")
            self._client = redis_conn.async_client(self.settings)
            self._client_loop = loop
        return self._client

    def _sclient(self) -> redis.Redis:
        if self._sync is None:
            if self.settings is None:
                raise ValueError("RedisVoiceStore was given no blocking client and no settings")
            self._sync = redis_conn.sync_client(self.settings)
        return self._sync

    async def add(self, owner: str, name: str, npz: builtins.bytes, duration_s: float,
                  meta: Mapping[str, Any] | None = None, quota: int | None = None,
                  reserved: Callable[[str], bool] | None = None) -> StoredVoice:
        new = _prepare(owner, name, npz, duration_s, meta, quota, reserved)
        v = new.voice
        client = self._aclient()
        keys = [self.keys.names(owner), self.keys.owner(owner), self.keys.voice(v.id), self.keys.npz(v.id)]
        args: builtins.list[Any] = [v.name, v.id, -1 if quota is None else quota, repr(v.created_at), owner,
                                    repr(v.duration_s), v.bytes, new.meta_json, new.npz]
        status, detail = await client.eval(_ADD, len(keys), *keys, *args)
        if status == 0:
            raise VoiceNameTaken(v.name)
        if status == -1:
            raise VoiceQuotaExceeded(int(quota or 0), int(detail))
        return v

    async def list(self, owner: str) -> builtins.list[StoredVoice]:
        client = self._aclient()
        ids = await client.zrange(self.keys.owner(owner), 0, -1)
        voices: builtins.list[StoredVoice] = []
        for start in range(0, len(ids), _LIST_CHUNK):
            pipe = client.pipeline(transaction=False)
            for raw in ids[start:start + _LIST_CHUNK]:
                pipe.hgetall(self.keys.voice(_text(raw)))
            voices += [v for h in await pipe.execute() if (v := _voice_from_hash(h, owner)) is not None]
        return _sorted(voices)

    async def _resolve(self, owner: str, name_or_id: str) -> str | None:
        found = _lookup(name_or_id)
        if found is None:
            return None
        kind, value = found
        if kind == "id":
            return value
        raw = await self._aclient().hget(self.keys.names(owner), value)
        return None if raw is None else _text(raw)

    async def get(self, owner: str, name_or_id: str) -> StoredVoice | None:
        voice_id = await self._resolve(owner, name_or_id)
        if voice_id is None:
            return None
        return _voice_from_hash(await self._aclient().hgetall(self.keys.voice(voice_id)), owner)

    async def npz(self, owner: str, name_or_id: str) -> builtins.bytes | None:
        voice_id = await self._resolve(owner, name_or_id)
        if voice_id is None:
            return None
        pipe = self._aclient().pipeline(transaction=True)
        pipe.hget(self.keys.voice(voice_id), "owner")
        pipe.get(self.keys.npz(voice_id))
        holder, data = await pipe.execute()
        return data if holder is not None and _text(holder) == owner else None

    async def delete(self, owner: str, name_or_id: str) -> bool:
        found = _lookup(name_or_id)
        if found is None:
            return False
        kind, value = found
        keys = [self.keys.names(owner), self.keys.owner(owner)]
        args = [self.keys.prefix, value if kind == "id" else "", value if kind == "name" else "", owner]
        return bool(await self._aclient().eval(_DELETE, len(keys), *keys, *args))

    def list_sync(self, owner: str) -> builtins.list[StoredVoice]:
        client = self._sclient()
        ids: Any = client.zrange(self.keys.owner(owner), 0, -1)
        voices: builtins.list[StoredVoice] = []
        for start in range(0, len(ids), _LIST_CHUNK):
            pipe = client.pipeline(transaction=False)
            for raw in ids[start:start + _LIST_CHUNK]:
                pipe.hgetall(self.keys.voice(_text(raw)))
            voices += [v for h in pipe.execute() if (v := _voice_from_hash(h, owner)) is not None]
        return _sorted(voices)

    def _resolve_sync(self, owner: str, name_or_id: str) -> str | None:
        found = _lookup(name_or_id)
        if found is None:
            return None
        kind, value = found
        if kind == "id":
            return value
        raw: Any = self._sclient().hget(self.keys.names(owner), value)
        return None if raw is None else _text(raw)

    def get_sync(self, owner: str, name_or_id: str) -> StoredVoice | None:
        voice_id = self._resolve_sync(owner, name_or_id)
        if voice_id is None:
            return None
        raw: Any = self._sclient().hgetall(self.keys.voice(voice_id))
        return _voice_from_hash(raw, owner)

    def load_npz_sync(self, owner: str, name_or_id: str) -> builtins.bytes | None:
        voice_id = self._resolve_sync(owner, name_or_id)
        if voice_id is None:
            return None
        pipe = self._sclient().pipeline(transaction=True)
        pipe.hget(self.keys.voice(voice_id), "owner")
        pipe.get(self.keys.npz(voice_id))
        holder, data = pipe.execute()
        return data if holder is not None and _text(holder) == owner else None

    async def aclose(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None
        self.close()

    def close(self) -> None:
        if self._sync is not None and self._own_sync:
            self._sync.close()
            self._sync = None


def open_voice_store(redis_settings: RedisSettings | None, state_dir: Path | str, *,
                     prefix: str = DEFAULT_PREFIX) -> VoiceStore:
    """Redis when ``redis_settings`` are given (keys under ``prefix``), else ``<state_dir>/voices``."""
    if redis_settings is not None:
        return RedisVoiceStore(redis_settings, prefix=prefix)
    return DirVoiceStore(Path(state_dir) / VOICES_DIRNAME)
