"""The web playground (serving/static/, GET /playground/) in a real headless browser against the real app.

Chromium comes from the distribution's packages (Debian: `apt-get install chromium`, as .ci/run does) and
Playwright drives it through ``executable_path``: no browser is ever downloaded. Without Chromium or
Playwright the tests skip locally, and fail in CI (CI=true), where .ci/run installs both.

First the app without API keys (the page's own flows), then one that clones voices (tiny random HuBERT and
quantizer: "Your voice", an upload or a recording from Chromium's fake microphone), then the app of
tests/serving/conftest.py (API keys on: the key field). No two run at once: the first two fixtures are
class-scoped, and the module-scoped one is first asked for by the last test.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from bark_serve.cluster.ports import free_port
from tests.serving.conftest import API_KEY, e2e_config

pytestmark = pytest.mark.slow
TEXT = "One sentence to start. Then a second sentence, which is here. And a third."
SEEDED = {"voice": "alloy", "seed": 7, "temperature": 0.6, "max_semantic_tokens": 40}  # 3 short segments


def chromium() -> str:
    """The system Chromium for Playwright; skips (fails in CI) when it or Playwright is missing."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        reason = ("the playground tests need Chromium from the distribution (apt-get install chromium) and the "
                  "playwright package (pip install -e '.[test]'); .ci/run installs both")
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing in CI: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # root in a container has no user namespaces for Chromium's sandbox; the page is our own. The fake
        # media flags give getUserMedia a microphone (a beeping test signal) without asking: "Record"
        b = pw.chromium.launch(executable_path=path, args=["--autoplay-policy=no-user-gesture-required",
                                                           "--use-fake-ui-for-media-stream",
                                                           "--use-fake-device-for-media-stream"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 960, "height": 1000})
    p = context.new_page()
    yield p
    context.close()


def open_playground(page, url: str):
    page.goto(url + "/")  # a browser asks / for text/html: it is sent on to the playground
    assert page.url == url + "/playground/"
    page.wait_for_function("window.playground && (window.playground.voicesLoaded || "
                           "!document.getElementById('error').hidden)")


def generate(page, timeout_ms: int = 120_000) -> dict:
    page.evaluate("window.playground.last = null")
    page.click("#generate")
    page.wait_for_function("window.playground.last !== null", timeout=timeout_ms)
    return page.evaluate("window.playground.last")


def audio_element(page) -> tuple[float, bytes]:
    """The <audio> element's duration once it has loaded, and its bytes (what the user would download)."""
    duration = page.evaluate("""() => new Promise((resolve, reject) => {
        const a = document.getElementById('audio');
        const done = () => resolve(a.duration);
        if (a.readyState >= 1) done();
        const failed = () => reject(new Error('audio element: ' + a.error.message));
        if (a.readyState < 1) { a.addEventListener('loadedmetadata', done, {once: true});
                                a.addEventListener('error', failed, {once: true}); }
    })""")
    b64 = page.evaluate("""async () => {
        const bytes = new Uint8Array(await (await fetch(document.getElementById('audio').src)).arrayBuffer());
        let s = ''; for (const b of bytes) s += String.fromCharCode(b); return btoa(s);
    }""")
    return duration, base64.b64decode(b64)


def api_tts(url: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/tts", json=body, headers={"Accept": "application/json", **(headers or {})},
                      timeout=120)


def fill(page, text: str, voice: str = "", seed: str = "", temperature: str = "", fmt: str = "stream",
         max_tokens: str = ""):
    page.fill("#text", text)
    page.select_option("#voice", voice)
    page.fill("#seed", seed)
    page.fill("#temperature", temperature)
    page.select_option("#format", fmt)
    if max_tokens and not page.is_visible("#max-tokens"):
        page.click("details summary")  # "More options"
    if page.is_visible("#max-tokens"):
        page.fill("#max-tokens", max_tokens)


