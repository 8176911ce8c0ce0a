"""The ``bark-serve`` command line, run as a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from bark_serve.stages.engine import EngineOptions
from bark_serve.stages.pipeline import BarkPipeline
from bark_serve.stages.types import GenerationParams


def run_cli(*args, env=None, timeout=300):
    cmd = [sys.executable, "-m", "bark_serve.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_synth_writes_24khz_wav_equal_to_the_pipeline(tiny_ckpt, tmp_path):
    out, voice = tmp_path / "out.wav", tmp_path / "voice.npz"
    res = run_cli("synth", "Hello, my dog is cute.", "-o", out, "--model", tiny_ckpt, "--voice", "v2/en_speaker_1",
                  "--temperature", "0", "--min-eos-p", "none", "--max-semantic-tokens", "30", "--save-voice", voice,
                  "--dtype", "float32", "--raw")  # float32 like the reference (auto may pick bfloat16); raw: no joining
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "24000 Hz" in res.stdout
    audio, sr = sf.read(out, dtype="float32")
    assert sr == 24000
    ref = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions()).generate(
        "Hello, my dog is cute.", "v2/en_speaker_1", GenerationParams.greedy(max_semantic_tokens=30, min_eos_p=None))[0]
    assert audio.shape == ref.audio.shape
    assert np.max(np.abs(audio - ref.audio)) < 2 / 32767  # 16-bit quantization only
    saved = np.load(voice, allow_pickle=False)
    assert set(saved.files) == {"semantic_prompt", "coarse_prompt", "fine_prompt"}
    np.testing.assert_array_equal(saved["semantic_prompt"], ref.semantic)
    np.testing.assert_array_equal(saved["fine_prompt"], ref.fine)
    # the saved voice is usable as a preset at once
    again = run_cli("synth", "Again.", "-o", tmp_path / "again.flac", "--model", tiny_ckpt, "--voice", voice,
                    "--seed", "3", "--max-semantic-tokens", "10")
    assert again.returncode == 0, again.stderr
    assert sf.info(tmp_path / "again.flac").samplerate == 24000


def test_long_text_is_split_and_the_voice_carried(tiny_ckpt, tmp_path):
    text = " ".join(f"Sentence {i} is here to make the text longer than one generation." for i in range(40))
    res = run_cli("synth", text, "-o", tmp_path / "long.wav", "--model", tiny_ckpt, "--seed", "1",
                  "--max-semantic-tokens", "8")
    assert res.returncode == 0, res.stderr
    audio, _ = sf.read(tmp_path / "long.wav")
    assert len(audio) > 2 * 8 * 320 * 3 // 2  # more than one segment's worth


def test_output_options_speed_and_aac(tiny_ckpt, tmp_path):
    """--speed 2 halves the raw audio; the default joins write a valid .aac (ADTS) file."""
    common = ["--model", tiny_ckpt, "--seed", "4", "--temperature", "0", "--max-semantic-tokens", "20"]
    text = "A first sentence to say. And then a second one."
    for name, extra in [("raw.wav", ["--raw"]), ("fast.wav", ["--raw", "--speed", "2"]), ("joined.aac", [])]:
        res = run_cli("synth", text, "-o", tmp_path / name, *common, *extra)
        assert res.returncode == 0, res.stderr
    raw, fast = sf.read(tmp_path / "raw.wav")[0], sf.read(tmp_path / "fast.wav")[0]
    assert len(fast) == pytest.approx(len(raw) / 2, rel=0.01)
    import av

    with av.open(str(tmp_path / "joined.aac")) as container:
        assert container.format.name == "aac" and sum(f.samples for f in container.decode(audio=0)) > 0


@pytest.mark.parametrize("args,message", [
    (["synth", "", "-o", "x.wav"], "text is empty"),
    (["synth", "hi", "-o", "x.wav", "--voice", "nobody"], "unknown voice 'nobody'"),
    (["synth", "hi", "-o", "x.m4a"], "cannot tell the audio format"),
    (["synth", "hi", "-o", "x.wav", "--speed", "nan"], "speed: Input should be a finite number"),
    (["synth", "hi", "-o", "x.wav", "--speed", "5"], "speed: Input should be less than or equal to 4"),
    (["synth", "hi", "-o", "x.wav", "--dtype", "float8"], "invalid choice"),
    (["synth", "hi", "-o", "x.wav", "--device", "cuda:0"], "CUDA is not available|unknown device"),
    (["synth", "hi", "-o", "x.wav", "--temperature", "-2"], "temperature: Input should be greater than or equal to 0"),
    (["synth", "hi", "-o", "x.wav", "--save-voice", "v.txt"], "must name a .npz"),
    (["synth", "hi"], "required: -o/--output"),
])
def test_bad_arguments_exit_2_with_one_line(tiny_ckpt, tmp_path, args, message):
    args = [tmp_path / a if a.endswith((".wav", ".m4a", ".txt")) else a for a in args]
    res = run_cli(*args, "--model", tiny_ckpt)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    import re

    assert re.search(message, lines[0]), lines[0]


def test_missing_model_exit_2(tmp_path):
    res = run_cli("synth", "hi", "-o", tmp_path / "x.wav", "--model", tmp_path / "nope")
    assert res.returncode == 2 and "no such directory" in res.stderr


def test_hub_id_loads_from_the_hugging_face_cache_offline(tiny_ckpt, tmp_path):
    """`--model suno/bark-small` goes through huggingface_hub; here it finds a populated cache offline."""
    snap = tmp_path / "hf" / "hub" / "models--suno--bark-small" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_ckpt, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    res = run_cli("synth", "Hello.", "-o", tmp_path / "hub.wav", "--model", "suno/bark-small", "--voice",
                  "v2/en_speaker_6", "--max-semantic-tokens", "10", env=env)
    assert res.returncode == 0, res.stderr
    res = run_cli("synth", "Hello.", "-o", tmp_path / "hub.wav", "--model", "suno/bark", env=env)
    assert res.returncode == 2 and "not cached" in res.stderr


def test_make_checkpoint_command_writes_what_transformers_loads(tmp_path):
    res = run_cli("make-checkpoint", tmp_path / "ck", "--size", "tiny", "--seed", "5")
    assert res.returncode == 0, res.stderr
    from transformers import BarkModel, BarkProcessor

    model = BarkModel.from_pretrained(str(tmp_path / "ck"))
    proc = BarkProcessor.from_pretrained(str(tmp_path / "ck"))
    inputs = proc("Hello there", voice_preset="v2/en_speaker_0")
    audio = model.generate(**inputs, semantic_max_new_tokens=5, do_sample=False)
    assert audio.shape[-1] > 0
    voices = run_cli("voices", "--model", tmp_path / "ck")
    assert "v2/en_speaker_0" in voices.stdout.split()
    assert "end by itself" in (tmp_path / "ck" / "README.md").read_text()  # the command's default: EOS tuned
    assert "requests end after about 1-4 s of audio" in res.stdout


def test_make_checkpoint_full_length_keeps_the_plain_random_weights(tmp_path):
    """`--full-length` (alias `--no-eos`): the weights make_checkpoint() writes by default, as benchmarks need."""
    from safetensors.torch import load_file

    from bark_serve.stages.random_checkpoint import make_checkpoint

    res = run_cli("make-checkpoint", tmp_path / "full", "--no-eos")
    assert res.returncode == 0, res.stderr
    assert "--full-length" in (tmp_path / "full" / "README.md").read_text()
    ours, plain = load_file(tmp_path / "full" / "model.safetensors"), load_file(
        make_checkpoint(tmp_path / "plain", "tiny") / "model.safetensors")
    semantic = [k for k in plain if k.startswith("semantic.")]  # (the codec keeps transformers' unseeded init)
    assert semantic and all((ours[k] == plain[k]).all() for k in semantic)
