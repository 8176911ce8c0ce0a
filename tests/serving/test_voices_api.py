"""Voice cloning served (issue 23), against the real app (Ray, Serve, HTTP, the VoiceEncoder deployment, the
voice store in a folder), on the tiny checkpoint and its random cloning weights (make_checkpoint writes them
under voice_cloning/).

A voice cloned from audio the server made, used by name, gives the same audio as its arrays sent inline;
voices belong to the key that made them; names are unique per key and never shadow a preset or an alias;
a per-key quota; every bad upload is a 4xx JSON that stores nothing and leaves every replica alive.
"""

from __future__ import annotations

import concurrent.futures
import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from bark_serve.cluster.ports import free_port
from tests.serving.conftest import API_KEY, e2e_config
from tests.serving.e2e_helpers import assert_error_shape, replica_pids

pytestmark = pytest.mark.slow
A = {"Authorization": f"Bearer {API_KEY}"}
B = {"Authorization": "Bearer second-key"}
QUOTA = 4
MAX_AUDIO_S = 20.0
MAX_UPLOAD = 600_000
GREEDY = {"temperature": 0, "min_eos_p": None, "trim_silence": False, "crossfade_ms": 0, "normalize_loudness": False}


@pytest.fixture(scope="module")
def app(tiny_ckpt, tmp_path_factory):
    from tests.serving.e2e_helpers import running_app

    store = tmp_path_factory.mktemp("voices")
    cloning = {"num_cpus": 0.1, "store_dir": str(store), "max_voices_per_key": QUOTA, "max_audio_s": MAX_AUDIO_S,
               "max_upload_bytes": MAX_UPLOAD, "max_batch": 4}
    with running_app(e2e_config(str(tiny_ckpt), free_port(), voice_cloning=cloning)) as url:
        yield {"url": url, "store": store, "pids": replica_pids()}


def wav(audio: np.ndarray, sr: int = 24_000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def tones(seconds: float, sr: int = 24_000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 347 * t)
    mono += 0.05 * np.random.default_rng(0).standard_normal(len(t))
    return mono.astype(np.float32) if channels == 1 else np.stack([mono] * channels, axis=1).astype(np.float32)


def add(url: str, data: bytes, name: str, headers=A, filename: str = "clip.wav") -> httpx.Response:
    return httpx.post(url + "/v1/voices", files={"file": (filename, data, "audio/wav")}, data={"name": name},
                      headers=headers, timeout=300)


def custom(url: str, headers=A) -> list[dict]:
    r = httpx.get(url + "/v1/voices", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["custom"]


def tts(url: str, voice, text: str = "Spoken by a cloned voice.", headers=A, **extra) -> httpx.Response:
    body = {"text": text, "voice": voice, "max_semantic_tokens": 16, "format": "wav", **GREEDY, **extra}
    return httpx.post(url + "/v1/tts", json=body, headers=headers, timeout=300)


def delete_all(url: str, headers=A) -> None:
    for v in custom(url, headers):
        assert httpx.delete(f"{url}/v1/voices/{v['id']}", headers=headers, timeout=30).status_code == 200


def test_a_voice_cloned_from_the_servers_audio_speaks_as_its_arrays_do(app):
    url = app["url"]
    made = tts(url, "v2/en_speaker_6", "Some audio of the server's own, to clone.", max_semantic_tokens=120)
    assert made.status_code == 200, made.text
    r = add(url, made.content, "narrator")
    assert r.status_code == 201, r.text
    voice = r.json()
    assert voice["object"] == "voice" and voice["name"] == "narrator" and voice["id"].startswith("voice_")
    assert voice["duration_s"] == pytest.approx(sf.info(io.BytesIO(made.content)).duration, abs=0.01)
    assert "owner" not in voice
    assert [v["id"] for v in custom(url)] == [voice["id"]]
    assert httpx.get(f"{url}/v1/voices/narrator", headers=A).json() == voice  # by name, and by id:
    assert httpx.get(f"{url}/v1/voices/{voice['id']}", headers=A).json() == voice

    npz = httpx.get(f"{url}/v1/voices/{voice['id']}/npz", headers=A)
    assert npz.status_code == 200 and npz.headers["content-type"] == "application/octet-stream"
    arrays = dict(np.load(io.BytesIO(npz.content), allow_pickle=False))
    assert set(arrays) == {"semantic_prompt", "coarse_prompt", "fine_prompt"}
    assert arrays["coarse_prompt"].shape[0] == 2 and arrays["fine_prompt"].shape[0] == 8
    inline = {k: v.tolist() for k, v in arrays.items()}

    by_arrays = tts(url, inline)
    assert by_arrays.status_code == 200, by_arrays.text
    for name in ("narrator", voice["id"]):  # the same audio, to the byte, by name or id as by its arrays
        assert tts(url, name).content == by_arrays.content
    # and through OpenAI's API and in a script, beside a preset
    speech = httpx.post(url + "/v1/audio/speech", headers=A, timeout=300, json={
        "model": "tts-1", "input": "Spoken by a cloned voice.", "voice": "narrator", "response_format": "wav",
        "max_semantic_tokens": 16, **GREEDY})
    # (it streams: its WAV header says "unknown length"; the samples after the 44-byte header are the same)
    assert speech.status_code == 200 and speech.content[44:] == by_arrays.content[44:]
    script = [{"voice": "narrator", "text": "One line."}, {"voice": "alloy", "text": "Another."}]
    r = httpx.post(url + "/v1/tts", headers=A, timeout=300,
                   json={"script": script, "max_semantic_tokens": 8, "format": "wav", **GREEDY})
    assert r.status_code == 200, r.text


def test_a_voice_belongs_to_the_key_that_made_it(app):
    url = app["url"]
    delete_all(url)
    r = add(url, wav(tones(2.0)), "mine")
    assert r.status_code == 201, r.text
    vid = r.json()["id"]
    assert custom(url, B) == []
    for path in (f"/v1/voices/{vid}", f"/v1/voices/{vid}/npz", "/v1/voices/mine", "/v1/voices/mine/npz"):
        other = httpx.get(url + path, headers=B)
        assert other.status_code == 404 and other.json()["error"]["code"] == "voice_not_found", path
    assert httpx.delete(f"{url}/v1/voices/{vid}", headers=B).status_code == 404
    used = tts(url, "mine", headers=B)
    assert used.status_code == 400 and used.json()["error"]["code"] == "voice_not_found", used.text
    assert tts(url, vid, headers=B).status_code == 400
    # B may take the same name for a voice of its own
    assert add(url, wav(tones(2.0)), "mine", headers=B).status_code == 201
    assert [v["id"] for v in custom(url)] == [vid]  # A's is untouched
    assert httpx.post(url + "/v1/voices", files={"file": ("a.wav", wav(tones(2.0)))}, data={"name": "x"}).status_code \
        == 401
    delete_all(url, B)


def test_names_are_unique_per_key_and_never_shadow_a_preset_or_an_alias(app):
    url = app["url"]
    delete_all(url)
    clip = wav(tones(1.5))
    for taken in ("alloy", "announcer"):  # an alias, a preset of the checkpoint
        r = add(url, clip, taken)
        assert r.status_code == 409 and r.json()["error"]["code"] == "voice_name_taken", r.text
    for bad in ("v2/en_speaker_6", "../etc", "a\x00b", "x" * 65, " lead", "voice_abc", ""):
        r = add(url, clip, bad)
        assert r.status_code in (400, 422), (bad, r.status_code, r.text)
        assert_error_shape(r)
    # concurrent adds of one name: exactly one wins, the others are told the name is taken
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: add(url, clip, "twin").status_code, range(6)))
    assert sorted(answers) == [201] + [409] * 5, answers
    assert [v["name"] for v in custom(url)] == ["twin"]
    assert add(url, clip, "twin").status_code == 409


