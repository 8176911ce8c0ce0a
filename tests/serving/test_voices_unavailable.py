"""A server without the voice-cloning weights (issue 23): POST /v1/voices answers 503 naming what is
missing, the VoiceEncoder stays up, and speech is served as ever. Its own module: it starts its own app
(test_voices_api.py's module-scoped app must not run beside it)."""

from __future__ import annotations

import pytest

from bark_serve.cluster.ports import free_port
from tests.serving.conftest import e2e_config
from tests.serving.test_voices_api import add, custom, tones, tts, wav

pytestmark = pytest.mark.slow


def test_without_cloning_weights_adding_a_voice_is_a_503_and_everything_else_works(tiny_ckpt, tmp_path):
    from tests.serving.e2e_helpers import running_app

    cloning = {"num_cpus": 0.1, "store_dir": str(tmp_path), "hubert": str(tmp_path / "no-hubert"),
               "quantizer": str(tmp_path / "no-quantizer.pth")}
    with running_app(e2e_config(str(tiny_ckpt), free_port(), voice_cloning=cloning)) as url:
        r = add(url, wav(tones(2.0)), "someone")
        assert r.status_code == 503 and r.json()["error"]["code"] == "voice_cloning_unavailable", r.text
        assert "no-quantizer.pth" in r.json()["error"]["message"]  # what is missing, by name
        assert custom(url) == []
        assert tts(url, "alloy").status_code == 200
