"""The voice store, both backends (a real redis-server; a directory): ownership, names, quota, concurrency,
restarts, and nothing half-written after a refused or failed add."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from bark_serve.cluster import voice_dir as vb
from bark_serve.cluster import voice_store as vs
from bark_serve.cluster.redis_conn import RedisSettings
from bark_serve.cluster.voice_backends import DirVoiceStore, RedisVoiceStore, open_voice_store
from bark_serve.cluster.voice_store import (
    InvalidVoiceName,
    StoredVoice,
    VoiceNameTaken,
    VoiceQuotaExceeded,
    VoiceStore,
    check_name,
)
from bark_serve.stages.types import InvalidRequestError

ALICE = "a" * 32  # owners are hashes of API keys
BOB = "b" * 32
SHARED = ""
NPZ = b"PK\x03\x04 not really a zip, the store never opens it"
REPO = Path(__file__).resolve().parents[2]


def run(coro):
    return asyncio.run(coro)


class Backend:
    """Makes stores of one backend on one place (a directory, or a key prefix of the test redis-server)."""

    def __init__(self, kind: str, root: Path, url: str | None = None, prefix: str | None = None):
        self.kind, self.root, self.url, self.prefix = kind, root, url, prefix

    def make(self) -> VoiceStore:
        if self.kind == "dir":
            return DirVoiceStore(self.root)
        return RedisVoiceStore(RedisSettings(redis_url=self.url), prefix=f"{self.prefix}:voices")

    def snapshot(self) -> set:
        """Everything the store has written (files, or keys with their values)."""
        if self.kind == "dir":
            if not self.root.exists():
                return set()
            return {(str(p.relative_to(self.root)), p.read_bytes() if p.is_file() else None)
                    for p in self.root.rglob("*") if p.name != ".lock" and not p.is_dir()}
        client = redis.Redis.from_url(self.url)
        try:
            out = set()
            for key in client.scan_iter(match=f"{self.prefix}:voices:*"):
                kind = client.type(key)
                value = (tuple(sorted(client.hgetall(key).items())) if kind == b"hash"
                         else tuple(client.zrange(key, 0, -1, withscores=True)) if kind == b"zset" else client.get(key))
                out.add((key, value))
            return out
        finally:
            client.close()


@pytest.fixture(params=["dir", "redis"])
def backend(request, tmp_path, prefix) -> Backend:
    if request.param == "dir":
        return Backend("dir", tmp_path / "voices")
    server = request.getfixturevalue("redis_server")
    return Backend("redis", tmp_path / "voices", server.url, prefix)


async def add(store: VoiceStore, owner: str, name: str, **kw) -> StoredVoice:
    return await store.add(owner, name, NPZ + name.encode("utf-8", "surrogatepass"), kw.pop("duration_s", 3.5), **kw)


# --- names ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Alice", "my voice 2", "narrator_v1.2", "a", "x" * 64, "Zoë", "日本語の声",
                                  "a-b_c.d e", "voice-1", "voices"])
def test_good_names(name):
    assert check_name(name) == name


def test_names_are_nfc():
    assert check_name("Zoe\u0308") == "Zo\u00eb"


@pytest.mark.parametrize("name, why", [
    ("", "empty"), ("x" * 65, "at most 64"), ("a/b", "path"), ("a\\b", "path"), ("..", "'..'"),
    ("a..b", "'..'"), ("../etc", "path"), (".hidden", "begin with '.'"), ("a\x00b", "control"),
    ("a\tb", "control"), ("a\nb", "control"), ("\x7f", "control"), ("a\ud800b", "surrogate"),
    (" lead", "space"), ("trail ", "space"), ("voice_abc", "voice_"), ("Voice_x", "voice_"),
    ("a:b", "not U+003A"), ("a*b", "not U+002A"), ("zero\u200bwidth", "not U+200B"), ("emoji 🎤", "not U+1F3A4"),
])
def test_bad_names(name, why):
    with pytest.raises(InvalidVoiceName, match=re.escape(why)) as info:
        check_name(name)
    assert isinstance(info.value, InvalidRequestError)


def test_bad_name_types():
    with pytest.raises(InvalidVoiceName, match="string"):
        check_name(None)
    with pytest.raises(InvalidVoiceName, match="string"):
        check_name(b"alice")


def test_ids_and_public_view():
    ids = {vs.new_voice_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"voice_[a-z2-7]{24}", i) for i in ids)
    assert all(vs.is_voice_id(i) for i in ids)
    voice = StoredVoice("voice_" + "a" * 24, "n", ALICE, 1.0, 2.0, 3, {"sr": 24000})
    public = voice.to_public()
    assert "owner" not in public and ALICE not in json.dumps(public)
    assert public == {"id": voice.id, "object": "voice", "name": "n", "created_at": 1.0, "duration_s": 2.0,
                      "bytes": 3, "meta": {"sr": 24000}}
    public["meta"]["sr"] = 1
    assert voice.meta == {"sr": 24000}  # a copy
    assert StoredVoice.from_record(voice.to_record()) == voice


def test_owner_tags_stay_inside():
    assert vs.owner_tag("") == "_shared"
    assert vs.owner_tag(ALICE) == ALICE
    for odd in ("..", "../x", "a/b", "_shared", "-", "x" * 300, "\x00"):
        tag = vs.owner_tag(odd)
        assert re.fullmatch(r"_[0-9a-f]{64}", tag), odd
    assert vs.owner_tag("..") != vs.owner_tag("../x")


def test_open_voice_store(tmp_path):
    store = open_voice_store(None, tmp_path)
    assert isinstance(store, DirVoiceStore) and store.root == tmp_path / "voices"
    store = open_voice_store(RedisSettings(redis_url="redis://127.0.0.1:1/0"), tmp_path)
    assert isinstance(store, RedisVoiceStore) and store.keys.prefix == "bark:voices"


# --- both backends -------------------------------------------------------------------------------------------

def test_round_trip(backend):
    async def main():
        store = backend.make()
        assert await store.list(ALICE) == []
        first = await store.add(ALICE, "Narrator", NPZ, 4.25, meta={"sample_rate": 24000, "source": "clip.wav"})
        second = await add(store, ALICE, "second voice")
        assert vs.is_voice_id(first.id) and first.id != second.id
        assert (first.name, first.owner, first.duration_s, first.bytes) == ("Narrator", ALICE, 4.25, len(NPZ))
        assert first.meta == {"sample_rate": 24000, "source": "clip.wav"}
        assert abs(first.created_at - time.time()) < 60
        assert [v.id for v in await store.list(ALICE)] == [first.id, second.id]  # oldest first
        assert await store.list(ALICE) == [first, second]
        assert await store.get(ALICE, first.id) == first
        assert await store.get(ALICE, "Narrator") == first
        assert await store.npz(ALICE, first.id) == NPZ
        assert await store.npz(ALICE, "Narrator") == NPZ
        # the sync twins (synth, dataset rows)
        assert store.list_sync(ALICE) == [first, second]
        assert store.get_sync(ALICE, "Narrator") == first
        assert store.load_npz_sync(ALICE, "Narrator") == NPZ
        assert store.load_npz_sync(ALICE, second.id) == NPZ + b"second voice"
        # lookups of what names no voice
        for missing in ("nobody", "narrator", "voice_" + "a" * 24, "../Narrator", "a\x00", "", "x" * 100):
            assert await store.get(ALICE, missing) is None
            assert await store.npz(ALICE, missing) is None
            assert store.load_npz_sync(ALICE, missing) is None
            assert await store.delete(ALICE, missing) is False
        assert await store.delete(ALICE, "Narrator") is True
        assert await store.get(ALICE, first.id) is None and await store.npz(ALICE, first.id) is None
        assert await store.delete(ALICE, first.id) is False
        assert await store.list(ALICE) == [second]
        assert await store.delete(ALICE, second.id) is True
        assert await store.list(ALICE) == [] and store.list_sync(ALICE) == []
        again = await store.add(ALICE, "Narrator", NPZ, 1.0)  # a deleted name is free again
        assert again.id != first.id and await store.get(ALICE, "Narrator") == again
        await store.aclose()
    run(main())


def test_nfc_names_are_one_name(backend):
    async def main():
        store = backend.make()
        voice = await store.add(ALICE, "Zoe\u0308", NPZ, 1.0)
        assert voice.name == "Zo\u00eb"
        assert await store.get(ALICE, "Zo\u00eb") == voice == await store.get(ALICE, "Zoe\u0308")
        with pytest.raises(VoiceNameTaken):
            await store.add(ALICE, "Zo\u00eb", NPZ, 1.0)
        await store.aclose()
    run(main())


def test_other_owners_see_nothing(backend):
    async def main():
        store = backend.make()
        mine = await add(store, ALICE, "secret")
        shared = await add(store, SHARED, "house voice")
        for other in (BOB, SHARED):
            assert all(v.id != mine.id for v in await store.list(other))
            assert await store.get(other, mine.id) is None and await store.get(other, "secret") is None
            assert await store.npz(other, mine.id) is None and await store.npz(other, "secret") is None
            assert store.load_npz_sync(other, mine.id) is None and store.get_sync(other, mine.id) is None
            assert await store.delete(other, mine.id) is False and await store.delete(other, "secret") is False
        assert await store.get(ALICE, shared.id) is None and await store.delete(ALICE, shared.id) is False
        assert await store.list(ALICE) == [mine] and await store.list(SHARED) == [shared]
        assert await store.list(BOB) == []
        assert await store.npz(ALICE, mine.id) == NPZ + b"secret"  # nothing was deleted
        assert store.list_sync(SHARED) == [shared] and store.load_npz_sync(SHARED, "house voice") is not None
        await store.aclose()
    run(main())


def test_name_taken_per_owner(backend):
    async def main():
        store = backend.make()
        first = await add(store, ALICE, "Alice")
        before = backend.snapshot()
        with pytest.raises(VoiceNameTaken) as info:
            await add(store, ALICE, "Alice")
        assert info.value.name == "Alice" and not info.value.reserved and "already" in str(info.value)
        assert backend.snapshot() == before  # the refused add wrote nothing
        other = await add(store, BOB, "Alice")  # another owner may use the name
        shared = await add(store, SHARED, "Alice")
        assert len({first.id, other.id, shared.id}) == 3
        assert await store.npz(BOB, "Alice") == await store.npz(ALICE, "Alice")
        assert (await store.get(BOB, "Alice")).id == other.id
        assert await add(store, ALICE, "alice")  # names are case-sensitive
        await store.aclose()
    run(main())


def test_reserved_names(backend):
    async def main():
        store = backend.make()
        presets = {"announcer", "narrator"}
        with pytest.raises(VoiceNameTaken, match="preset or an alias") as info:
            await add(store, ALICE, "announcer", reserved=presets.__contains__)
        assert info.value.reserved and info.value.name == "announcer"
        assert await store.list(ALICE) == [] and backend.snapshot() == set()
        assert await add(store, ALICE, "someone else", reserved=presets.__contains__)
        await store.aclose()
    run(main())


def test_bad_names_refused(backend):
    async def main():
        store = backend.make()
        for name in ("a/b", "..", "../../etc/passwd", "a\\b", "nul\x00", "bell\x07", "\ud800", "x" * 65, "",
                     " lead", "voice_" + "a" * 24):
            with pytest.raises(InvalidVoiceName):
                await add(store, ALICE, name)
        with pytest.raises(ValueError, match="empty"):
            await store.add(ALICE, "fine", b"", 1.0)
        with pytest.raises(ValueError, match="duration_s"):
            await store.add(ALICE, "fine", NPZ, float("nan"))
        with pytest.raises(ValueError, match="quota"):
            await store.add(ALICE, "fine", NPZ, 1.0, quota=-1)
        with pytest.raises(TypeError):
            await store.add(ALICE, "fine", NPZ, 1.0, meta={"x": object()})
        assert await store.list(ALICE) == [] and backend.snapshot() == set()
        await store.aclose()
    run(main())


def test_quota(backend):
    async def main():
        store = backend.make()
        voices = [await add(store, ALICE, f"v{i}", quota=3) for i in range(3)]
        before = backend.snapshot()
        with pytest.raises(VoiceQuotaExceeded) as info:
            await add(store, ALICE, "v3", quota=3)
        assert (info.value.limit, info.value.count) == (3, 3) and "3" in str(info.value)
        assert backend.snapshot() == before  # nothing of the refused voice
        assert await store.get(ALICE, "v3") is None
        assert await add(store, BOB, "v3", quota=3)  # per owner
        assert await add(store, ALICE, "unlimited")  # quota=None: no limit
        with pytest.raises(VoiceQuotaExceeded):
            await add(store, ALICE, "v3", quota=4)
        assert await store.delete(ALICE, voices[0].id)
        third = await add(store, ALICE, "v3", quota=4)  # after a delete one more fits
        assert [v.name for v in await store.list(ALICE)] == ["v1", "v2", "unlimited", "v3"]
        assert third.name == "v3"
        with pytest.raises(VoiceQuotaExceeded) as info:
            await add(store, ALICE, "v4", quota=0)
        assert info.value.limit == 0
        await store.aclose()
    run(main())


def test_name_taken_beats_quota(backend):
    async def main():
        store = backend.make()
        await add(store, ALICE, "only", quota=1)
        with pytest.raises(VoiceNameTaken):
            await add(store, ALICE, "only", quota=1)
        await store.aclose()
    run(main())


def test_concurrent_adds_of_one_name(backend):
    async def main():
        store = backend.make()
        results = await asyncio.gather(*(store.add(ALICE, "popular", NPZ + bytes([i]), 1.0, meta={"i": i})
                                         for i in range(20)), return_exceptions=True)
        won = [r for r in results if isinstance(r, StoredVoice)]
        lost = [r for r in results if isinstance(r, VoiceNameTaken)]
        assert len(won) == 1 and len(lost) == 19, results
        assert await store.list(ALICE) == won
        assert await store.npz(ALICE, "popular") == NPZ + bytes([won[0].meta["i"]])
        await store.aclose()
    run(main())


def test_concurrent_adds_under_quota(backend):
    async def main():
        store = backend.make()
        results = await asyncio.gather(*(add(store, ALICE, f"voice {i}", quota=5) for i in range(20)),
                                       return_exceptions=True)
        won = [r for r in results if isinstance(r, StoredVoice)]
        refused = [r for r in results if isinstance(r, VoiceQuotaExceeded)]
        assert len(won) == 5 and len(refused) == 15, results
        assert sorted(v.id for v in await store.list(ALICE)) == sorted(v.id for v in won)
        for v in won:
            assert await store.npz(ALICE, v.id) == NPZ + v.name.encode()
        await store.aclose()
    run(main())


def test_concurrent_deletes_and_adds(backend):
    """A voice deleted by many callers at once is deleted once; its name can be taken at the same time."""
    async def main():
        store = backend.make()
        old = await add(store, ALICE, "busy")
        results = await asyncio.gather(*(store.delete(ALICE, old.id) for _ in range(10)),
                                       *(add(store, ALICE, "busy") for _ in range(10)), return_exceptions=True)
        deletes, adds = results[:10], results[10:]
        assert deletes.count(True) == 1 and deletes.count(False) == 9
        won = [r for r in adds if isinstance(r, StoredVoice)]
        assert len(won) <= 1 and all(isinstance(r, (StoredVoice, VoiceNameTaken)) for r in adds)
        listed = await store.list(ALICE)
        assert listed == won
        if won:
            assert (await store.get(ALICE, "busy")) == won[0]
        else:
            assert await store.get(ALICE, "busy") is None
            assert await add(store, ALICE, "busy")
        await store.aclose()
    run(main())


# --- durability ----------------------------------------------------------------------------------------------

def test_dir_store_survives_a_new_instance(tmp_path):
    async def first():
        store = DirVoiceStore(tmp_path / "state" / "voices")
        return [await add(store, ALICE, "kept"), await add(store, SHARED, "shared one")]

    kept, shared = run(first())

    async def second():
        store = open_voice_store(None, tmp_path / "state")  # a restarted server
        assert await store.list(ALICE) == [kept] and await store.list(SHARED) == [shared]
        assert await store.get(ALICE, kept.id) == kept and await store.npz(ALICE, "kept") == NPZ + b"kept"
        with pytest.raises(VoiceNameTaken):
            await add(store, ALICE, "kept")
    run(second())
    # in-process callers without an event loop
    store = DirVoiceStore(tmp_path / "state" / "voices")
    assert store.list_sync(SHARED) == [shared] and store.load_npz_sync(SHARED, "shared one") == NPZ + b"shared one"


def test_redis_store_survives_a_restart(own_redis):
    settings = RedisSettings(redis_url=own_redis.url)

    async def first():
        store = RedisVoiceStore(settings)
        voice = await add(store, ALICE, "kept")
        await store.aclose()
        return voice

    kept = run(first())
    own_redis.restart()  # SIGTERM: the AOF is flushed; the server comes back with its data

    async def second():
        store = open_voice_store(settings, Path("/nonexistent"))
        assert await store.list(ALICE) == [kept]
        assert await store.get(ALICE, "kept") == kept and await store.npz(ALICE, kept.id) == NPZ + b"kept"
        with pytest.raises(VoiceNameTaken):
            await add(store, ALICE, "kept")
        await store.aclose()
    run(second())


def test_redis_sync_methods_share_the_data(redis_server, prefix):
    store = RedisVoiceStore(RedisSettings(redis_url=redis_server.url), prefix=prefix)
    voice = run(add(store, SHARED, "row voice"))
    assert store.list_sync(SHARED) == [voice] and store.get_sync(SHARED, voice.id) == voice
    assert store.load_npz_sync(SHARED, "row voice") == NPZ + b"row voice"
    assert store.load_npz_sync(ALICE, "row voice") is None
    store.close()


# --- the directory store: failures half-way, processes -------------------------------------------------------

def test_dir_failed_write_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "voices"
    store = DirVoiceStore(root)
    real = vb._write_atomic

    def failing(path, data):
        if path.suffix == ".json":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(vb, "_write_atomic", failing)
    with pytest.raises(OSError, match="No space"):
        run(add(store, ALICE, "doomed"))
    files = [p for p in root.rglob("*") if p.is_file() and p.name != ".lock"]
    assert files == []
    monkeypatch.setattr(vb, "_write_atomic", real)
    assert run(add(store, ALICE, "doomed")).name == "doomed"  # the name is free


def test_dir_takes_over_a_name_left_by_a_killed_add(tmp_path):
    """A name file whose voice was never committed (the process died before the metadata) frees its name."""
    store = DirVoiceStore(tmp_path)
    voice = run(add(store, ALICE, "crashed"))
    voices = tmp_path / ALICE / "voices"
    (voices / f"{voice.id}.json").unlink()  # as if killed between the name file and the commit
    assert store.get_sync(ALICE, "crashed") is None and store.list_sync(ALICE) == []
    again = run(add(store, ALICE, "crashed", quota=1))
    assert again.id != voice.id and store.get_sync(ALICE, "crashed") == again
    (tmp_path / ALICE / "names" / vb._name_file("other")).write_bytes(b"")  # killed before writing the id
    assert run(add(store, BOB, "other")) and run(add(store, ALICE, "other"))


def test_dir_layout(tmp_path):
    store = DirVoiceStore(tmp_path)
    voice = run(store.add(SHARED, "layout", NPZ, 2.0, meta={"k": "v"}))
    base = tmp_path / "_shared"
    assert (base / "voices" / f"{voice.id}.npz").read_bytes() == NPZ
    record = json.loads((base / "voices" / f"{voice.id}.json").read_text())
    assert record == voice.to_record()
    assert (base / "names" / vb._name_file("layout")).read_text() == voice.id
    assert not [p for p in base.rglob("*.tmp")]
    # an owner string that is not a plain hash stays inside its own folder
    odd = run(store.add("../escape", "x", NPZ, 1.0))
    assert store.get_sync("../escape", odd.id) == odd and not (tmp_path.parent / "escape").exists()
    assert all(p.resolve().is_relative_to(tmp_path.resolve()) for p in tmp_path.rglob("*"))


_PROC = textwrap.dedent("""
    import asyncio, sys, time
    from bark_serve.cluster.voice_store import VoiceNameTaken, VoiceQuotaExceeded
    from bark_serve.cluster.voice_backends import DirVoiceStore
    root, mode, start, tag = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    store = DirVoiceStore(root)
    async def main():
        time.sleep(max(0.0, start - time.time()))
        if mode == "name":
            calls = [store.add("", "contested", tag.encode(), 1.0) for _ in range(10)]
        else:
            calls = [store.add("", f"{tag} {i}", b"x", 1.0, quota=5) for i in range(10)]
        out = await asyncio.gather(*calls, return_exceptions=True)
        won = sum(not isinstance(r, BaseException) for r in out)
        taken = sum(isinstance(r, VoiceNameTaken) for r in out)
        quota = sum(isinstance(r, VoiceQuotaExceeded) for r in out)
        print(won, taken, quota)
    asyncio.run(main())
""")


@pytest.mark.parametrize("mode", ["name", "quota"])
def test_dir_store_across_processes(tmp_path, mode):
    """Two processes, ten concurrent adds each: one name has one winner, and the quota holds across them."""
    start = time.time() + 2.0  # both have started Python by then
    procs = [subprocess.Popen([sys.executable, "-c", _PROC, str(tmp_path), mode, repr(start), f"p{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for i in range(2)]
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        counts.append([int(x) for x in out.split()])
    won, taken, quota = (sum(c[k] for c in counts) for k in range(3))
    voices = DirVoiceStore(tmp_path).list_sync("")
    if mode == "name":
        assert (won, taken, quota) == (1, 19, 0) and len(voices) == 1
    else:
        assert (won, taken, quota) == (5, 0, 15) and len(voices) == 5