def test_a_key_holds_at_most_its_quota_of_voices(app):
    url = app["url"]
    delete_all(url)
    clip = wav(tones(1.5))
    for i in range(QUOTA):
        assert add(url, clip, f"v{i}").status_code == 201
    r = add(url, clip, "one-too-many")
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded", r.text
    assert httpx.delete(f"{url}/v1/voices/v0", headers=A).json()["deleted"] is True
    assert add(url, clip, "one-too-many").status_code == 201
    assert len(custom(url)) == QUOTA
    delete_all(url)


def _nan_clip() -> bytes:
    audio = tones(2.0)
    audio[1000] = np.nan
    return wav(audio, subtype="FLOAT")


BAD_UPLOADS = {
    "not audio": (b"this is not audio at all" * 40, 400),
    "empty": (b"", 400),
    "under 1 s": (wav(tones(0.5)), 400),
    "silent": (wav(np.zeros(48_000, np.float32)), 400),
    "over the length limit": (wav(tones(MAX_AUDIO_S + 5, sr=16_000), sr=16_000, subtype="PCM_U8"), 400),
    "8 channels": (wav(tones(1.5, channels=8)), 400),
    "8 kHz": (wav(tones(2.0, sr=8_000), sr=8_000), 400),
    "192 kHz": (wav(tones(1.2, sr=192_000), sr=192_000), 400),
    "NaN samples": (_nan_clip(), 400),
    "over the size limit": (wav(tones(14.0)), 413),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_is_refused_with_a_json_message_and_stores_nothing(app, case):
    url = app["url"]
    data, status = BAD_UPLOADS[case]
    before = custom(url)
    r = add(url, data, f"bad {case.split()[0]}")
    assert r.status_code == status, (case, r.status_code, r.text)
    assert_error_shape(r)
    assert len(r.json()["error"]["message"]) < 600 and "Traceback" not in r.text
    assert custom(url) == before
    assert replica_pids() == app["pids"]  # no replica died


def test_malformed_forms_are_refused(app):
    url = app["url"]
    before = custom(url)
    no_file = httpx.post(url + "/v1/voices", data={"name": "x"}, headers=A, files={"other": ("a", b"1")})
    assert no_file.status_code == 422 and "file" in no_file.json()["error"]["message"]
    no_name = httpx.post(url + "/v1/voices", files={"file": ("a.wav", wav(tones(2.0)))}, headers=A)
    assert no_name.status_code == 422 and "name" in no_name.json()["error"]["message"]
    as_json = httpx.post(url + "/v1/voices", json={"name": "x", "file": "AAAA"}, headers=A)
    assert as_json.status_code == 415
    garbled = httpx.post(url + "/v1/voices", content=b"--xyz\r\nnot a form", headers={
        **A, "content-type": "multipart/form-data; boundary=xyz"})
    assert 400 <= garbled.status_code < 500, garbled.text
    assert custom(url) == before and replica_pids() == app["pids"]
