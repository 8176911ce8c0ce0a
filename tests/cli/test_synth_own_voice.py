"""`bark-serve synth --voice NAME` speaks a voice registered on a server without API keys (issue 23): the
shared owner's voices live in the voice folder ($BARK_STATE_DIR/voices), which synth reads too."""

from __future__ import annotations

import asyncio

import pytest

from bark_serve.cluster.voice_backends import DirVoiceStore
from bark_serve.stages.voices import VoiceLibrary, voice_npz_bytes
from bark_serve.stages.weights import Checkpoint
from tests.cli.test_synth_cli import run_cli

pytestmark = pytest.mark.slow


def test_synth_speaks_a_registered_voice_as_its_npz_file(tiny_ckpt, tmp_path):
    ckpt = Checkpoint.open(str(tiny_ckpt))
    npz = voice_npz_bytes(VoiceLibrary(ckpt.spec, ckpt).resolve("announcer"))
    asyncio.run(DirVoiceStore(tmp_path / "state" / "voices").add("", "house voice", npz, 2.0))
    (tmp_path / "house.npz").write_bytes(npz)
    env = {"BARK_STATE_DIR": str(tmp_path / "state")}
    common = ["--model", tiny_ckpt, "--temperature", "0", "--min-eos-p", "none", "--max-semantic-tokens", "12",
              "--dtype", "float32", "--raw"]
    by_name = run_cli("synth", "Hello there.", "-o", tmp_path / "a.wav", "--voice", "house voice", *common, env=env)
    assert by_name.returncode == 0, by_name.stderr
    by_file = run_cli("synth", "Hello there.", "-o", tmp_path / "b.wav", "--voice", tmp_path / "house.npz", *common)
    assert by_file.returncode == 0, by_file.stderr
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    unknown = run_cli("synth", "Hello.", "-o", tmp_path / "c.wav", "--voice", "nobody", *common, env=env)
    assert unknown.returncode == 2 and "unknown voice" in unknown.stderr and "Traceback" not in unknown.stderr
