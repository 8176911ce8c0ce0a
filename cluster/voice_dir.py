"""The folder backend of the voice store (cluster/voice_store.py has the contract, names, ids and records):
``DirVoiceStore``, a folder per owner under ``root``, one flock per owner for adds and deletes, O_EXCL name
files and atomic writes, so a voice is whole or absent after any crash; its sync readers serve ``synth`` and
``dataset``."""

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
from pathlib import Path
from typing import Any

from .voice_store import (
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
