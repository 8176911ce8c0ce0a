"""A corpus of bad input against the real app (real Ray, HTTP, Redis, the tiny checkpoint).

Every case must get a small 4xx JSON answer in the documented ``{"error": {"message", "type", "code"}}``
shape, never a 5xx; afterwards the same replicas (same pids) still serve, and no admission slot stays taken.
On /v1/batches a bad item fails alone: the submission is accepted and only that item is recorded invalid.
"""

from __future__ import annotations

import json
import time

import httpx
import msgpack
import pytest

from bark_serve.cluster.ports import free_port
from bark_serve.stages.types import InvalidRequestError
from tests.serving.conftest import e2e_config
from tests.serving.e2e_helpers import (
    AUTH,
    MAX_ERROR_BYTES,
    assert_error_shape,
    orchestrator_stats,
    replica_pids,
    running_app,
    speak,
)

pytestmark = pytest.mark.slow
JSON = {**AUTH, "Content-Type": "application/json"}
MSGPACK = {**AUTH, "Content-Type": "application/msgpack"}
JSONL = {**AUTH, "Content-Type": "application/jsonl"}
SPEECH = {"model": "tts-1", "input": "hi", "voice": "alloy", "max_semantic_tokens": 2}
TTS = {"text": "hi", "max_semantic_tokens": 2}
TTS_SCRIPT = {"max_semantic_tokens": 2}  # + "script"
MAX_TEXT, MAX_BODY, BATCH_MAX_BODY, BATCH_MAX_ITEMS = 4000, 2_000_000, 3_000_000, 50
GOOD_ITEM = {"id": "good", "text": "ok", "options": {"max_semantic_tokens": 2, "temperature": 0}}
BATCH_KEY = "hostile-corpus"
NORMAL_EVERY = 10  # a normal request after every tenth case (and after the last)


def dumps(obj) -> bytes:
    """JSON as Python writes it: NaN and Infinity as bare literals (which Python's json also reads)."""
    return json.dumps(obj).encode()


def nested(depth: int, leaf=1, kind=list):
    value = leaf
    for _ in range(depth):
        value = [value] if kind is list else {"a": value}
    return value


