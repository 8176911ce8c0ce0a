"""``bark-serve voice clone AUDIO -o voice.npz``: in process, on the tiny checkpoint and tiny random cloning
weights; the file it writes is the voice VoiceCloner makes of the decoded recording, and every failure is one
line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
import soundfile as sf

from bark_serve.cli import voice as voice_cli
from bark_serve.stages.cloning import VoiceCloner
from bark_serve.stages.constants import BarkSpec
from bark_serve.stages.random_cloning import make_cloning_weights
from bark_serve.stages.voices import voice_from_npz_bytes


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)  # restored after each test by conftest


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_cloning_weights(tmp_path_factory.mktemp("cloning"), "tiny", seed=1)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    rate = 44_100
    t = np.arange(int(2.5 * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)).astype(np.float32)
    path = tmp_path_factory.mktemp("audio") / "speaker.flac"
    sf.write(path, np.stack([x, 0.8 * x], axis=1), rate, format="FLAC")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = voice_cli.main(["clone", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_clone_writes_the_cloners_voice(capsys, tiny_ckpt, weights, recording, tmp_path):
    out = tmp_path / "me.npz"
    code, stdout, stderr = run(capsys, recording, "-o", out, "--checkpoint", tiny_ckpt, "--hubert",
                               weights["hubert"], "--quantizer", weights["quantizer_v1"], "--device", "cpu")
    assert code == 0, stderr
    assert f"wrote {out}" in stdout and "semantic tokens" in stdout
    voice = voice_from_npz_bytes(out.read_bytes(), BarkSpec())
    with np.load(out, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["coarse_prompt", "fine_prompt", "semantic_prompt"]
    audio, rate = sf.read(recording, dtype="float32", always_2d=True)
    cloner = VoiceCloner.from_pretrained(str(tiny_ckpt), weights["hubert"], weights["quantizer_v1"])
    expected = cloner.clone(audio.mean(axis=1, dtype=np.float64).astype(np.float32), rate)
    for key in ("semantic", "coarse", "fine"):
        np.testing.assert_array_equal(getattr(voice, key), getattr(expected, key))


def test_clone_errors_are_one_line_and_exit_2(capsys, tiny_ckpt, weights, recording, tmp_path):
    models = ["--model", tiny_ckpt, "--hubert", weights["hubert"], "--quantizer", weights["quantizer"]]
    cases = {
        "not .npz": ([recording, "-o", tmp_path / "v.wav", *models], "-o must name a .npz file"),
        "no file": ([tmp_path / "missing.wav", "-o", tmp_path / "v.npz", *models], "cannot read"),
        "not audio": ([_write(tmp_path / "notes.txt", b"just some text " * 100), "-o", tmp_path / "v.npz",
                       *models], "not an audio file"),
        "too short": ([_write(tmp_path / "short.wav", _wav(0.4)), "-o", tmp_path / "v.npz", *models],
                      "at least 1 s"),
        "no quantizer": ([recording, "-o", tmp_path / "v.npz", "--model", tiny_ckpt, "--hubert", weights["hubert"],
                          "--quantizer", tmp_path / "none.pth"], "does not exist"),
        "no hubert": ([recording, "-o", tmp_path / "v.npz", "--model", tiny_ckpt, "--hubert", tmp_path / "empty",
                       "--quantizer", weights["quantizer"]], "HuBERT"),
        "no checkpoint": ([recording, "-o", tmp_path / "v.npz", "--model", tmp_path / "nowhere/bark", "--hubert",
                           weights["hubert"], "--quantizer", weights["quantizer"]], "no such directory"),
    }
    (tmp_path / "empty").mkdir()
    for name, (argv, message) in cases.items():
        code, stdout, stderr = run(capsys, *argv)
        assert code == 2, name
        assert stderr.startswith("bark-serve voice clone: error: ") and message in stderr, (name, stderr)
        assert stderr.count("\n") == 1 and "Traceback" not in stderr, name
    assert not (tmp_path / "v.npz").exists()


def test_add_voice_commands_registers_clone_on_a_parser():
    """main.py calls add_voice_commands(subparsers): `voice clone` parses there, with its defaults."""
    parser = argparse.ArgumentParser(prog="bark-serve")
    sub = voice_cli.add_voice_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["voice", "clone", "a.wav", "-o", "v.npz"])
    assert args.func is voice_cli.clone and args.command == "voice" and args.voice_command == "clone"
    assert args.model == voice_cli.DEFAULT_MODEL and args.hubert is None and args.quantizer is None
    assert args.dtype == "float32"
    sub.add_parser("list")  # the server commands register beside clone
    assert parser.parse_args(["voice", "list"]).voice_command == "list"


def _wav(seconds: float, rate: int = 24_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
