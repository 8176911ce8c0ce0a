"""The two backends of the voice store (cluster/voice_store.py has the contract, names, ids and records):
``RedisVoiceStore`` (one Lua script per add and per delete) and ``DirVoiceStore`` (a folder per owner, flock,
O_EXCL name files, atomic writes), and ``open_voice_store``, which picks one."""

from __future__ import annotations

import asyncio
import builtins
import errno
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from bark_serve.cluster import redis_conn
from bark_serve.cluster.redis_conn import RedisSettings

from .voice_store import (
    DEFAULT_PREFIX,
    VOICES_DIRNAME,
    StoredVoice,
    VoiceNameTaken,
    VoiceQuotaExceeded,
    VoiceStore,
    _lookup,
    _NewVoice,
    _prepare,
    _sorted,
    is_voice_id,
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


# --- directory ---------------------------------------------------------------------------------------------

def _name_file(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: builtins.bytes) -> None:
    """``path`` holds ``data`` entirely or not at all: a temporary file beside it, fsynced, then renamed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_or_none(path: Path) -> builtins.bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


class DirVoiceStore(VoiceStore):
    """Voices as files under ``root`` (see the module docstring for the layout); survives restarts."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def _owner_dir(self, owner: str) -> Path:
        if not isinstance(owner, str):
            raise TypeError(f"owner must be a string, got {type(owner).__name__}")
        return self.root / owner_tag(owner)

    @staticmethod
    @contextmanager
    def _locked(owner_dir: Path) -> Iterator[None]:
        fd = os.open(owner_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read_voice(self, owner: str, voice_id: str) -> StoredVoice | None:
        raw = _read_or_none(self._owner_dir(owner) / "voices" / f"{voice_id}.json")
        if raw is None:
            return None
        try:
            voice = StoredVoice.from_record(json.loads(raw))
        except (KeyError, TypeError, ValueError):
            return None
        return voice if voice.owner == owner and voice.id == voice_id else None

    def _name_holder(self, owner: str, name: str) -> str | None:
        """The id the owner's name file holds (an empty or garbled one: None)."""
        raw = _read_or_none(self._owner_dir(owner) / "names" / _name_file(name))
        if raw is None:
            return None
        voice_id = raw.decode("ascii", "replace").strip()
        return voice_id if is_voice_id(voice_id) else None

    def _resolve_sync(self, owner: str, name_or_id: str) -> StoredVoice | None:
        found = _lookup(name_or_id)
        if found is None:
            return None
        kind, value = found
        voice_id = value if kind == "id" else self._name_holder(owner, value)
        if voice_id is None:
            return None
        voice = self._read_voice(owner, voice_id)
        if voice is None or (kind == "name" and voice.name != value):
            return None
        return voice

    def _voice_ids(self, owner_dir: Path) -> builtins.list[str]:
        try:
            entries = os.listdir(owner_dir / "voices")
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [e[:-5] for e in entries if e.endswith(".json") and is_voice_id(e[:-5])]

    def _add_sync(self, new: _NewVoice, quota: int | None) -> StoredVoice:
        v = new.voice
        odir = self._owner_dir(v.owner)
        names, voices = odir / "names", odir / "voices"
        names.mkdir(parents=True, exist_ok=True)
        voices.mkdir(exist_ok=True)
        name_path = names / _name_file(v.name)
        with self._locked(odir):
            if name_path.exists():
                holder = self._name_holder(v.owner, v.name)
                if holder is not None and self._read_voice(v.owner, holder) is not None:
                    raise VoiceNameTaken(v.name)
                # Its voice was never committed (an add killed half-way): every add holds the lock, so none is
                # in progress now, and the name is free again.
                name_path.unlink(missing_ok=True)
            count = len(self._voice_ids(odir))
            if quota is not None and count >= quota:
                raise VoiceQuotaExceeded(quota, count)
            try:
                fd = os.open(name_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise VoiceNameTaken(v.name) from None
            npz_path, json_path = voices / f"{v.id}.npz", voices / f"{v.id}.json"
            try:
                try:
                    os.write(fd, v.id.encode("ascii"))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _write_atomic(npz_path, new.npz)
                record = {**v.to_record(), "meta": json.loads(new.meta_json)}
                _write_atomic(json_path, json.dumps(record, ensure_ascii=False).encode("utf-8"))
                _fsync_dir(voices)
                _fsync_dir(names)
            except BaseException:
                for path in (json_path, npz_path, name_path):
                    path.unlink(missing_ok=True)
                raise
        return v

    def _delete_sync(self, owner: str, name_or_id: str) -> bool:
        odir = self._owner_dir(owner)
        if _lookup(name_or_id) is None or not odir.is_dir():
            return False
        with self._locked(odir):
            voice = self._resolve_sync(owner, name_or_id)
            if voice is None:
                return False
            voices = odir / "voices"
            (voices / f"{voice.id}.json").unlink(missing_ok=True)  # uncommitted first: readers stop seeing it
            name_path = odir / "names" / _name_file(voice.name)
            if self._name_holder(owner, voice.name) == voice.id:
                name_path.unlink(missing_ok=True)
            (voices / f"{voice.id}.npz").unlink(missing_ok=True)
            _fsync_dir(voices)
            try:
                _fsync_dir(odir / "names")
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return True

    def list_sync(self, owner: str) -> builtins.list[StoredVoice]:
        ids = self._voice_ids(self._owner_dir(owner))
        return _sorted([v for i in ids if (v := self._read_voice(owner, i)) is not None])

    def get_sync(self, owner: str, name_or_id: str) -> StoredVoice | None:
        return self._resolve_sync(owner, name_or_id)

    def load_npz_sync(self, owner: str, name_or_id: str) -> builtins.bytes | None:
        voice = self._resolve_sync(owner, name_or_id)
        if voice is None:
            return None
        return _read_or_none(self._owner_dir(owner) / "voices" / f"{voice.id}.npz")

    async def add(self, owner: str, name: str, npz: builtins.bytes, duration_s: float,
                  meta: Mapping[str, Any] | None = None, quota: int | None = None,
                  reserved: Callable[[str], bool] | None = None) -> StoredVoice:
        new = _prepare(owner, name, npz, duration_s, meta, quota, reserved)
        return await asyncio.to_thread(self._add_sync, new, quota)

    async def list(self, owner: str) -> builtins.list[StoredVoice]:
        return await asyncio.to_thread(self.list_sync, owner)

    async def get(self, owner: str, name_or_id: str) -> StoredVoice | None:
        return await asyncio.to_thread(self.get_sync, owner, name_or_id)

    async def npz(self, owner: str, name_or_id: str) -> builtins.bytes | None:
        return await asyncio.to_thread(self.load_npz_sync, owner, name_or_id)

    async def delete(self, owner: str, name_or_id: str) -> bool:
        return await asyncio.to_thread(self._delete_sync, owner, name_or_id)


def open_voice_store(redis_settings: RedisSettings | None, state_dir: Path | str, *,
                     prefix: str = DEFAULT_PREFIX) -> VoiceStore:
    """Redis when ``redis_settings`` are given (keys under ``prefix``), else ``<state_dir>/voices``."""
    if redis_settings is not None:
        return RedisVoiceStore(redis_settings, prefix=prefix)
    return DirVoiceStore(Path(state_dir) / VOICES_DIRNAME)