def raw_deep_msgpack(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # fixarray(1) ... nil: deeper than msgpack's own stack


def chunked(total: int, piece: int = 64 * 1024):
    """A body without Content-Length (chunked transfer), ``total`` bytes of JSON-ish filler."""
    def gen():
        yield b'{"text": "'
        sent = 0
        while sent < total:
            yield b"x" * piece
            sent += piece
        yield b'"}'
    return gen()


# -- the corpus ---------------------------------------------------------------------------------------------------
def field_cases(route: str, base: dict) -> list[tuple[str, dict]]:
    """Every field of the request model at its extremes (wrong types, null, huge, negative, NaN, ...)."""
    text_key = "input" if route == "speech" else "text"
    nan, inf = float("nan"), float("inf")
    bad: dict[str, list] = {
        text_key: [None, 1, 1.5, True, [], {}, ["a"], {"$gt": ""}, "", "   \n\t ", "\ud800", "a\udfffb",
                   "x" * (MAX_TEXT + 1), "x" * 150_000],
        "voice": [1, 1.5, True, ["a"], "nobody", "\x00", "v2/en_speaker_6\x00", "x" * 100_000, "x" * 257,
                  "../" * 60 + "etc/passwd", "/etc/passwd", "/work/shared/data/voices/v2/en_speaker_6.npz",
                  "v2/../../../../../etc/hosts", "\ud800", "~root", ".", "v2", "v2/en_speaker_6\n",
                  "é" * 200, {"id": 1}, {"id": None}, {"id": "alloy", "name": "x"}, {"id": "\x00"},
                  {"id": "x" * 100_000}, {"id": {"id": "alloy"}}, {"id": "nobody"}, {"id": "\ud800"},
                  {"id": "../" * 60 + "etc/passwd"}],
        "seed": [-1, 2**63, 2**70, -(2**70), 1.5, "seven", [], {}, nan, inf],
        "temperature": [nan, inf, -inf, -1, 101, 1e308, 2**70, "hot", [], {}],
        "semantic_temperature": [nan, inf, -0.5, "x"],
        "coarse_temperature": [nan, -inf, 1000, "x"],
        "fine_temperature": [nan, inf, -1e-9, [1]],
        "top_k": [0, -1, 2**70, 1.5, "k", nan],
        "top_p": [0, -0.1, 1.5, nan, inf, "p"],
        "min_eos_p": [0, -1, 2, nan, inf, -inf, "eos"],
        "max_semantic_tokens": [0, -1, 769, 2**70, 1.5, "many", nan],  # (null: the default)
        "unknown_field": [1],
        # output options (both routes): speed and the long-form joins
        "speed": [0, 0.1, 0.2499, 4.01, -1, nan, inf, -inf, 1e308, 2**70, "fast", [], {}],
        "trim_silence": ["maybe", 2, 0.5, [], {}],
        "trim_threshold_db": [0, 5, -101, nan, inf, "quiet"],
        "crossfade_ms": [-1, 501, nan, inf, 1e308, "long", [10]],
        "normalize_loudness": ["maybe", 2, [True]],
        "target_lufs": [0, -4, -71, nan, -inf, "loud"],
    }
    if route == "speech":
        bad.update({"model": [None, 1, "", "whisper-1", "x" * 100_000, "\x00", "\ud800"],
                    "response_format": ["ogg", "", "WAV", "m4a", 1, [], "\ud800"],  # (null: the default)
                    "stream_format": ["x", "SSE", "", 1, []],
                    "instructions": [1, "x" * 5000, "\ud800"]})
    else:
        bad.update({"format": ["ogg", "", "WAV", "m4a", 1, "\ud800"],  # (null: the default)
                    "stream": ["maybe", 2, [], {}],
                    "priority": ["urgent", 1, "BATCH"]})
    cases = []
    for key, values in bad.items():
        for i, value in enumerate(values):
            cases.append((f"{route}-{key}-{i}", {"content": dumps({**base, key: value}), "headers": JSON}))
    return cases


def voice_array_cases(base: dict) -> list[tuple[str, dict]]:
    """Inline voices (native API): ragged, deep, huge, NaN, out of range, wrong shapes."""
    good = {"semantic_prompt": [1, 2, 3], "coarse_prompt": [[1, 2], [3, 4]], "fine_prompt": [[0]] * 8}
    variants = {
        "ragged-semantic": {**good, "semantic_prompt": [1, [2, 3]]},
        "ragged-coarse": {**good, "coarse_prompt": [[1, 2], [3]]},
        "ragged-fine": {**good, "fine_prompt": [[0], [0, 1]] + [[0]] * 6},
        "deep-20": {**good, "semantic_prompt": nested(20)},
        "deep-40": {**good, "semantic_prompt": nested(40)},
        "deep-dict-40": {**good, "semantic_prompt": nested(40, kind=dict)},
        "huge-int": {**good, "semantic_prompt": [1, 2**70]},
        "nan": {**good, "semantic_prompt": [1.0, float("nan")]},
        "inf": {**good, "coarse_prompt": [[1, float("inf")], [3, 4]]},
        "floats": {**good, "semantic_prompt": [1.5, 2.5]},
        "strings": {**good, "semantic_prompt": ["a", "b"]},
        "bools": {**good, "semantic_prompt": [True, False]},
        "nulls": {**good, "semantic_prompt": [None, None]},
        "negative": {**good, "semantic_prompt": [-1, 2]},
        "out-of-vocab": {**good, "coarse_prompt": [[1, 2], [3, 10**6]]},
        "too-long": {**good, "semantic_prompt": [1] * 9000},
        "empty": {**good, "semantic_prompt": []},
        "empty-rows": {**good, "coarse_prompt": [[], []]},
        "3-rows": {**good, "coarse_prompt": [[1, 2]] * 3},
        "scalar": {**good, "semantic_prompt": 5},
        "missing": {"semantic_prompt": [1, 2, 3]},
        "empty-dict": {},
        "surrogate-key": {**good, "\ud800": 1},
        "list-voice": [1, 2, 3],
    }
    return [(f"tts-voice-{name}", {"content": dumps({**base, "voice": v}), "headers": JSON})
            for name, v in variants.items()]


def script_cases() -> list[tuple[str, dict]]:
    """Multi-speaker scripts (native API): wrong shapes, empty or blank lines, unknown voices, too many lines or
    characters, deep nesting, text and script together."""
    line = {"voice": "alloy", "text": "hi"}
    variants = {
        "empty": [], "string": "alloy: hi", "number": 1, "object": line, "null-line": [None],
        "empty-line": [{}], "no-text": [{"voice": "alloy"}], "no-voice": [{"text": "hi"}],
        "empty-text": [{"voice": "alloy", "text": ""}], "blank-text": [line, {"voice": "echo", "text": " \n "}],
        "unknown-voice": [line, {"voice": "nobody", "text": "hi"}],
        "path-voice": [{"voice": "/etc/passwd", "text": "a"}],
        "nul-voice": [{"voice": "alloy\x00", "text": "hi"}], "surrogate-voice": [{"voice": "\ud800", "text": "hi"}],
        "surrogate-text": [{"voice": "alloy", "text": "a\udfffb"}],
        "long-voice": [{"voice": "x" * 100_000, "text": "a"}],
        "voice-list": [{"voice": ["alloy"], "text": "hi"}], "voice-id-int": [{"voice": {"id": 5}, "text": "hi"}],
        "voice-arrays": [{"voice": {"semantic_prompt": [1, 2]}, "text": "hi"}],
        "text-list": [{"voice": "alloy", "text": ["hi"]}], "extra-key": [{**line, "speed": 2}],
        "pairs": [["alloy", "hi"]], "too-many-lines": [line] * 1001,
        "too-long-line": [{"voice": "alloy", "text": "x" * (MAX_TEXT + 1)}],
        "too-long-total": [{"voice": "alloy", "text": "x" * (MAX_TEXT // 2)}] * 3,
        "deep-40": nested(40), "deep-text-40": [{"voice": "alloy", "text": nested(40)}],
    }
    cases = [(f"tts-script-{name}", {"content": dumps({**TTS_SCRIPT, "script": v}), "headers": JSON})
             for name, v in variants.items()]
    cases.append(("tts-script-and-text", {"content": dumps({**TTS, "script": [line]}), "headers": JSON}))
    cases.append(("tts-script-and-voice", {"content": dumps({**TTS_SCRIPT, "script": [line], "voice": "echo"}),
                                           "headers": JSON}))
    cases.append(("tts-script-msgpack-ext", {"content": msgpack.packb({**TTS_SCRIPT, "script": [
        {"voice": msgpack.ExtType(5, b"x"), "text": "hi"}]}), "headers": MSGPACK}))
    return cases


def body_cases(route: str, path_base: dict) -> list[tuple[str, dict]]:
    """Whole bodies: not objects, not JSON, deep, huge, every content type, msgpack oddities, auth."""
    good = dumps(path_base)
    ext = msgpack.packb({**path_base, "voice": msgpack.ExtType(5, b"x")})
    ts = msgpack.packb({**path_base, "voice": msgpack.Timestamp(1)}, datetime=False)
    text_key = "input" if route == "speech" else "text"
    bodies = {
        "empty": (b"", JSON), "null": (b"null", JSON), "array": (b"[]", JSON), "number": (b"1", JSON),
        "string": (b'"hi"', JSON), "true": (b"true", JSON), "broken": (b"{", JSON),
        "trailing": (good + b"}", JSON), "invalid-utf8": (b'{"text": "\xff\xfe"}', JSON),
        "nul-bytes": (b"\x00" * 100, JSON), "nan-body": (b"NaN", JSON),
        "deep-list-100k": (b"[" * 100_000 + b"]" * 100_000, JSON),
        "deep-dict-5k": (b'{"a":' * 5000 + b"1" + b"}" * 5000, JSON),
        "deep-field-50": (dumps({**path_base, "options": nested(50)}), JSON),
        "unknown-keys-150k": (dumps({**path_base, **{f"k{i}": 0 for i in range(150_000)}}), JSON),
        "text-plain": (good, {**AUTH, "Content-Type": "text/plain"}),
        "form": (b"text=hi", {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}),
        "multipart": (b"--x\r\n\r\n--x--", {**AUTH, "Content-Type": "multipart/form-data; boundary=x"}),
        "xml": (b"<text>hi</text>", {**AUTH, "Content-Type": "application/xml"}),
        "no-type-broken": (b"{", AUTH),
        "no-type-array": (b"[1]", AUTH),
        "json-as-msgpack": (good, MSGPACK),
        "msgpack-as-json": (msgpack.packb(path_base), JSON),
        "msgpack-deep-5000": (raw_deep_msgpack(5000), MSGPACK),
        "msgpack-deep-100": (msgpack.packb({**path_base, "options": nested(100)}), MSGPACK),
        "msgpack-ext": (ext, MSGPACK),
        "msgpack-timestamp": (ts, MSGPACK),
        "msgpack-int-key": (b"\x81\x01\xa1x", MSGPACK),
        "msgpack-bad-utf8": (b"\x81\xa4text\xa3\xed\xa0\x80", MSGPACK),
        "msgpack-bin-not-utf8": (msgpack.packb({**path_base, text_key: b"\xff\xfe"}, use_bin_type=True), MSGPACK),
        "msgpack-array": (msgpack.packb([1, 2]), MSGPACK),
        "msgpack-truncated": (msgpack.packb(path_base)[:-3], MSGPACK),
        "msgpack-nan": (msgpack.packb({**path_base, "temperature": float("nan")}), MSGPACK),
        "oversize-declared": (b"x" * (MAX_BODY + 1), JSON),
    }
    cases = [(f"{route}-body-{name}", {"content": body, "headers": headers})
             for name, (body, headers) in bodies.items()]
    cases.append((f"{route}-body-oversize-chunked", {"content": "chunked", "headers": JSON}))
    for name, auth in {"none": None, "wrong": "Bearer wrong", "basic": "Basic dGVzdA==", "empty-bearer": "Bearer",
                       "non-ascii": "Bearer tëst-kéy".encode("latin-1"), "non-utf8": b"Bearer \xff\xfe\xfd",
                       "huge": "Bearer " + "k" * 6000}.items():
        headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth is not None else {})}
        cases.append((f"{route}-auth-{name}", {"content": good, "headers": headers}))
    return cases


def route_cases() -> list[tuple[str, str, str, dict]]:
    """Unknown routes and wrong methods: FastAPI's own 404/405 must come in our error shape."""
    job = "b_" + "0" * 32
    wrong = [("GET", "/v1/tts"), ("PUT", "/v1/tts"), ("DELETE", "/v1/audio/speech"), ("GET", "/nope"),
             ("POST", "/v1"), ("GET", "/v1/voices/x"), ("PUT", "/v1/batches"), ("PATCH", f"/v1/batches/{job}"),
             ("GET", f"/v1/batches/{job}/nope"), ("POST", "/healthz"), ("GET", "/v1/" + "x" * 3000),
             # a trailing slash: a JSON 404, never a 307 to the client's Host header
             ("GET", f"/v1/batches/{job}/"), ("GET", "/v1/voices/"), ("GET", "/v1/voices/x/npz/"),
             ("POST", "/v1/audio/speech/"), ("GET", "/v1/models/")]
    evil = {"headers": {**AUTH, "Host": "evil.example"}}
    return [(f"route-{m}-{p[:30]}", m, p, evil if p.endswith("/") else {"headers": AUTH}) for m, p in wrong]


def batch_body_cases() -> list[tuple[str, dict]]:
    """Submissions refused as a whole: unreadable, wrong type, too big, unusable ids, bad keys/auth."""
    ok = dumps(GOOD_ITEM)
    items = {
        "text-plain": (ok, {**AUTH, "Content-Type": "text/plain"}),
        "json-type": (ok, JSON),
        "no-type": (ok, AUTH),
        "form": (b"text=hi", {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}),
        "empty": (b"", JSONL), "blank-lines": (b"\n\n\n", JSONL),
        "duplicate-ids": (dumps({"id": "d", "text": "a"}) + b"\n" + dumps({"id": "d", "text": "b"}), JSONL),
        "id-slash": (dumps({"id": "a/b", "text": "a"}), JSONL),
        "id-surrogate": (dumps({"id": "\ud800", "text": "a"}), JSONL),
        "id-bool": (dumps({"id": True, "text": "a"}), JSONL),
        "id-list": (dumps({"id": [], "text": "a"}), JSONL),
        "id-long": (dumps({"id": "x" * 200, "text": "a"}), JSONL),
        "id-nul": (dumps({"id": "a\x00", "text": "a"}), JSONL),
        "invalid-utf8": (b'{"text": "\xff"}', JSONL),
        "msgpack-map": (msgpack.packb(GOOD_ITEM), MSGPACK),
        "msgpack-garbage": (b"\xc1\xff\x00", MSGPACK),
        "msgpack-deep-5000": (raw_deep_msgpack(5000), MSGPACK),
        "msgpack-bad-utf8": (b"\x91\x81\xa4text\xa3\xed\xa0\x80", MSGPACK),
        "too-many-items": (b"\n".join(dumps({"text": f"t{i}"}) for i in range(BATCH_MAX_ITEMS + 1)), JSONL),
        "oversize-declared": (b"x" * (BATCH_MAX_BODY + 1), JSONL),
    }
    cases = [(f"batch-body-{name}", {"content": body, "headers": headers}) for name, (body, headers) in items.items()]
    cases.append(("batch-body-oversize-chunked", {"content": "chunked", "headers": JSONL}))
    for name, key in {"space": "has space", "long": "k" * 300, "non-ascii": "kéy".encode("latin-1"),
                      "control": "a\tb"}.items():
        cases.append((f"batch-key-{name}", {"content": ok, "headers": {**JSONL, "Idempotency-Key": key}}))
    for name, auth in {"none": None, "wrong": "Bearer nope", "non-ascii": "Bearer ünïcode".encode("latin-1")}.items():
        headers = {"Content-Type": "application/jsonl", **({"Authorization": auth} if auth is not None else {})}
        cases.append((f"batch-auth-{name}", {"content": ok, "headers": headers}))
    return cases


def batch_item_cases() -> list[tuple[str, object, str]]:
    """Items that must fail alone: (name, the item (dict, or a raw JSONL line as bytes), encoding)."""
    nan, inf = float("nan"), float("inf")
    items: dict[str, object] = {
        "text-null": {"text": None}, "text-int": {"text": 1}, "text-empty": {"text": ""}, "text-blank": {"text": "  "},
        "text-surrogate": {"text": "\ud800"}, "text-long": {"text": "x" * (MAX_TEXT + 1)}, "text-list": {"text": []},
        "text-missing": {}, "voice-int": {"text": "a", "voice": 1}, "voice-long": {"text": "a", "voice": "x" * 100_000},
        "voice-surrogate": {"text": "a", "voice": "\ud800"}, "voice-dict": {"text": "a", "voice": {"x": 1}},
        "seed-negative": {"text": "a", "seed": -1}, "seed-huge": {"text": "a", "seed": 2**70},
        "seed-str": {"text": "a", "seed": "x"}, "seed-nan": {"text": "a", "seed": nan},
        "format-ogg": {"text": "a", "format": "ogg"}, "format-list": {"text": "a", "format": ["wav"]},
        "format-m4a": {"text": "a", "format": "m4a"}, "options-speed-nan": {"text": "a", "options": {"speed": nan}},
        "options-speed-zero": {"text": "a", "options": {"speed": 0}},
        "options-speed-huge": {"text": "a", "options": {"speed": 1e308}},
        "options-crossfade-str": {"text": "a", "options": {"crossfade_ms": "x"}},
        "options-lufs-inf": {"text": "a", "options": {"target_lufs": -inf}},
        "options-list": {"text": "a", "options": []}, "options-str": {"text": "a", "options": "x"},
        "options-nan": {"text": "a", "options": {"temperature": nan}},
        "options-inf": {"text": "a", "options": {"min_eos_p": inf}},
        "options-negative": {"text": "a", "options": {"temperature": -1}},
        "options-type": {"text": "a", "options": {"temperature": "hot"}},
        "options-unknown": {"text": "a", "options": {"unknown": 1}},
        "options-150k": {"text": "a", "options": {f"k{i}": 0 for i in range(150_000)}},
        "options-repeat-text": {"text": "a", "options": {"text": "b"}},
        "options-priority": {"text": "a", "options": {"priority": "interactive"}},
        "options-stream-bad": {"text": "a", "options": {"stream": "maybe"}},
        "options-huge-int": {"text": "a", "options": {"max_semantic_tokens": 2**70}},
        "options-deep-40": {"text": "a", "options": {"x": nested(40)}},
        "options-surrogate-key": {"text": "a", "options": {"\ud800": 1}},
        "unknown-key": {"text": "a", "speed": 2},
        "voice-id-int": {"text": "a", "voice": {"id": 1}},
        "voice-id-extra": {"text": "a", "voice": {"id": "a", "b": 1}},
        "script-empty": {"script": []}, "script-string": {"script": "a: hi"},
        "script-blank-line": {"script": [{"voice": "alloy", "text": "hi"}, {"voice": "echo", "text": "  "}]},
        "script-and-text": {"text": "a", "script": [{"voice": "alloy", "text": "hi"}]},
        "script-and-voice": {"voice": "echo", "script": [{"voice": "alloy", "text": "hi"}]},
        "script-extra-key": {"script": [{"voice": "alloy", "text": "hi", "speed": 2}]},
        "script-voice-int": {"script": [{"voice": 6, "text": "hi"}]},
        "script-too-many-lines": {"script": [{"voice": "alloy", "text": "hi"}] * 1001},
        "script-too-long": {"script": [{"voice": "alloy", "text": "x" * (MAX_TEXT // 2)}] * 3},
        "script-deep-40": {"script": nested(40)},
        "script-surrogate": {"script": [{"voice": "alloy", "text": "\ud800"}]},
        "options-script": {"text": "a", "options": {"script": [{"voice": "alloy", "text": "hi"}]}},
        "no-text-no-script": {"voice": "alloy"},
        "unknown-keys-150k": {"text": "a", **{f"k{i}": 0 for i in range(150_000)}},
        "line-broken": b"{",
        "line-deep-100k": b"[" * 100_000 + b"]" * 100_000,
        "line-string": b'"just a string"', "line-number": b"5", "line-null": b"null", "line-list": b"[1, 2]",
        "line-nan": b"NaN",
    }
    cases = [(name, item, "jsonl") for name, item in items.items()]
    cases += [("msgpack-ext", {"text": "a", "options": {"x": msgpack.ExtType(1, b"")}}, "msgpack"),
              ("msgpack-timestamp", {"text": msgpack.Timestamp(5)}, "msgpack"),
              ("msgpack-not-map", [1, 2], "msgpack"),
              ("msgpack-nan", {"text": "a", "options": {"temperature": nan}}, "msgpack")]
    return cases


def results_query_cases() -> list[str]:
    """Query strings of GET /v1/batches/{job}/results that must be refused."""
    return ["wait_s=nan", "wait_s=NaN", "wait_s=inf", "wait_s=-inf", "wait_s=-1", "wait_s=abc", "wait_s=1e999",
            "limit=-1", "limit=x", "limit=1.5", "after=abc", "after=-1", "after=5-", "after=" + "9" * 30,
            "after=18446744073709551616-0", "after=1-2-3",
            "after=18446744073709551615-18446744073709551615"]  # the largest id: nothing is after it


HTTP_CASES = ([("POST", "/v1/audio/speech", *c) for c in field_cases("speech", SPEECH)]
              + [("POST", "/v1/tts", *c) for c in field_cases("tts", TTS)]
              + [("POST", "/v1/tts", *c) for c in voice_array_cases(TTS)]
              + [("POST", "/v1/tts", *c) for c in script_cases()]
              + [("POST", "/v1/audio/speech", *c) for c in body_cases("speech", SPEECH)]
              + [("POST", "/v1/tts", *c) for c in body_cases("tts", TTS)]
              + [(m, p, name, kw) for name, m, p, kw in route_cases()]
              + [("POST", "/v1/batches", *c) for c in batch_body_cases()])
ITEM_CASES = batch_item_cases()
QUERY_CASES = results_query_cases()
CORPUS_SIZE = len(HTTP_CASES) + len(ITEM_CASES) + len(QUERY_CASES)


# -- the app --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(tiny_ckpt, preset_dir, redis_srv):
    """The app with API keys, a voices_dir (file-system lookups) and batch jobs on a real Redis."""
    raw = e2e_config(str(tiny_ckpt), free_port(), voices_dir=str(preset_dir))
    raw["orchestrator"].update(max_body_bytes=MAX_BODY, max_text_chars=MAX_TEXT)
    raw["batch"] = {"enabled": True, "redis_url": redis_srv.url, "max_items": BATCH_MAX_ITEMS,
                    "max_body_bytes": BATCH_MAX_BODY, "worker": {"num_replicas": 1, "num_cpus": 0.1}}
    with running_app(raw) as url:
        assert speak(url).status_code == 200
        yield {"url": url, "pids": replica_pids(), "cases": 0}


def send(url: str, method: str, path: str, kwargs: dict) -> httpx.Response:
    kwargs = dict(kwargs)
    if kwargs.get("content") == "chunked":
        limit = BATCH_MAX_BODY if path == "/v1/batches" else MAX_BODY
        kwargs["content"] = chunked(limit + 512 * 1024)
    return httpx.request(method, url + path, timeout=60, **kwargs)


def cancel(url: str, job_id: str) -> None:
    assert httpx.delete(f"{url}/v1/batches/{job_id}", headers=AUTH, timeout=30).status_code == 200


def check_still_serving(app: dict, context: str) -> None:
    """Same replica processes, no slot left taken, and (every few cases) a normal request still answered."""
    assert replica_pids() == app["pids"], f"{context}: a replica was replaced"
    stats = orchestrator_stats()
    deadline = time.time() + 5
    while stats["active"] and time.time() < deadline:
        time.sleep(0.05)
        stats = orchestrator_stats()
    assert stats["active"] == 0, f"{context}: {stats['active']} admission slots still taken"
    app["cases"] += 1
    if app["cases"] % NORMAL_EVERY == 0:
        r = speak(app["url"])
        assert r.status_code == 200 and r.content[:4] == b"RIFF", f"{context}: normal request got {r.status_code}"


# -- the tests ---------------------------------------------------------------------------------------------------
def test_the_corpus_is_wide():
    assert CORPUS_SIZE >= 100, CORPUS_SIZE
    print(f"hostile corpus: {len(HTTP_CASES)} HTTP cases, {len(ITEM_CASES)} batch items, {len(QUERY_CASES)} queries")


@pytest.mark.parametrize("method,path,name,kwargs", HTTP_CASES, ids=[c[2] for c in HTTP_CASES])
def test_bad_request_gets_a_small_4xx_json_error(app, method, path, name, kwargs):
    resp = send(app["url"], method, path, kwargs)
    assert_error_shape(resp, name)
    check_still_serving(app, name)


@pytest.mark.parametrize("name,item,encoding", ITEM_CASES, ids=[c[0] for c in ITEM_CASES])
def test_bad_batch_item_fails_alone(app, name, item, encoding):
    bad_id = f"bad-{name}"
    if encoding == "msgpack":
        if isinstance(item, dict):
            item = {"id": bad_id, **item}
        body, headers = msgpack.packb([GOOD_ITEM, item], datetime=False), MSGPACK
    else:
        line = item if isinstance(item, bytes) else dumps({"id": bad_id, **item})
        body, headers = dumps(GOOD_ITEM) + b"\n" + line, JSONL
    resp = httpx.post(app["url"] + "/v1/batches", content=body, timeout=60,
                      headers={**headers, "Idempotency-Key": f"{BATCH_KEY}-{name}"})
    assert resp.status_code == 202, f"{name}: {resp.status_code} {resp.text[:300]}"
    assert len(resp.content) < MAX_ERROR_BYTES
    job = resp.json()
    assert job["invalid"] == 1 and job["added"] == 1, f"{name}: {job}"
    app.setdefault("jobs", []).append(job["id"])
    cancel(app["url"], job["id"])  # the good item need not run: the point is what was accepted
    check_still_serving(app, name)


@pytest.mark.parametrize("query", QUERY_CASES)
def test_bad_results_query_is_refused(app, query):
    job = app.setdefault("query_job", None)
    if job is None:
        body = dumps({"id": "q", "text": "a", "options": {"max_semantic_tokens": 2}})
        job = app["query_job"] = httpx.post(app["url"] + "/v1/batches", content=body, headers=JSONL,
                                            timeout=60).json()["id"]
        cancel(app["url"], job)
    resp = httpx.get(f"{app['url']}/v1/batches/{job}/results?{query}", headers=AUTH, timeout=10)
    err = assert_error_shape(resp, query)
    assert resp.status_code == 400 and err["code"] in ("invalid_parameter", "invalid_cursor")
    check_still_serving(app, query)


def test_failed_items_carry_short_errors(app):
    """The results of the bad items: each failed, with a bounded message (150k unknown keys included)."""
    assert len(app.get("jobs", [])) == len(ITEM_CASES), "runs after test_bad_batch_item_fails_alone, in this module"
    for job_id in app.get("jobs", []):
        r = httpx.get(f"{app['url']}/v1/batches/{job_id}/results", headers=AUTH, timeout=60)
        records = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        failed = [rec for rec in records if rec.get("state") == "failed"]
        assert len(failed) == 1, records[:3]
        assert len(failed[0]["error"]["message"]) <= 600 and failed[0]["error"]["type"] == "invalid_item"


def test_voice_names_reach_the_file_system_safely_through_the_handle(app):
    """The Python handle API skips the HTTP models: the voice library itself refuses NUL and huge names."""
    from ray import serve

    handle = serve.get_app_handle("bark")
    for voice in ("x" * 100_000, "v2/en_speaker_6\x00", "\ud800", "../" * 80 + "etc/passwd"):
        # the library's own refusal (Ray's error is an instance of its cause), not whatever crashed on the way
        with pytest.raises(InvalidRequestError) as info:
            handle.synthesize.remote("hi", voice=voice, max_semantic_tokens=2).result(timeout_s=60)
        message = str(getattr(info.value, "cause", info.value))  # the refusal's own message: one line on the voice
        assert "voice" in message and "\n" not in message and len(message) < 600, message[:600]
        assert len(str(info.value)) < 20_000
    assert replica_pids() == app["pids"] and orchestrator_stats()["active"] == 0


def test_errors_of_unknown_routes_and_request_ids(app):
    url = app["url"]
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.json()["routes"]["tts"] == "/v1/tts" and r.json()["docs"] == "/docs"
    r = speak(url)
    ids = [v for k, v in r.headers.multi_items() if k.lower() == "x-request-id"]
    assert len(ids) == 1  # Ray Serve's own; ours is X-Bark-Request-Id
    assert len(r.headers["x-bark-request-id"]) == 32


def test_voice_library_refuses_names_the_file_system_would_choke_on(tiny_ckpt, preset_dir):
    """No Ray: NUL, 100k characters, a 400-byte path component, loops out of the directory."""
    from bark_serve.stages.voices import UnknownVoiceError, VoiceLibrary
    from bark_serve.stages.weights import Checkpoint

    ckpt = Checkpoint.open(tiny_ckpt)
    lib = VoiceLibrary(ckpt.spec, ckpt, [preset_dir])
    for name in ("x" * 100_000, "v2/en_speaker_6\x00", "é" * 200, "../" * 80 + "etc/passwd", "\ud800", "v2/\n"):
        with pytest.raises(UnknownVoiceError) as info:
            lib.resolve(name)
        assert len(str(info.value)) < 1000
    assert lib.resolve("./v2/en_speaker_6").name == "v2/en_speaker_6"


def test_the_same_replicas_serve_after_the_corpus(app):
    r = speak(app["url"], voice="v2/en_speaker_6")
    assert r.status_code == 200 and r.content[:4] == b"RIFF"
    assert replica_pids() == app["pids"]
    ready = httpx.get(app["url"] + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["active_requests"] == 0
    print(f"hostile corpus: {CORPUS_SIZE} cases, {len(app['pids'])} replicas unchanged")