class TestWithoutKeys:
    @pytest.fixture(scope="class")
    def app(self, browser, tiny_ckpt):
        from tests.serving.e2e_helpers import running_app

        cfg = e2e_config(str(tiny_ckpt), free_port())
        cfg["orchestrator"] = {**cfg["orchestrator"], "api_keys_env": None}
        with running_app(cfg) as url:
            yield url

    def test_api_clients_still_get_the_routes_and_the_assets_are_served(self, app):
        index = httpx.get(app + "/", timeout=30)  # no text/html in Accept: the JSON listing, as before
        assert index.status_code == 200 and index.json()["routes"]["playground"] == "/playground/"
        r = httpx.get(app + "/playground", timeout=30)
        assert r.status_code == 307 and r.headers["location"] == "playground/"
        html = httpx.get(app + "/playground/", timeout=30)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        for asset in re.findall(r'(?:src|href)="([\w.]+\.(?:js|css))"', html.text):
            r = httpx.get(f"{app}/playground/{asset}", timeout=30)
            assert r.status_code == 200 and r.content, asset
        assert "http" not in "".join(re.findall(r'(?:src|href)="([^"]+)"', html.text))  # nothing from elsewhere
        for path in ("/playground/nope.js", "/playground/..%2Froutes.py", "/playground/%2e%2e/%2e%2e/pyproject.toml"):
            missing = httpx.get(app + path, timeout=30)  # nothing outside serving/static/ is served
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", path

    def test_page_lists_the_servers_voices_and_aliases(self, page, app):
        open_playground(page, app)
        voices = httpx.get(app + "/v1/voices", timeout=30).json()
        offered = page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
        assert set(offered) == {"", *voices["voices"], *voices["aliases"]}
        assert voices["aliases"] and voices["voices"]
        assert page.is_hidden("#key-row") and page.is_hidden("#error")

    def test_stream_plays_chunks_as_they_arrive_and_ends_with_the_apis_audio(self, page, app, tmp_path):
        open_playground(page, app)
        fill(page, TEXT, SEEDED["voice"], str(SEEDED["seed"]), str(SEEDED["temperature"]),
             max_tokens=str(SEEDED["max_semantic_tokens"]))
        last = generate(page)
        assert "error" not in last, last
        # one Web Audio buffer scheduled per segment, the first one before the stream had ended
        assert last["segments"] >= 3 and last["scheduled"] == last["segments"] == len(last["chunkTimesMs"])
        assert last["chunkTimesMs"][0] < last["doneMs"]
        assert 0 < last["ttfa_s"] <= last["total_s"]
        assert re.fullmatch(r"\d+\.\d{3} s", page.text_content("#ttfa"))
        stages = page.eval_on_selector_all("#stages tr[data-stage]", "rs => rs.map(r => r.dataset.stage)")
        assert stages == ["semantic", "coarse", "fine", "codec"]

        duration, wav = audio_element(page)
        api = api_tts(app, {"text": TEXT, **SEEDED, "format": "pcm"}).json()
        assert api["seed"] == last["seed"] == SEEDED["seed"]
        assert duration == pytest.approx(api["duration_s"], abs=1e-4) and api["duration_s"] > 0
        assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
        page_pcm = np.frombuffer(wav[44:], "<i2").astype(np.int32)
        api_pcm = np.frombuffer(base64.b64decode(api["audio_base64"]), "<i2").astype(np.int32)
        assert page_pcm.shape == api_pcm.shape and np.abs(page_pcm - api_pcm).max() <= 1
        shot = Path(os.environ.get("BARK_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

    def test_a_file_format_plays_in_the_audio_element(self, page, app):
        open_playground(page, app)
        fill(page, "A short one.", "v2/en_speaker_1", "3", "0.7", fmt="flac", max_tokens="30")
        last = generate(page)
        assert "error" not in last and last["stream"] is False, last
        duration, flac = audio_element(page)
        assert flac[:4] == b"fLaC"
        api = api_tts(app, {"text": "A short one.", "voice": "v2/en_speaker_1", "seed": 3, "temperature": 0.7,
                            "max_semantic_tokens": 30, "format": "flac"}).json()
        assert duration == pytest.approx(api["duration_s"], abs=1e-3)
        assert page.eval_on_selector_all("#stages tr[data-stage]", "rs => rs.length") == 4

    @pytest.mark.parametrize("text, max_tokens", [("", ""), ("Too long a cap.", "100000")])
    def test_bad_input_shows_the_servers_message(self, page, app, text, max_tokens):
        open_playground(page, app)
        fill(page, text, max_tokens=max_tokens)
        last = generate(page)
        body = {"text": text, "stream": True, "format": "pcm"}
        if max_tokens:
            body["max_semantic_tokens"] = int(max_tokens)
        server = api_tts(app, body)
        assert 400 <= server.status_code < 500
        message = server.json()["error"]["message"]
        assert last == {"error": message}
        assert page.is_visible("#error") and page.text_content("#error") == message


def tones_wav(seconds: float = 2.0, sr: int = 24_000, seed: int = 0) -> bytes:
    """A few tones plus a little noise, as a 16-bit WAV file: something to clone a voice from."""
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    x = sum(0.15 * np.sin(2 * np.pi * f * t + i) for i, f in enumerate((180, 310, 470, 820)))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.02 * np.random.default_rng(seed).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def add_voice(page, name: str, filename: str, data: bytes, mime: str = "audio/wav") -> dict:
    """Upload through "Your voice": what window.playground.voice says afterwards ({added} or {error})."""
    page.evaluate("window.playground.voice = null")
    page.set_input_files("#voice-file", {"name": filename, "mimeType": mime, "buffer": data})
    page.fill("#voice-name", name)
    page.click("#voice-add")
    page.wait_for_function("window.playground.voice !== null", timeout=120_000)
    return page.evaluate("window.playground.voice")


def api_add_voice(url: str, name: str, filename: str, data: bytes, mime: str = "audio/wav") -> httpx.Response:
    return httpx.post(url + "/v1/voices", files={"file": (filename, data, mime)}, data={"name": name}, timeout=120)


def own_voices(page) -> list[str]:
    return page.eval_on_selector_all("#voice optgroup[label='Your voices'] option", "os => os.map(o => o.value)")


class TestVoiceCloning:
    @pytest.fixture(scope="class")
    def app(self, browser, tiny_ckpt, tmp_path_factory):
        from bark_serve.stages.random_cloning import make_cloning_weights
        from tests.serving.e2e_helpers import running_app

        weights = make_cloning_weights(tmp_path_factory.mktemp("cloning"), "tiny", seed=0)
        cloning = {"num_cpus": 0.1, "store_dir": str(tmp_path_factory.mktemp("voices")),
                   "hubert": str(weights["hubert"]), "quantizer": str(weights["quantizer_v1"])}
        cfg = e2e_config(str(tiny_ckpt), free_port(), voice_cloning=cloning)
        cfg["orchestrator"] = {**cfg["orchestrator"], "api_keys_env": None}
        with running_app(cfg) as url:
            yield url

    def test_an_upload_joins_the_picker_selected_and_generate_speaks_with_it(self, page, app):
        open_playground(page, app)
        assert page.is_visible("#clone") and page.is_visible("#voice-record")  # Chromium has MediaRecorder
        name = "page voice 1"
        voice = add_voice(page, name, "tones.wav", tones_wav())
        added = voice.get("added")
        assert added and added["name"] == name and added["id"].startswith("voice_"), voice
        assert added["duration_s"] == pytest.approx(2.0, abs=0.05)
        listed = httpx.get(app + "/v1/voices", timeout=30).json()["custom"]
        assert [v["id"] for v in listed if v["name"] == name] == [added["id"]]
        assert own_voices(page) == [v["name"] for v in sorted(listed, key=lambda v: v["name"])]
        assert page.input_value("#voice") == name  # selected: the next Generate speaks with it
        assert page.is_hidden("#error") and name in page.text_content("#voice-state")
        assert page.input_value("#voice-name") == "" and page.input_value("#voice-file") == ""
        chip = page.locator(f"#my-voices li[data-voice-id='{added['id']}']")
        assert chip.count() == 1 and name in chip.text_content()

        # the voice picker is left alone: the new voice is the one Generate sends (greedy: one answer)
        page.fill("#text", TEXT)
        page.fill("#seed", "")
        page.fill("#temperature", "0")
        page.click("details summary")
        page.fill("#max-tokens", "30")
        last = generate(page)
        assert "error" not in last and last["segments"] >= 2, last
        duration, wav = audio_element(page)
        bark = {"text": TEXT, "temperature": 0, "max_semantic_tokens": 30, "format": "pcm"}
        api = api_tts(app, {**bark, "voice": name}).json()
        assert duration == pytest.approx(api["duration_s"], abs=1e-4) and api["duration_s"] > 0
        page_pcm = np.frombuffer(wav[44:], "<i2").astype(np.int32)
        api_pcm = np.frombuffer(base64.b64decode(api["audio_base64"]), "<i2").astype(np.int32)
        assert page_pcm.shape == api_pcm.shape and np.abs(page_pcm - api_pcm).max() <= 1
        by_id = api_tts(app, {**bark, "voice": added["id"]}).json()  # by its id: the same voice
        assert by_id["audio_base64"] == api["audio_base64"]
        other = api_tts(app, {**bark, "voice": "v2/en_speaker_1"}).json()  # the voice matters
        assert other["audio_base64"] != api["audio_base64"]

        # the x deletes it: gone from the page, the picker falls back to "Bark picks", the API forgets it
        page.evaluate("window.playground.voice = null")
        chip.locator("button").click()
        page.wait_for_function("window.playground.voice !== null")
        assert page.evaluate("window.playground.voice") == {"deleted": added["id"]}
        assert name not in own_voices(page) and page.input_value("#voice") == ""
        assert page.locator(f"#my-voices li[data-voice-id='{added['id']}']").count() == 0
        assert name not in [v["name"] for v in httpx.get(app + "/v1/voices", timeout=30).json()["custom"]]
        assert 400 <= api_tts(app, {**bark, "voice": name}).status_code < 500

    def test_bad_uploads_show_the_servers_message_and_add_nothing(self, page, app):
        taken = api_add_voice(app, "taken-name", "tones.wav", tones_wav(seed=1))
        assert taken.status_code == 201, taken.text
        open_playground(page, app)
        before = own_voices(page)
        assert "taken-name" in before
        cases = [("not audio", "notes.wav", b"These are notes, not a recording.\n" * 40),
                 ("taken-name", "tones.wav", tones_wav(seed=2)),
                 ("../etc/passwd", "tones.wav", tones_wav(seed=3))]
        codes = []
        for name, filename, data in cases:
            shown = add_voice(page, name, filename, data)
            server = api_add_voice(app, name, filename, data)  # the same upload, straight to the API
            assert 400 <= server.status_code < 500, server.text
            codes.append(server.status_code)
            message = server.json()["error"]["message"]
            assert shown == {"error": message}
            assert page.is_visible("#error") and page.text_content("#error") == message
            assert own_voices(page) == before and page.input_value("#voice") == ""
        listed = httpx.get(app + "/v1/voices", timeout=30).json()["custom"]
        assert sorted(v["name"] for v in listed) == sorted(before)  # nothing was stored
        assert codes[1] == 409 and codes[0] != 409
        # what the page checks itself: a name, and a file to send
        shown = add_voice(page, "", "tones.wav", tones_wav())
        assert "name" in shown["error"] and page.text_content("#error") == shown["error"]
        page.evaluate("window.playground.voice = null")
        page.set_input_files("#voice-file", [])
        page.fill("#voice-name", "no file")
        page.click("#voice-add")
        assert "Choose a recording" in page.evaluate("window.playground.voice")["error"]

    def test_record_sends_what_the_microphone_heard(self, page, app):
        open_playground(page, app)
        page.evaluate("window.playground.voice = null")
        page.fill("#voice-name", "recorded")
        page.click("#voice-record")
        page.wait_for_function("document.getElementById('voice-record').textContent === 'Stop'")
        assert page.is_disabled("#voice-add")
        page.wait_for_timeout(2500)
        page.click("#voice-record")  # Stop: the recording goes up as WAV
        page.wait_for_function("window.playground.voice !== null", timeout=120_000)
        voice = page.evaluate("window.playground.voice")
        added = voice.get("added")
        assert added and added["name"] == "recorded", voice
        assert 1.5 < added["duration_s"] < 12
        assert page.input_value("#voice") == "recorded" and "recorded" in own_voices(page)
        assert page.text_content("#voice-record") == "Record" and page.is_enabled("#voice-add")

    def test_without_media_recorder_there_is_no_record_button(self, browser, app):
        context = browser.new_context()
        try:
            p = context.new_page()
            p.add_init_script("delete window.MediaRecorder")
            open_playground(p, app)
            assert p.is_visible("#clone") and p.is_visible("#voice-file") and p.is_hidden("#voice-record")
        finally:
            context.close()


@pytest.fixture(scope="module")
def served(tiny_ckpt, tmp_path_factory):
    """The conftest app, with API keys, but with cloning weights (the checkpoint's voice_cloning/): the
    conftest default names missing ones (its 503 is tested in test_app.py)."""
    from tests.serving.e2e_helpers import running_app

    cloning = {"num_cpus": 0.1, "store_dir": str(tmp_path_factory.mktemp("keyed-voices"))}
    with running_app(e2e_config(str(tiny_ckpt), free_port(), voice_cloning=cloning)) as url:
        yield url, None


def test_with_api_keys_the_key_field_is_used_and_a_missing_key_shows_the_401_message(browser, page, served):
    url, _ = served
    unauthorized = httpx.get(url + "/v1/voices", timeout=30)
    assert unauthorized.status_code == 401
    message = unauthorized.json()["error"]["message"]
    open_playground(page, url)  # the page itself needs no key
    assert page.is_visible("#key-row") and page.text_content("#error") == message

    fill(page, "Hello there.", fmt="stream")
    assert generate(page) == {"error": message}  # no key typed in yet: the 401 message

    page.fill("#api-key", API_KEY)
    page.click("#key-apply")
    page.wait_for_function("window.playground.voicesLoaded")
    assert page.is_hidden("#error")
    offered = page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
    assert "alloy" in offered
    fill(page, "Hello there.", "alloy", "5", max_tokens="20")
    last = generate(page)
    assert "error" not in last and last["segments"] >= 1, last
    duration, _ = audio_element(page)
    api = api_tts(url, {"text": "Hello there.", "voice": "alloy", "seed": 5, "max_semantic_tokens": 20,
                        "format": "pcm"}, headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert duration == pytest.approx(api["duration_s"], abs=1e-4)

    # an upload carries the key too: the voice is this key's, listed for it and not for another key
    voice = add_voice(page, "keyed voice", "tones.wav", tones_wav())
    assert voice.get("added") and page.input_value("#voice") == "keyed voice", voice
    mine = httpx.get(url + "/v1/voices", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()
    theirs = httpx.get(url + "/v1/voices", headers={"Authorization": "Bearer second-key"}, timeout=30).json()
    assert [v["id"] for v in mine["custom"]] == [voice["added"]["id"]] and theirs["custom"] == []

    page.fill("#api-key", "wrong-key")
    page.click("#key-apply")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == message
